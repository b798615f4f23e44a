"""Reading a feature cache into torch tensors: ``read_features``, ``read_pairs``, ``verify_cache``.

A cache is read only when its manifest says it is complete and every part has the size and the
checksum (xxh3-128, verified by default; ``verify=False`` checks sizes only) the manifest records.
The small columns come through pyarrow; the embedding
column is copied part by part into one preallocated array (``pipeline.cache.parquet_pages``: one pread
per page for a run of rows, a gather for a filtered selection), so loading 100k x 4096 rows costs
about what a numpy copy of the same bytes does (``python -m bench cache_read``).
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cache.columns import nonfinite_rows
from pipeline.cache.layout import (FORMAT_VERSION, MANIFEST, PART_KEY, PART_RE, REBUILD, SMALL_COLUMNS, CacheError,
                                   CacheIncomplete, arrow_schema)
from pipeline.cache.manifest import part_problem, read_manifest, rows_problem
from pipeline.cache.parquet_pages import copy_rows, fixed_list_blocks

if TYPE_CHECKING:  # torch is imported where tensors are made
    import torch


@dataclass
class Features:
    """Rows of a cache as tensors (embedding [N, d], labels [N, 5], base_score [N] and margin [N]
    with NaN = null, n_tokens [N]) and numpy object arrays (None = null) for the string columns."""

    embedding: torch.Tensor
    labels: torch.Tensor
    base_score: torch.Tensor
    margin: torch.Tensor
    n_tokens: torch.Tensor
    id: np.ndarray
    source: np.ndarray
    subset: np.ndarray
    pair_id: np.ndarray
    role: np.ndarray
    manifest: dict

    def __len__(self) -> int:
        return int(self.embedding.shape[0])

    def select(self, rows) -> "Features":
        """The rows ``rows`` (an index tensor or array) of every column."""
        import torch

        idx = torch.as_tensor(rows, dtype=torch.long)
        tensors = {f: getattr(self, f)[idx.to(getattr(self, f).device)]
                   for f in ("embedding", "labels", "base_score", "margin", "n_tokens")}
        arrays = {f: getattr(self, f)[idx.cpu().numpy()] for f in ("id", "source", "subset", "pair_id", "role")}
        return Features(**tensors, **arrays, manifest=self.manifest)


@dataclass
class Pairs:
    """Preference pairs: chosen[i] and rejected[i] share pair_id."""

    chosen: Features
    rejected: Features

    def __len__(self) -> int:
        return len(self.chosen)

    def select(self, rows) -> "Pairs":
        return Pairs(self.chosen.select(rows), self.rejected.select(rows))



def verify_cache(path) -> dict:
    """Check every part's size and checksum against the manifest, and its columns, hidden size, dtype and rows
    (``layout_problem``: what reading it would refuse); returns the manifest."""
    m = _open_complete(Path(path))
    _check_parts(Path(path), m, verify=True)
    for file, why in parts_layout_problems(Path(path), m).items():
        raise CacheError(f"{Path(path) / file}: {why}; {REBUILD}")
    return m


def parts_layout_problems(folder: Path, m: dict) -> dict[str, str]:
    """Part file -> what in it disagrees with the manifest (``layout_problem``, read from its footer alone)."""
    found = {}
    for p in m["parts"]:
        try:
            pf = pq.ParquetFile(folder / p["file"])
            why = layout_problem(m, pf.schema_arrow, pf.metadata.num_rows, p)
        except (pa.ArrowException, OSError) as e:  # read unverified (--no-verify) and damaged
            why = f"is not a readable Parquet part ({e})"
        if why:
            found[p["file"]] = why
    return found


def read_features(path, *, source=None, subset=None, role=None, dtype=None, device="cpu",
                  verify: bool = True) -> Features:
    """Load a complete cache into tensors. source / subset / role: a name or a list of names
    (rows whose value is one of them are kept; None = no filter). dtype: of the embedding
    (default: the storage dtype). verify: check every part's checksum first (the default)."""
    folder = Path(path)
    m = _open_complete(folder)

    def read() -> Features:
        small, starts = _read_small(folder, m)
        rows = np.flatnonzero(_mask(small, source=source, subset=subset, role=role))
        return _load(folder, m, small, starts, [rows], dtype, device)[0]

    return _verified(folder, m, verify, read)


def read_pairs(path, *, subset=None, dtype=None, device="cpu", verify: bool = True) -> Pairs:
    """Load a preferences cache as aligned pairs: chosen[i] and rejected[i] have the same pair_id."""
    folder = Path(path)
    m = _open_complete(folder)
    if m["kind"] != "preferences":
        raise CacheError(f"{folder} is a {m['kind']!r} cache; read_pairs needs a 'preferences' cache (use read_features)")

    def read() -> Pairs:
        small, starts = _read_small(folder, m)
        keep = _mask(small, subset=subset)
        chosen = np.flatnonzero(keep & _mask(small, role="chosen"))
        rejected = np.flatnonzero(keep & _mask(small, role="rejected"))
        rejected = rejected[_align(folder, m, starts, small["pair_id"].combine_chunks(), chosen, rejected)]
        return Pairs(*_load(folder, m, small, starts, [chosen, rejected], dtype, device))

    return _verified(folder, m, verify, read)


def _verified(folder: Path, m: dict, verify: bool, read):
    """``read()``, with every part's checksum computed beside it in a thread (file reads and xxhash release
    the GIL, so on two cores verifying costs little more than reading); nothing is returned before every
    part checks out, and a damaged part is what gets reported, whatever ``read()`` made of its bytes."""
    if not verify:
        return read()
    with ThreadPoolExecutor(1, thread_name_prefix="urm-verify") as pool:
        check = pool.submit(_check_parts, folder, m, True)
        try:
            out = read()
        except Exception:
            check.result()  # raises first when a part is damaged: that is the cause to name
            raise
        check.result()
    return out


def _check_parts(folder: Path, m: dict, verify: bool) -> None:
    for p in m["parts"]:
        why = part_problem(folder, p, verify)
        if why:
            raise CacheError(f"{folder / p['file']}: part {why}; run the same `urm extract` again: it rebuilds "
                             "the damaged parts only (--no-verify reads the cache unchecked)")


def _open_complete(folder: Path) -> dict:
    """The manifest of a complete cache whose parts are all there at their recorded sizes (CacheError)."""
    m = read_manifest(folder)
    if m.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{folder}: cache format {m.get('format_version')}, this package reads format "
                         f"{FORMAT_VERSION}; run `urm extract --overwrite` to rebuild it")
    if not m.get("complete"):
        total = m.get("n_parts") or "?"
        raise CacheIncomplete(f"{folder}: cache is incomplete ({len(m['parts'])} of {total} parts written, not "
                              "marked complete); run `urm extract` again to finish it")
    if why := rows_problem(m):
        raise CacheError(f"{folder / MANIFEST}: {why}: the manifest is damaged; rebuild the cache with "
                         "`urm extract --overwrite`")
    _check_parts(folder, m, verify=False)
    return m


def _read_small(folder: Path, m: dict) -> tuple[pa.Table, np.ndarray]:
    tables = []
    for p in m["parts"]:
        try:
            pf = pq.ParquetFile(folder / p["file"], memory_map=True)
            t = pf.read(columns=[c for c in SMALL_COLUMNS if c in pf.schema_arrow.names])
        except (pa.ArrowException, OSError) as e:
            raise CacheError(f"{folder / p['file']}: not a readable Parquet part ({e}); run the same `urm extract` "
                             "again to rebuild it") from None
        if why := layout_problem(m, pf.schema_arrow, pf.metadata.num_rows, p):
            raise CacheError(f"{folder / p['file']}: {why}; {REBUILD}")
        if "margin" not in t.column_names:  # written before the margin column existed: all null
            t = t.append_column(pa.field("margin", pa.float32()), pa.nulls(t.num_rows, pa.float32()))
        tables.append(t)
    starts = np.cumsum([0] + [p["rows"] for p in m["parts"]])
    small = pa.concat_tables(tables) if tables else arrow_schema(m["hidden_size"], m["storage_dtype"]).empty_table()
    return small.select(list(SMALL_COLUMNS)), starts


def layout_problem(m: dict, schema: pa.Schema, rows: int, part: dict) -> str | None:
    """What in a part file (its columns' names and types: hidden size, storage dtype, label count; its row count)
    disagrees with the manifest ``m`` and its entry ``part``, in words; None when nothing does. What the readers
    refuse a part for, and what `urm cache info` reports."""
    for f in arrow_schema(m["hidden_size"], m["storage_dtype"], len(m["label_names"])):
        if f.name not in schema.names:
            if f.name == "margin":  # written before the margin column existed: read as all null
                continue
            return f"has no column {f.name!r}, which every part holds"
        found = schema.field(f.name).type
        if found == f.type:
            continue
        if f.name == "embedding" and pa.types.is_fixed_size_list(found):
            dtype = {pa.float16(): "float16", pa.float32(): "float32"}.get(found.value_type, str(found.value_type))
            return (f"holds embeddings of hidden size {found.list_size} stored as {dtype}, the manifest says hidden "
                    f"size {m['hidden_size']} stored as {m['storage_dtype']}")
        if f.name == "labels" and pa.types.is_fixed_size_list(found):
            return f"holds {found.list_size} labels per row, the manifest names {len(m['label_names'])}"
        return f"column {f.name!r} is {found}, the manifest says {f.type}"
    if rows != part["rows"]:
        return f"holds {rows} rows, the manifest says {part['rows']}"
    recorded = (schema.metadata or {}).get(PART_KEY)
    listed = PART_RE.match(part["file"])
    if recorded is not None and listed and recorded.decode(errors="replace") != str(int(listed.group(1))):
        return (f"is part {recorded.decode(errors='replace')} by its footer, but the manifest lists it as part "
                f"{int(listed.group(1))}: another part's file was copied over it")
    return None


def _mask(small: pa.Table, **filters) -> np.ndarray:
    mask = np.ones(small.num_rows, dtype=bool)
    for name, want in filters.items():
        if want is None:
            continue
        values = [want] if isinstance(want, str) else list(want)
        hit = pc.is_in(small[name], value_set=pa.array(values, pa.string()))
        mask &= hit.to_numpy(zero_copy_only=False).astype(bool)
    return mask


def _align(folder: Path, m: dict, starts, pair_ids: pa.Array, chosen, rejected) -> np.ndarray:
    """Index into `rejected` for each chosen row (same pair_id); every pair must have both sides once."""
    pc_, pr = pair_ids.take(chosen), pair_ids.take(rejected)
    for ids, rows, side in ((pc_, chosen, "chosen"), (pr, rejected, "rejected")):
        if ids.null_count:
            row = rows[np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0]]
            raise CacheError(f"{row_location(folder, m, starts, row)}: {side} row without a pair_id")
        if pc.count_distinct(ids).as_py() != len(ids):
            counts = pc.value_counts(ids)
            dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
            raise CacheError(f"{folder}: pair_id {dup!r} has more than one {side} row; "
                             "each pair needs exactly one chosen and one rejected row (re-extract with --overwrite)")
    match = pc.index_in(pc_, value_set=pr)
    for ids, rows, has, side, other in ((pc_, chosen, match.is_valid(), "chosen", "rejected"),
                                        (pr, rejected, pc.is_in(pr, value_set=pc_), "rejected", "chosen")):
        lonely = np.flatnonzero(~has.to_numpy(zero_copy_only=False))
        if lonely.size:
            i = lonely[0]
            raise CacheError(f"{folder}: {lonely.size} pairs have a {side} row but no {other} row, e.g. pair_id "
                             f"{ids[i].as_py()!r} ({row_location(folder, m, starts, rows[i])}); every pair needs one "
                             "chosen and one rejected row: re-extract with `urm extract --overwrite`")
    return match.to_numpy(zero_copy_only=False).astype(np.int64)


def row_location(folder: Path, m: dict, starts, row: int) -> str:
    """Where global row ``row`` of a cache lies, for messages: ``<part file> row <row within the part>``."""
    part = int(np.searchsorted(starts, row, side="right")) - 1
    return f"{folder / m['parts'][part]['file']} row {int(row - starts[part])}"


def _load(folder: Path, m: dict, small: pa.Table, starts, row_sets: list, dtype, device) -> list[Features]:
    import torch

    d = m["hidden_size"]
    np_dtype, torch_dtype = _out_dtype(dtype, m["storage_dtype"])
    outs = [np.empty((len(rows), d), dtype=np_dtype) for rows in row_sets]  # numpy asks for huge pages
    gather_embeddings(folder, m, starts, list(zip(row_sets, outs)))
    result = []
    for rows, out in zip(row_sets, outs):
        everything = len(rows) == small.num_rows and np.array_equal(rows, np.arange(len(rows)))
        t = small if everything else small.take(pa.array(rows, pa.int64()))
        emb = torch.from_numpy(out)
        labels = fixed_list_numpy(t["labels"], len(m["label_names"]))
        _check_values(folder, m, starts, rows, out, labels, t)
        emb = emb if torch_dtype is None else emb.to(torch_dtype)
        base, margin = (pc.fill_null(t[c], float("nan")).to_numpy().astype(np.float32)
                        for c in ("base_score", "margin"))
        tensors = [emb, torch.from_numpy(labels), torch.from_numpy(base), torch.from_numpy(margin),
                   torch.from_numpy(t["n_tokens"].to_numpy().astype(np.int32))]
        if str(device) != "cpu":
            tensors = [x.to(device) for x in tensors]
        strings = [t[c].to_numpy(zero_copy_only=False) for c in ("id", "source", "subset", "pair_id", "role")]
        result.append(Features(*tensors, *strings, manifest=copy.deepcopy(m)))
    return result


def _check_values(folder: Path, m: dict, starts, rows, emb: np.ndarray, labels: np.ndarray, t: pa.Table) -> None:
    """No row may hold a non-finite feature, or an infinite label (NaN is a missing label): such values
    mean a damaged or foreign cache (the writer refuses non-finite features)."""
    bad_label = np.any(np.isinf(labels), axis=1)
    for bad, what in ((nonfinite_rows(emb), "non-finite features"), (bad_label, "infinite labels")):
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise CacheError(f"{row_location(folder, m, starts, rows[first])} (id {t['id'][first].as_py()!r}) and "
                             f"{int(bad.sum()) - 1} more rows hold {what}: the cache is damaged; rebuild it with "
                             "`urm extract --overwrite`")


def _out_dtype(dtype, storage: str):
    """numpy dtype to fill, and a torch dtype to convert to afterwards (None = no conversion)."""
    name = storage if dtype is None else str(dtype).replace("torch.", "")
    name = {"half": "float16", "float": "float32", "bf16": "bfloat16"}.get(name, name)
    if name in ("float16", "float32"):
        return np.dtype(name), None
    if name == "bfloat16":
        import torch

        return np.dtype(np.float32), torch.bfloat16
    raise ValueError(f"dtype must be float16, float32 or bfloat16, got {dtype!r}")


def fixed_list_numpy(col: pa.ChunkedArray, width: int) -> np.ndarray:
    """A fixed-size-list column (labels) as a float32 array [rows, width]."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return np.array(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)


def gather_embeddings(folder: Path, m: dict, starts, targets: list) -> None:
    """Fill each out[j] = embedding of global row src[j], for every (src, out) in targets, reading
    each part's embedding column once (parts with no selected row are not opened)."""
    prepared = []
    for src, out in targets:
        ascending = bool(np.all(src[1:] > src[:-1]))  # then every slice of it maps to a run of out
        order = np.arange(len(src)) if ascending else np.argsort(src, kind="stable")
        prepared.append((src[order], order, out, ascending))
    for p, start in zip(m["parts"], starts):
        end = start + p["rows"]
        if all(np.searchsorted(s, start) == np.searchsorted(s, end) for s, *_ in prepared):
            continue
        for block in _embedding_blocks(folder / p["file"], m):
            lo = start + block.row
            for s, order, out, ascending in prepared:
                a, b = np.searchsorted(s, lo), np.searchsorted(s, lo + block.rows)
                if a < b:
                    copy_rows(block, s[a:b] - lo, order[a:b], out, ascending)


def _embedding_blocks(file: Path, m: dict):
    """A part's embedding column in blocks of rows, once its type is checked against the manifest."""
    expected = arrow_schema(m["hidden_size"], m["storage_dtype"]).field("embedding").type
    found = pq.read_schema(file).field("embedding").type
    if found != expected:
        raise CacheError(f"{file}: column 'embedding' is {found}, the manifest says {expected}; "
                         "run `urm extract --overwrite` to rebuild the cache")
    return fixed_list_blocks(file, "embedding", m["hidden_size"], np.dtype(m["storage_dtype"]))



def row_index(path, *, pairs: bool, verify: bool = True) -> tuple[dict, np.ndarray, list[np.ndarray], pa.Table]:
    """Where a cache's samples lie, without reading a feature: (manifest, each part's first global row,
    [every row] for ratings or [chosen rows, rejected rows] aligned by pair_id for pairs, the small columns).
    verify: every part's checksum is checked first (the default), else sizes only."""
    folder = Path(path)
    m = _open_complete(folder)
    if pairs and m["kind"] != "preferences":
        raise CacheError(f"{folder} is a {m['kind']!r} cache; pairs need a 'preferences' cache")
    _check_parts(folder, m, verify)
    small, starts = _read_small(folder, m)
    if not pairs:
        return m, starts, [np.arange(small.num_rows)], small
    chosen = np.flatnonzero(_mask(small, role="chosen"))
    rejected = np.flatnonzero(_mask(small, role="rejected"))
    rejected = rejected[_align(folder, m, starts, small["pair_id"].combine_chunks(), chosen, rejected)]
    return m, starts, [chosen, rejected], small
