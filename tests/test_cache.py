"""The Parquet feature cache: bit-exact round trips, crash safety (a real SIGKILL), refusals, pairs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline.cache as C
import pipeline.cache.layout as L
import pipeline.cache.parquet_pages as P
from pipeline.cache import (CacheError, CacheIncomplete, CacheInputError, CacheMismatch, CacheSpec, open_writer,
                            read_features, read_manifest, read_pairs, verify_cache)
from pipeline.hashing import file_sha256, file_xxh3
from pipeline.recipes.cache_info import UnusableCache, cache_info

D = 24
ROWS = 60  # per part
REPO = Path(__file__).resolve().parents[1]


def make_spec(**changes) -> CacheSpec:
    fields = dict(backbone="test/tiny", backbone_revision="abc123", hidden_size=D, storage_dtype="float16",
                  max_length=512, chat_template_hash="t0", dataset="synthetic:ratings", dataset_fingerprint="f0",
                  kind="ratings", extra={"part_rows": ROWS})
    return CacheSpec(**{**fields, **changes})


def make_part(i: int, n: int = ROWS, d: int = D, kind: str = "ratings") -> dict:
    """Deterministic columns for part i, with NaN labels and null base scores mixed in."""
    rng = np.random.default_rng(i)
    labels = rng.integers(0, 5, (n, 5)).astype(np.float32)
    labels[rng.random((n, 5)) < 0.2] = np.nan
    base = rng.standard_normal(n).astype(np.float32)
    base[::3] = np.nan
    cols = {"id": [f"p{i}-{j}" for j in range(n)], "source": ["alpha", "beta"][i % 2],
            "subset": [("chat", "math", None)[j % 3] for j in range(n)], "n_tokens": rng.integers(1, 500, n),
            "embedding": rng.standard_normal((n, d)).astype(np.float32) * 10, "labels": labels, "base_score": base}
    if kind == "preferences":
        cols.update(pair_id=[f"pair{i}-{j // 2}" for j in range(n)], role=["chosen", "rejected"] * (n // 2),
                    subset=[("chat", "math")[(j // 2) % 2] for j in range(n)], labels=None)
    return cols


def write_cache(path, spec=None, n_parts=3, kind="ratings", **kw) -> list[dict]:
    spec = spec or make_spec(kind=kind)
    w = open_writer(path, spec, n_parts=n_parts, **kw)
    parts = [make_part(i, kind=kind) for i in range(n_parts)]
    for i, cols in enumerate(parts):
        w.write_part(i, cols, dropped=i)
    w.finish(n_parts)
    return parts


def expected(parts: list[dict], dtype: str) -> dict:
    return {"embedding": np.concatenate([p["embedding"] for p in parts]).astype(dtype),
            "labels": np.concatenate([p["labels"] for p in parts]),
            "base_score": np.concatenate([p["base_score"] for p in parts]),
            "id": np.concatenate([p["id"] for p in parts]).astype(object)}


def bits(x) -> np.ndarray:
    x = np.ascontiguousarray(x.numpy() if hasattr(x, "numpy") else x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


# ------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    parts = write_cache(tmp_path / "c", make_spec(storage_dtype=dtype))
    f = read_features(tmp_path / "c")
    want = expected(parts, dtype)
    assert len(f) == 3 * ROWS and f.embedding.dtype == getattr(__import__("torch"), dtype)
    assert np.array_equal(bits(f.embedding), bits(want["embedding"]))
    assert np.array_equal(bits(f.labels), bits(want["labels"]))  # NaN = missing survives bit for bit
    assert np.array_equal(bits(f.base_score), bits(want["base_score"]))  # NaN in -> null on disk -> NaN out
    assert list(f.id) == list(want["id"]) and f.n_tokens.dtype == __import__("torch").int32
    assert f.subset[2] is None and f.role[0] is None and f.pair_id[0] is None
    m = read_manifest(tmp_path / "c")
    assert m["complete"] and m["rows"] == 3 * ROWS and m["dropped_rows"] == 0 + 1 + 2
    assert [p["rows"] for p in m["parts"]] == [ROWS] * 3 and len(m["fingerprint"]) == 64
    assert f.manifest["fingerprint"] == m["fingerprint"]


def test_filters_and_dtype(tmp_path):
    parts = write_cache(tmp_path / "c")
    want = expected(parts, "float16")
    source = np.array([["alpha", "beta"][i % 2] for i in range(3) for _ in range(ROWS)])
    subset = np.array([("chat", "math", None)[j % 3] for _ in range(3) for j in range(ROWS)], dtype=object)
    for kwargs, mask in [({"source": "beta"}, source == "beta"), ({"subset": "math"}, subset == "math"),
                         ({"subset": ["chat", "math"], "source": ["alpha"]},
                          (source == "alpha") & np.isin(subset, ["chat", "math"]))]:
        f = read_features(tmp_path / "c", **kwargs)
        assert list(f.id) == list(want["id"][mask]) and 0 < len(f) < 3 * ROWS
        assert np.array_equal(bits(f.embedding), bits(want["embedding"][mask]))
    assert len(read_features(tmp_path / "c", source="nowhere")) == 0
    f32 = read_features(tmp_path / "c", dtype="float32")
    assert np.array_equal(f32.embedding.numpy(), want["embedding"].astype(np.float32))


def test_role_filter_and_fast_path_equals_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "DATA_PAGE_BYTES", 1000)  # ~20 rows a page
    monkeypatch.setattr(L, "ROW_GROUP_BYTES", 40 * D * 2)  # 40 rows a row group
    parts = write_cache(tmp_path / "c", kind="preferences")
    md = pq.ParquetFile(tmp_path / "c" / "part-00000.parquet").metadata
    assert md.num_row_groups == 2
    fast_pages = []
    real = P.plain_pages
    monkeypatch.setattr(P, "plain_pages", lambda *a: fast_pages.append(1) or real(*a))
    fast = read_features(tmp_path / "c", role="rejected")
    assert fast_pages and set(fast.role) == {"rejected"} and len(fast) == 3 * ROWS // 2
    monkeypatch.setattr(P, "plain_pages", lambda *a: None)  # force pyarrow's decoder
    slow = read_features(tmp_path / "c", role="rejected")
    assert np.array_equal(bits(fast.embedding), bits(slow.embedding))
    assert len(fast_pages) == 6  # 3 parts x 2 row groups, each walked page by page
    want = np.concatenate([p["embedding"] for p in parts]).astype(np.float16)[1::2]
    assert np.array_equal(bits(fast.embedding), bits(want))


def test_margin_round_trips_and_caches_without_the_column_still_read(tmp_path):
    parts = write_cache(tmp_path / "c", kind="preferences", n_parts=2)  # no margin given: null
    assert np.isnan(read_features(tmp_path / "c").margin.numpy()).all()
    w = open_writer(tmp_path / "m", make_spec(kind="preferences"))
    margin = [1.5, 1.5, None, None] + [0.25] * (ROWS - 4)  # a pair's margin on both of its rows
    w.write_part(0, {**make_part(0, kind="preferences"), "margin": margin})
    w.finish(1)
    pairs = read_pairs(tmp_path / "m")
    got = pairs.chosen.margin.numpy()
    assert got[0] == 1.5 and np.isnan(got[1]) and (got[2:] == 0.25).all()
    assert np.array_equal(pairs.rejected.margin.numpy(), got, equal_nan=True)
    # A part written before the margin column existed (the same part without it) reads as all null.
    old = pq.read_table(tmp_path / "c" / "part-00000.parquet").drop_columns(["margin"])
    pq.write_table(old, tmp_path / "c" / "part-00000.parquet", **L.parquet_options())
    manifest = json.loads((tmp_path / "c" / C.MANIFEST).read_text())
    file = tmp_path / "c" / "part-00000.parquet"
    manifest["parts"][0].update(bytes=file.stat().st_size, sha256=file_sha256(file), xxh3_128=file_xxh3(file))
    del manifest["columns"]["margin"]
    (tmp_path / "c" / C.MANIFEST).write_text(json.dumps(manifest))
    f = read_features(tmp_path / "c", verify=True)
    assert len(f) == 2 * ROWS and np.isnan(f.margin.numpy()).all()
    assert list(f.id) == [i for p in parts for i in p["id"]]
    # Writing into such a cache would mix two schemas: refused, naming the fix.
    with pytest.raises(CacheMismatch, match=r"older version of this package \(without the column\(s\) \['margin'\]\).*--overwrite"):
        open_writer(tmp_path / "c", make_spec(kind="preferences"), n_parts=2).write_part(1, make_part(1, kind="preferences"))


def test_empty_part_and_large_values_in_float32(tmp_path):
    w = open_writer(tmp_path / "c", make_spec(storage_dtype="float32"))
    w.write_part(0, make_part(0, n=0), dropped=5)
    cols = make_part(1)
    cols["embedding"][0, 0] = 1e6  # fine in float32
    w.write_part(1, cols)
    w.finish(2)
    f = read_features(tmp_path / "c")
    assert len(f) == ROWS and f.embedding[0, 0].item() == 1e6 and read_manifest(tmp_path / "c")["dropped_rows"] == 5


def test_pandas_opens_the_folder(tmp_path):
    pd = pytest.importorskip("pandas")
    parts = write_cache(tmp_path / "c")
    (tmp_path / "c" / f".part-00009.parquet.{os.getpid()}.tmp").write_bytes(b"half")  # hidden: ignored
    df = pd.read_parquet(tmp_path / "c")
    assert list(df.columns) == ["id", "source", "subset", "pair_id", "role", "n_tokens", "embedding", "labels",
                                "base_score", "margin"]
    assert list(df["id"]) == list(expected(parts, "float16")["id"])
    assert np.array_equal(np.stack(df["embedding"].to_numpy()), expected(parts, "float16")["embedding"])


def test_cache_info(tmp_path):
    write_cache(tmp_path / "c", kind="preferences")
    text = cache_info(tmp_path / "c")
    for needle in ("test/tiny @ abc123", "24, stored as float16", "3 of 3 complete", "preferences",
                   "alpha", "rejected", "max_length     512"):
        assert needle in text
    assert "    alpha   chat    chosen      30" in text  # per source/subset/role counts


# ------------------------------------------------------------------------------ refusals, errors


def test_mismatch_names_each_field_and_the_fix(tmp_path):
    write_cache(tmp_path / "c")
    with pytest.raises(CacheMismatch) as e:
        open_writer(tmp_path / "c", make_spec(backbone_revision="def456", max_length=1024))
    msg = str(e.value)
    assert "backbone_revision: cache has 'abc123', this run has 'def456'" in msg
    assert "max_length: cache has 512, this run has 1024" in msg and "--overwrite" in msg and "--cache-dir" in msg
    for change in ({"chat_template_hash": "t1"}, {"storage_dtype": "float32"}, {"kind": "preferences"},
                   {"dataset_fingerprint": "f1"}, {"backbone": "other"}, {"extra": {"part_rows": 7}}):
        with pytest.raises(CacheMismatch, match=next(iter(change))):
            open_writer(tmp_path / "c", make_spec(**change))
    open_writer(tmp_path / "c", make_spec(dataset="renamed"))  # the name alone is not compared


def test_overwrite_replaces_the_cache(tmp_path):
    write_cache(tmp_path / "c")
    (tmp_path / "c" / "notes.txt").write_text("mine")
    w = open_writer(tmp_path / "c", make_spec(storage_dtype="float32"), overwrite=True)
    assert w.done_parts == set() and not list((tmp_path / "c").glob("part-*.parquet"))
    w.write_part(0, make_part(7))
    w.finish(1)
    f = read_features(tmp_path / "c")
    assert len(f) == ROWS and f.manifest["storage_dtype"] == "float32"
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"  # only cache files are removed


@pytest.mark.parametrize("value, needle", [(7e4, "max |value| 70000"), (np.inf, "infinite"), (np.nan, "NaN")])
def test_float16_overflow_refused_and_nothing_written(tmp_path, value, needle):
    w = open_writer(tmp_path / "c", make_spec())
    cols = make_part(0)
    cols["embedding"][17, 3] = value
    with pytest.raises(CacheInputError) as e:
        w.write_part(0, cols)
    msg = str(e.value)
    assert "row 17" in msg and "'p0-17'" in msg and "'embedding'" in msg and needle in msg
    if value == 7e4:
        assert "--storage-dtype float32" in msg
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [C.MANIFEST]
    assert w.done_parts == set()


def test_shape_and_value_checks(tmp_path):
    w = open_writer(tmp_path / "c", make_spec())
    for change, needle in [({"embedding": np.zeros((ROWS, D + 1), np.float32)}, "expected [rows, 24]"),
                           ({"labels": np.zeros((ROWS, 4), np.float32)}, "'labels' has shape"),
                           ({"id": ["x"] * (ROWS - 1)}, "'id' has 59 rows but embedding has 60"),
                           ({"n_tokens": np.zeros(ROWS + 1, np.int64)}, "'n_tokens' has shape"),
                           ({"role": ["winner"] * ROWS}, "'winner' is not one of"),
                           ({"id": ["x"] * (ROWS - 1) + [None]}, "'id', row 59: missing"),
                           ({"colour": [1] * ROWS}, "unknown ['colour']")]:
        with pytest.raises(CacheInputError, match=__import__("re").escape(needle)):
            w.write_part(0, {**make_part(0), **change})
    assert not list((tmp_path / "c").glob("*part-*"))


def test_incomplete_cache_is_refused(tmp_path):
    w = open_writer(tmp_path / "c", make_spec(), n_parts=3)
    w.write_part(0, make_part(0))
    with pytest.raises(CacheIncomplete, match=r"cache is incomplete \(1 of 3 parts written, not marked complete\); run `urm extract` again"):
        read_features(tmp_path / "c")
    with pytest.raises(CacheIncomplete, match="2 of 3 parts not written"):
        w.finish(3)
    with pytest.raises(UnusableCache, match=r"cache is incomplete \(1 of 3 parts written") as info:
        cache_info(tmp_path / "c")  # `urm cache info` prints the summary, then fails
    assert "INCOMPLETE" in info.value.summary and "1 of 3 complete" in info.value.summary
    with pytest.raises(CacheError, match="not a feature cache"):
        read_features(tmp_path / "nowhere")


def test_damaged_parts_are_caught_and_rewritten(tmp_path):
    write_cache(tmp_path / "c")
    part = tmp_path / "c" / "part-00001.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    part.write_bytes(bytes(data))
    read_features(tmp_path / "c", verify=False)  # the size alone is the same
    with pytest.raises(CacheError, match="part-00001.parquet: part has changed since it was written .* rebuilds the "
                                         "damaged parts only"):
        read_features(tmp_path / "c")  # every read checks the checksums
    with pytest.raises(CacheError, match="part-00001.parquet: part has changed"):
        verify_cache(tmp_path / "c")
    w = open_writer(tmp_path / "c", make_spec(), verify=True)
    assert w.done_parts == {0, 2} and not part.exists()
    with pytest.raises(CacheIncomplete, match="2 of 3 parts"):
        read_features(tmp_path / "c")
    w.write_part(1, make_part(1), dropped=1)
    w.finish(3)
    assert len(verify_cache(tmp_path / "c")["parts"]) == 3
    part.write_bytes(b"short")  # a size change is caught cheaply, without verify
    with pytest.raises(CacheError, match="has 5 bytes"):
        read_features(tmp_path / "c")


def test_a_part_copied_over_another_is_refused_from_its_footer_even_unverified(tmp_path):
    """Parts of the same size (same rows): --no-verify compares sizes only, and the footer says which part a file is."""
    write_cache(tmp_path / "c")
    folder = tmp_path / "c"
    shutil.copyfile(folder / "part-00000.parquet", folder / "part-00002.parquet")
    m = json.loads((folder / "_manifest.json").read_text())
    m["parts"][2]["bytes"] = (folder / "part-00002.parquet").stat().st_size  # as a swap of equal sizes would be
    (folder / "_manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="part-00002.parquet: is part 0 by its footer, but the manifest lists it as "
                                         "part 2: another part's file was copied over it"):
        read_features(folder, verify=False)
    with pytest.raises(UnusableCache, match="MANIFEST AND PARTS DISAGREE: part-00002.parquet is part 0 by its footer"):
        cache_info(folder, verify=False)


# ------------------------------------------------------------------------------------------- pairs


def test_read_pairs_aligns_by_pair_id(tmp_path):
    w = open_writer(tmp_path / "c", make_spec(kind="preferences"))
    # part 0: chosen rows of pairs a..f; part 1: their rejected rows in another order, plus a whole pair
    emb = np.arange(14 * D, dtype=np.float32).reshape(14, D)
    chosen = list("abcdef")
    rejected = list("fdbeca")
    w.write_part(0, {"id": [f"c{p}" for p in chosen], "source": "s", "pair_id": chosen, "role": "chosen",
                     "subset": ["x", "y"] * 3, "n_tokens": np.ones(6, int), "embedding": emb[:6]})
    w.write_part(1, {"id": [f"r{p}" for p in rejected] + ["cg", "rg"], "source": "s",
                     "pair_id": rejected + ["g", "g"], "role": ["rejected"] * 6 + ["chosen", "rejected"],
                     "subset": [{"a": "x", "c": "x", "e": "x"}.get(p, "y") for p in rejected] + ["x", "x"],
                     "n_tokens": np.ones(8, int), "embedding": emb[6:]})
    w.finish(2)
    pairs = read_pairs(tmp_path / "c")
    assert len(pairs) == 7 and list(pairs.chosen.pair_id) == list(pairs.rejected.pair_id) == chosen + ["g"]
    assert list(pairs.rejected.id) == [f"r{p}" for p in chosen] + ["rg"]
    rows = {i: r for r, i in enumerate([f"c{p}" for p in chosen] + [f"r{p}" for p in rejected] + ["cg", "rg"])}
    assert np.array_equal(pairs.rejected.embedding.float().numpy(), emb[[rows[i] for i in pairs.rejected.id]])
    assert np.array_equal(pairs.chosen.embedding.float().numpy(), emb[[rows[i] for i in pairs.chosen.id]])
    sub = read_pairs(tmp_path / "c", subset="x")
    assert list(sub.chosen.pair_id) == ["a", "c", "e", "g"] == list(sub.rejected.pair_id)


def test_read_pairs_refuses_a_missing_side(tmp_path):
    w = open_writer(tmp_path / "c", make_spec(kind="preferences"))
    w.write_part(0, {"id": ["1", "2", "3"], "source": "s", "pair_id": ["a", "a", "b"],
                     "role": ["chosen", "rejected", "chosen"], "n_tokens": np.ones(3, int),
                     "embedding": np.zeros((3, D), np.float32)})
    w.finish(1)
    with pytest.raises(CacheError, match=r"1 pairs have a chosen row but no rejected row, e\.g\. pair_id 'b' "
                                         r"\(.*part-00000\.parquet row 2\)"):
        read_pairs(tmp_path / "c")
    with pytest.raises(CacheError, match="read_pairs needs a 'preferences' cache"):
        write_cache(tmp_path / "r", n_parts=1)
        read_pairs(tmp_path / "r")


# ------------------------------------------------------------------------- crash safety (SIGKILL)

KILL_POINTS = ["mid-write", "before-rename", "before-manifest"]


def _child(folder: str, point: str) -> None:
    """Run in a subprocess: write 4 parts, and hang at `point` while writing part 2 (then gets killed)."""
    import pyarrow.parquet as pq

    def hang():
        Path(folder + ".ready").touch()
        time.sleep(60)

    if point == "mid-write":
        real = pq.ParquetWriter.write_table

        def write_table(self, table, *a, **k):
            if table["id"][0].as_py() == "p2-0":
                real(self, table.slice(0, ROWS // 2), *a, **k)  # half the rows are in the file
                hang()
            return real(self, table, *a, **k)

        pq.ParquetWriter.write_table = write_table
    elif point == "before-rename":
        real_replace = os.replace
        os.replace = lambda a, b: hang() if Path(b).name == "part-00002.parquet" else real_replace(a, b)
    else:
        real_save = C.CacheWriter._save
        C.CacheWriter._save = lambda self: hang() if 2 in self._parts else real_save(self)
    write_cache(folder, n_parts=4)


@pytest.mark.integration
@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_writer_leaves_no_half_part_and_resumes(tmp_path, point):
    folder = tmp_path / "c"
    code = (f"import importlib.util, sys; sys.path.insert(0, {str(REPO)!r}); "
            f"s = importlib.util.spec_from_file_location('tc', {__file__!r}); m = importlib.util.module_from_spec(s); "
            f"s.loader.exec_module(m); m._child({str(folder)!r}, {point!r})")
    child = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not Path(str(folder) + ".ready").exists():
        assert child.poll() is None and time.monotonic() < deadline, "child ended before reaching the kill point"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    names = sorted(p.name for p in folder.iterdir())
    temps = [n for n in names if n.endswith(".tmp")]
    assert temps if point != "before-manifest" else not temps, names
    if point == "mid-write":
        with pytest.raises(Exception):
            pq.read_table(folder / temps[0])  # the temporary file really is half a part
    for part in folder.glob("part-*.parquet"):  # every visible part is whole
        assert pq.read_table(part).num_rows == ROWS
    assert ("part-00002.parquet" in names) == (point == "before-manifest")
    with pytest.raises(CacheIncomplete, match="2 of 4 parts"):
        read_features(folder)

    w = open_writer(folder, make_spec(), n_parts=4)  # resume
    assert w.done_parts == {0, 1}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp") or p.name == "part-00002.parquet"]
    for i in range(4):
        if not w.part_done(i):
            w.write_part(i, make_part(i), dropped=i)
    assert w.parts_written == 2
    resumed = w.finish(4)

    clean = write_cache(tmp_path / "clean", n_parts=4)
    a, b = read_features(folder), read_features(tmp_path / "clean")
    assert np.array_equal(bits(a.embedding), bits(b.embedding)) and list(a.id) == list(b.id)
    assert np.array_equal(bits(a.labels), bits(b.labels)) and np.array_equal(bits(a.base_score), bits(b.base_score))
    assert np.array_equal(bits(a.embedding), bits(expected(clean, "float16")["embedding"]))
    assert resumed["fingerprint"] == read_manifest(tmp_path / "clean")["fingerprint"]


def test_stale_temp_and_unlisted_part_are_cleaned_on_open(tmp_path):
    write_cache(tmp_path / "c", n_parts=2)
    folder = tmp_path / "c"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / f".part-00003.parquet.{dead.stdout.strip()}.tmp").write_bytes(b"x")
    (folder / "part-00005.parquet").write_bytes((folder / "part-00000.parquet").read_bytes())
    manifest = json.loads((folder / C.MANIFEST).read_text())
    w = open_writer(folder, make_spec())
    assert sorted(p.name for p in folder.iterdir()) == [C.MANIFEST, "part-00000.parquet", "part-00001.parquet"]
    assert w.done_parts == {0, 1} and read_manifest(folder)["fingerprint"] == manifest["fingerprint"]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_nonfinite_rows_agrees_with_isfinite_on_every_kind_of_value(dtype):
    from pipeline.cache import nonfinite_rows

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1300, 37)) * 10).astype(dtype)  # more rows than one block, an odd width
    info = np.finfo(dtype)
    specials = [np.nan, np.inf, -np.inf, -np.nan, info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0]
    rows = rng.choice(len(x), size=len(specials) * 3, replace=False)
    for i, row in enumerate(rows):
        x[row, rng.integers(x.shape[1])] = specials[i % len(specials)]
    assert np.array_equal(nonfinite_rows(x), ~np.isfinite(x).all(1))
    assert nonfinite_rows(x).sum() == 3 * 4  # nan, inf, -inf, -nan in three rows each
    assert nonfinite_rows(x[:0]).shape == (0,)


def test_a_non_finite_feature_read_unverified_is_refused_naming_its_part_and_row(tmp_path):
    """The writer refuses NaN and inf, and the checksum catches changed bytes; read with --no-verify, a part
    patched to hold a NaN is still refused, by the value check."""
    parts = write_cache(tmp_path / "c", make_spec(storage_dtype="float32"), n_parts=2)
    part = tmp_path / "c" / "part-00001.parquet"
    data = part.read_bytes()
    value = parts[1]["embedding"][7, 3].astype(np.float32).tobytes()  # plain, uncompressed pages: in the file
    assert data.count(value) == 1
    part.write_bytes(data.replace(value, np.float32(np.nan).tobytes()))
    with pytest.raises(CacheError, match="part-00001.parquet: part has changed since it was written"):
        read_features(tmp_path / "c")
    with pytest.raises(CacheError, match=r"part-00001.parquet row 7 \(id 'p1-7'\) and 0 more rows hold non-finite "
                                         "features: the cache is damaged"):
        read_features(tmp_path / "c", verify=False)


@pytest.mark.parametrize("change, says", [
    ({"hidden_size": 12}, (f"holds embeddings of hidden size {D} stored as float16, the manifest says hidden size 12 "
                           "stored as float16")),
    ({"storage_dtype": "float32"}, (f"holds embeddings of hidden size {D} stored as float16, the manifest says "
                                    f"hidden size {D} stored as float32")),
    ({"label_names": ["a", "b", "c"]}, "holds 5 labels per row, the manifest names 3"),
])
def test_cache_info_and_the_readers_refuse_a_manifest_that_disagrees_with_its_parts(tmp_path, change, says):
    """Checksums and sizes agree (the manifest was edited, or written by something else): only the parts'
    own columns can tell, and cache info says what disagrees, as the readers do."""
    write_cache(tmp_path / "c")
    manifest = tmp_path / "c" / "_manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, **change}))
    with pytest.raises(UnusableCache, match="MANIFEST AND PARTS DISAGREE: part-00000.parquet " + says) as e:
        cache_info(tmp_path / "c")
    assert "(and 2 more)" in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(CacheError, match="part-00000.parquet: " + says):
        C.read_features(tmp_path / "c")
    m["columns"]["embedding"] = "fixed_size_list<element: halffloat not null>[99]"  # parts fine, the list is not
    manifest.write_text(json.dumps(m))
    with pytest.raises(UnusableCache, match="_manifest.json lists column 'embedding' as .*\\[99\\]"):
        cache_info(tmp_path / "c")
    m["parts"][1]["rows"] += 1  # a part's row count, with the total kept consistent
    m["rows"] += 1
    del m["columns"]
    manifest.write_text(json.dumps(m))
    with pytest.raises(UnusableCache, match=f"part-00001.parquet holds {ROWS} rows, the manifest says {ROWS + 1}"):
        cache_info(tmp_path / "c")
