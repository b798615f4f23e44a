"""The Parquet feature cache: its on-disk format, and the writer that fills it in crash-safe parts.

Owns the layout of a cached dataset, the check that refuses to mix features made with other
settings, and resumable atomic writing (`open_writer`). Reading it back into tensors is
`pipeline.cache_reader`; the fast page reader under that is `pipeline.parquet_pages`.

One cached dataset is one folder, e.g. cache/demo/ratings/:
  part-00000.parquet, part-00001.parquet, ...  plain Parquet, columns below
  _manifest.json    what made the features (backbone + revision, template hash, max_length, dtype,
                    dataset fingerprint, ...), each part's rows + size + sha256 + xxh3-128, `complete`, and a
                    content `fingerprint` that downstream artifacts record.
The manifest's name starts with "_" (the Hive/Spark convention for sidecar files such as
`_SUCCESS`), so Parquet readers that open the whole folder skip it; temporary files start with ".".

Columns: id string, source string, subset string?, pair_id string?, role string? ("chosen" |
"rejected"), n_tokens int32, embedding fixed_size_list<float16|float32>[d], labels
fixed_size_list<float32>[5] (NaN = missing; all NaN for pairs), base_score float32? (null = none),
margin float32? (a pair's preference strength, on both of its rows; null = none). Caches written
before the margin column existed still read (margin all null).

How to open a cache without this package (plain Parquet; checked with pandas 3.1, polars 2.1 and
duckdb 2.0, float16 and float32 caches):
    import numpy as np, pandas as pd
    df = pd.read_parquet("cache/demo/ratings")               # embedding: one numpy array per row
    X = np.stack(df["embedding"].to_numpy())                # [N, d]
    import polars as pl
    df = pl.read_parquet("cache/demo/ratings/*.parquet")     # embedding: Array(Float16, d)
    import duckdb
    duckdb.sql("SELECT source, role, count(*) FROM 'cache/demo/ratings/*.parquet' GROUP BY ALL")

Crash safety: a part is written under a temporary name in the same folder, fsynced, then renamed
(pipeline.atomic), so no reader ever sees half a part; the manifest is rewritten the same way after
every part. A writer that opens an existing cache removes stale temporary files, drops part files
the manifest does not list (killed between rename and manifest update) and listed parts whose
size changed, and skips the rest (`part_done`). `finish()` marks the cache complete; readers
refuse an incomplete cache.

Many writers (torchrun ranks, `pipeline.distributed`): rank 0 opens the cache with `open_writer` (the
lock, the checks and clean-up above) while the others wait; then each rank writes its own parts with
a `RankWriter`, which records them in the rank's journal `_parts.rank-NNNNN.json` (rewritten
atomically after each part) instead of the manifest. Once every rank is done, rank 0 folds the
journals into the manifest (`merge_journals`) and finishes. A writer that opens a cache folds in any
journals left by a killed run first, so the parts they list count as done, with any number of ranks.

Speed: the embedding column is written uncompressed, PLAIN, without dictionary or statistics, in
data pages v2 of 8 MB, the layout `pipeline.parquet_pages` reads straight from the file.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import ATTRIBUTES, __version__
from pipeline.atomic import atomic_write
from pipeline.errors import UserError
from pipeline.sources import file_sha256, file_xxh3

FORMAT_VERSION = 1
MANIFEST = "_manifest.json"
FIX = "pass --overwrite to replace it, or choose another --cache-dir"
REBUILD = "rebuild the cache: the same `urm extract` with --overwrite"
KINDS = ("ratings", "preferences")
STORAGE_DTYPES = ("float16", "float32")
ROLES = ("chosen", "rejected")
FP16_MAX = 65504.0
ROW_GROUP_BYTES = 256 << 20  # embedding bytes per row group: large groups read fastest
DATA_PAGE_BYTES = 8 << 20  # large pages: fewer page headers to walk when reading
SMALL_COLUMNS = ("id", "source", "subset", "pair_id", "role", "n_tokens", "labels", "base_score", "margin")
REQUIRED_COLUMNS = ("id", "source", "n_tokens", "embedding")
# Fields that decide what the features are: a cache that differs in any of them is refused.
COMPAT_FIELDS = ("format_version", "kind", "backbone", "backbone_revision", "hidden_size",
                 "storage_dtype", "max_length", "chat_template_hash", "dataset_fingerprint",
                 "label_names", "extra")
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")
_JOURNAL_RE = re.compile(r"^_parts\.rank-(\d+)\.json$")
_TMP_RE = re.compile(r"^\.(?:part-\d+\.parquet|_manifest\.json|_parts\.rank-\d+\.json)\.(\d+)\.tmp$")


class CacheError(UserError):
    """A cache that cannot be read or written as asked; the message names the file and the fix."""


class CacheMismatch(CacheError):
    """An existing cache was made with other settings than this run's."""


class CacheIncomplete(CacheError):
    """The cache's writer has not finished (or was killed): some parts are missing."""


class CacheInputError(CacheError, ValueError):
    """Columns handed to `write_part` have the wrong shape, type or values."""


@dataclass
class CacheSpec:
    """What makes the features: every field but `dataset` must match to resume or reuse a cache.

    `extra` holds anything else that changes the content (compute dtype, rows per part, ...); it
    is compared too. Run information that does not (timings) goes to `finish(extra=...)`.
    """

    backbone: str
    backbone_revision: str | None  # commit hash, or a hash of the weights file
    hidden_size: int
    storage_dtype: str  # "float16" | "float32"
    max_length: int
    chat_template_hash: str
    dataset: str
    dataset_fingerprint: str
    kind: str  # "ratings" | "preferences"
    label_names: list[str] = field(default_factory=lambda: list(ATTRIBUTES))
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if int(self.hidden_size) <= 0 or int(self.max_length) <= 0:
            raise ValueError(f"hidden_size and max_length must be positive, got {self.hidden_size}, {self.max_length}")
        self.hidden_size, self.max_length = int(self.hidden_size), int(self.max_length)
        self.label_names = list(self.label_names)
        self.extra = _json_normal(self.extra)


def arrow_schema(hidden_size: int, storage_dtype: str, n_labels: int = len(ATTRIBUTES)) -> pa.Schema:
    """The schema of every part file."""
    value = pa.float16() if storage_dtype == "float16" else pa.float32()
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("subset", pa.string()),
        pa.field("pair_id", pa.string()),
        pa.field("role", pa.string()),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("element", value, nullable=False), hidden_size), nullable=False),
        pa.field("labels", pa.list_(pa.field("element", pa.float32(), nullable=False), n_labels), nullable=False),
        pa.field("base_score", pa.float32()),
        pa.field("margin", pa.float32()),
    ])


def _parquet_options() -> dict:
    leaf = {"embedding": "embedding.list.element", "labels": "labels.list.element"}
    compression = {leaf.get(c, c): "zstd" for c in SMALL_COLUMNS}
    compression[leaf["embedding"]] = "none"
    return dict(
        compression=compression,
        use_dictionary=["source", "subset", "role"],
        write_statistics=["source", "subset", "role", "n_tokens", "base_score", "margin"],
        data_page_version="2.0",
        data_page_size=DATA_PAGE_BYTES,
    )


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def journal_name(rank: int) -> str:
    """The file in which torchrun rank ``rank`` lists the parts it wrote, until rank 0 merges it."""
    return f"_parts.rank-{rank:05d}.json"


# --------------------------------------------------------------------------------------- writing


def open_writer(path, spec: CacheSpec, *, overwrite: bool = False, n_parts: int | None = None,
                verify: bool = True) -> CacheWriter:
    """Open (create or resume) the cache at `path` for writing `spec`'s features.

    An existing cache made with other settings raises CacheMismatch naming each differing field,
    unless `overwrite` (then its parts and manifest are removed first). `n_parts`, when known,
    is recorded (so a half-written cache can say "N of M parts") and must match on resume.
    `verify` checks every done part's checksum (otherwise only its size): a damaged part is dropped
    and so written again.
    """
    return CacheWriter(Path(path), spec, overwrite=overwrite, n_parts=n_parts, verify=verify)


class CacheWriter:
    """Writes the parts of one cache atomically; `done_parts` are those a resumed run can skip.

    One writer at a time: it holds an exclusive lock on the cache folder (``fcntl.flock`` on the folder
    itself, so no lock file is left behind; the kernel releases it if the process dies) from opening
    until ``finish`` or ``close``, and a second writer is refused at once. Under torchrun, rank 0's writer
    holds it for the whole run while every rank writes its parts through a ``RankWriter``.
    """

    def __init__(self, folder: Path, spec: CacheSpec, *, overwrite: bool, n_parts: int | None, verify: bool):
        self.folder, self.spec, self._lock = folder, spec, None
        self.parts_written = 0  # by this writer
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(folder)
        try:
            self._open(overwrite, n_parts, verify)
        except BaseException:
            self.close()
            raise

    def _open(self, overwrite: bool, n_parts: int | None, verify: bool) -> None:
        folder, spec = self.folder, self.spec
        _remove_stale_temps(folder)
        if overwrite:
            _remove_cache_files(folder)
        old = read_manifest(folder) if (folder / MANIFEST).exists() else None
        if old is not None:
            _check_compatible(folder, old, spec, n_parts)
        self.manifest = old or _new_manifest(spec)
        if n_parts is not None:
            self.manifest["n_parts"] = int(n_parts)
        self._parts = {int(p["index"]): p for p in self.manifest["parts"]}
        journals = self._fold_journals()  # parts written by the ranks of a killed torchrun run
        lost = self._drop_bad_parts(verify)  # listed parts that are gone or changed: not complete now
        if lost:
            self.manifest.update(complete=False, completed=None)
        stray = _remove_unlisted_parts(folder, self._parts)  # e.g. killed between rename and manifest
        if old is None or lost or stray or journals or n_parts is not None:
            self._save()
        _remove(journals)  # their parts are in the manifest now

    def close(self) -> None:
        """Release the folder's lock (``finish`` does too); the writer writes nothing more."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    @property
    def done_parts(self) -> set[int]:
        return set(self._parts)

    def part_done(self, index: int) -> bool:
        return int(index) in self._parts

    def write_part(self, index: int, columns: dict, dropped: int = 0) -> dict:
        """Write part `index` atomically (replacing it if done) and record it in the manifest.

        `columns`: id, source, n_tokens, embedding [n, d] (np.ndarray or torch tensor; cast to the
        storage dtype after a range check), optional subset, pair_id, role (arrays, or one string
        for the whole part), labels [n, 5] float32 (NaN = missing; default all NaN), base_score and
        margin [n] (NaN or None = null). `dropped`: rows of this part's input left out (too long).
        """
        entry = _write_part_file(self.folder, self.spec, self.manifest, index, columns, dropped)
        self._parts[entry["index"]] = entry
        self.manifest.update(complete=False, fingerprint=None, completed=None)
        self._save()
        self.parts_written += 1
        return dict(entry)

    def finish(self, n_parts: int, extra: dict | None = None) -> dict:
        """Mark the cache complete once parts 0..n_parts-1 are all written; returns the manifest.

        `extra`: run information recorded under manifest["info"] (not compared on resume).
        """
        missing = [i for i in range(n_parts) if i not in self._parts]
        if missing:
            raise CacheIncomplete(f"{self.folder}: cannot finish: {len(missing)} of {n_parts} parts not written "
                                  f"(first missing: {part_name(missing[0])})")
        for i in [i for i in self._parts if i >= n_parts]:  # left by an earlier run with more parts
            (self.folder / self._parts.pop(i)["file"]).unlink(missing_ok=True)
        m = self.manifest
        m.update(n_parts=int(n_parts), complete=True, completed=_now(), info=_json_normal(extra or {}))
        self._save()
        self.close()
        return copy.deepcopy(self.manifest)

    def merge_journals(self) -> None:
        """Fold the ranks' journals into the manifest (torchrun, rank 0, after every rank is done).

        Each listed part's size is checked (its checksum was computed by the rank that wrote it).
        """
        journals = self._fold_journals()
        lost = self._drop_bad_parts(verify=False)
        if lost:
            self.manifest.update(complete=False, completed=None)
        self._save()
        _remove(journals)

    def _fold_journals(self) -> list[Path]:
        """Add the parts listed in the folder's rank journals; returns the journal files read.

        A journal is ignored when unreadable or made for other settings, and so is an entry that is
        malformed, outside n_parts or already listed; the parts it names are then written again (an
        unlisted part file is removed).
        """
        key, n_parts = _settings_key(self.manifest), self.manifest.get("n_parts")
        files = sorted(f for f in self.folder.iterdir() if _JOURNAL_RE.match(f.name))
        for f in files:
            journal = _read_journal(f)
            if journal is None or journal.get("settings") != key:
                continue
            for entry in journal["parts"]:
                index = entry.get("index")
                if (_whole(index) and index not in self._parts and (n_parts is None or index < n_parts)
                        and entry.get("file") == part_name(index) and _part_entry_problem(entry) is None
                        and isinstance(entry.get("sha256"), str)):
                    self._parts[index] = entry
        return files

    def _drop_bad_parts(self, verify: bool) -> bool:
        bad = {i: why for i, p in self._parts.items() if (why := part_problem(self.folder, p, verify))}
        for i in bad:
            (self.folder / self._parts.pop(i)["file"]).unlink(missing_ok=True)
        return bool(bad)

    def _save(self) -> None:
        m = self.manifest
        m["parts"] = [self._parts[i] for i in sorted(self._parts)]
        m["rows"] = sum(p["rows"] for p in m["parts"])
        m["dropped_rows"] = sum(p["dropped"] for p in m["parts"])
        m["updated"] = _now()
        m["fingerprint"] = _fingerprint(m) if m["complete"] else None
        data = (json.dumps(m, indent=1) + "\n").encode()
        atomic_write(self.folder / MANIFEST, lambda tmp: tmp.write_bytes(data))


def open_rank_writer(path, spec: CacheSpec, manifest: dict, rank: int) -> RankWriter:
    """The writer of torchrun rank ``rank``'s parts, once rank 0 has opened the cache (``manifest`` is rank 0's
    ``writer.manifest``): no lock, no clean-up, no manifest writes; rank 0 merges its journal."""
    return RankWriter(Path(path), spec, manifest, rank)


class RankWriter:
    """Writes one torchrun rank's parts atomically and lists each in the rank's journal.

    The ranks of one run write disjoint parts, so they never write the same file; each journal is
    rewritten atomically after each part, so it lists exactly the parts that are complete.
    """

    def __init__(self, folder: Path, spec: CacheSpec, manifest: dict, rank: int):
        self.folder, self.spec, self.manifest, self.rank = folder, spec, manifest, int(rank)
        self.parts: dict[int, dict] = {}
        self.parts_written = 0

    def write_part(self, index: int, columns: dict, dropped: int = 0) -> dict:
        """As ``CacheWriter.write_part``, recorded in this rank's journal instead of the manifest."""
        entry = _write_part_file(self.folder, self.spec, self.manifest, index, columns, dropped)
        self.parts[entry["index"]] = entry
        journal = {"format": "urm-feature-cache-journal", "rank": self.rank, "host": socket.gethostname(),
                   "pid": os.getpid(), "settings": _settings_key(self.manifest), "updated": _now(),
                   "parts": [self.parts[i] for i in sorted(self.parts)]}
        data = (json.dumps(journal, indent=1) + "\n").encode()
        atomic_write(self.folder / journal_name(self.rank), lambda tmp: tmp.write_bytes(data))
        self.parts_written += 1
        return dict(entry)


def _write_part_file(folder: Path, spec: CacheSpec, manifest: dict, index: int, columns: dict, dropped: int) -> dict:
    """Write part ``index`` atomically; its manifest entry (file, size, checksums, rows, dropped)."""
    index, total = int(index), manifest.get("n_parts")
    if index < 0 or (total is not None and index >= total):
        raise CacheInputError(f"{folder}: part index {index} is outside 0..{(total or 1) - 1} (n_parts {total})")
    name = part_name(index)
    table = _build_table(spec, columns, folder / name)
    written = {f.name: str(f.type) for f in table.schema}
    if manifest["columns"] != written:  # parts of one cache share one schema
        missing = sorted(set(written) - set(manifest["columns"]))
        raise CacheMismatch(f"{folder} was written by an older version of this package (without the "
                            f"column(s) {missing}); {FIX}.")
    entry = _write_parquet_atomic(folder, name, table, _row_group_rows(spec))
    return {"index": index, **entry, "rows": table.num_rows, "dropped": int(dropped)}


def _settings_key(manifest: dict) -> str:
    """What a journal must have been written for: the manifest's settings and part count."""
    content = {k: manifest.get(k) for k in COMPAT_FIELDS}
    content.update(n_parts=manifest.get("n_parts"), columns=manifest.get("columns"))
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _read_journal(file: Path) -> dict | None:
    try:
        journal = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = isinstance(journal, dict) and isinstance(journal.get("parts"), list)
    return journal if ok and all(isinstance(p, dict) for p in journal["parts"]) else None


def _remove(files: list[Path]) -> None:
    for f in files:
        f.unlink(missing_ok=True)


def _lock(folder: Path) -> int:
    """An open descriptor of ``folder`` holding its exclusive lock; CacheError when another writer has it."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheError(f"{folder}: another `urm extract` is writing this cache now; wait for it to finish (or "
                         "stop it), then run this one again: it resumes from the parts that one wrote") from None
    return fd


def _new_manifest(spec: CacheSpec) -> dict:
    return {
        "format": "urm-feature-cache", "format_version": FORMAT_VERSION, "package_version": __version__,
        "kind": spec.kind, "backbone": spec.backbone, "backbone_revision": spec.backbone_revision,
        "hidden_size": spec.hidden_size, "storage_dtype": spec.storage_dtype, "max_length": spec.max_length,
        "chat_template_hash": spec.chat_template_hash, "dataset": spec.dataset,
        "dataset_fingerprint": spec.dataset_fingerprint, "label_names": spec.label_names, "extra": spec.extra,
        "columns": {f.name: str(f.type) for f in arrow_schema(spec.hidden_size, spec.storage_dtype, len(spec.label_names))},
        "created": _now(), "updated": None, "completed": None, "complete": False, "n_parts": None,
        "rows": 0, "dropped_rows": 0, "parts": [], "fingerprint": None, "info": {},
    }


def _check_compatible(folder: Path, old: dict, spec: CacheSpec, n_parts: int | None) -> None:
    new = _new_manifest(spec)
    diffs = []
    for key in COMPAT_FIELDS:
        if key == "extra":
            a, b = old.get("extra") or {}, new["extra"]
            diffs += [(f"extra.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif old.get(key) != new[key]:
            diffs.append((key, old.get(key), new[key]))
    if n_parts is not None and old.get("n_parts") not in (None, n_parts):
        diffs.append(("n_parts", old["n_parts"], n_parts))
    if diffs:
        lines = "\n".join(f"  {k}: cache has {a!r}, this run has {b!r}" for k, a, b in diffs)
        raise CacheMismatch(f"{folder} holds features made with other settings:\n{lines}\n{FIX}.")


def _row_group_rows(spec: CacheSpec) -> int:
    return max(1, ROW_GROUP_BYTES // (spec.hidden_size * np.dtype(spec.storage_dtype).itemsize))


def _build_table(spec: CacheSpec, columns: dict, where: Path) -> pa.Table:
    unknown = set(columns) - set(SMALL_COLUMNS) - {"embedding"}
    missing = [c for c in REQUIRED_COLUMNS if columns.get(c) is None]
    if unknown or missing:
        raise CacheInputError(f"{where}: columns: unknown {sorted(unknown)}, missing {missing}; "
                              f"expected {list(REQUIRED_COLUMNS)} and optionally subset, pair_id, role, labels, base_score")
    emb = _as_numpy(columns["embedding"])
    if emb.ndim != 2 or emb.shape[1] != spec.hidden_size:
        raise CacheInputError(f"{where}: column 'embedding' has shape {emb.shape}, expected [rows, {spec.hidden_size}] "
                              f"(hidden_size of {spec.backbone})")
    n, n_labels = emb.shape[0], len(spec.label_names)
    ids = _strings(columns["id"], n, "id", where, nullable=False)
    arrays = {
        "id": ids,
        "source": _strings(columns["source"], n, "source", where, nullable=False),
        "subset": _strings(columns.get("subset"), n, "subset", where),
        "pair_id": _strings(columns.get("pair_id"), n, "pair_id", where),
        "role": _roles(columns.get("role"), n, where),
        "n_tokens": pa.array(_numbers(columns["n_tokens"], (n,), "n_tokens", where, np.int32)),
        "embedding": _embedding(emb, spec, ids, where),
        "labels": _fixed_list(_labels(columns.get("labels"), n, n_labels, where), pa.float32()),
        "base_score": _nullable_floats(columns.get("base_score"), n, "base_score", where),
        "margin": _nullable_floats(columns.get("margin"), n, "margin", where),
    }
    schema = arrow_schema(spec.hidden_size, spec.storage_dtype, n_labels)
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor (bf16 has no numpy dtype)
        x = x.detach().cpu()
        x = x if str(x.dtype) in ("torch.float16", "torch.float32") else x.float()
        return x.numpy()
    return np.asarray(x)


def _strings(values, n: int, name: str, where: Path, nullable: bool = True) -> pa.Array:
    if values is None:
        if not nullable:
            raise CacheInputError(f"{where}: column {name!r} is required")
        return pa.nulls(n, pa.string())
    if isinstance(values, str):
        return pa.array(np.full(n, values, dtype=object), pa.string())
    try:
        arr = pa.array(values, pa.string()) if not isinstance(values, pa.Array) else values.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise CacheInputError(f"{where}: column {name!r} must hold strings: {e}") from None
    if len(arr) != n:
        raise CacheInputError(f"{where}: column {name!r} has {len(arr)} rows but embedding has {n}")
    if not nullable and arr.null_count:
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise CacheInputError(f"{where}: column {name!r}, row {row}: missing value (required)")
    return arr


def _roles(values, n: int, where: Path) -> pa.Array:
    arr = _strings(values, n, "role", where)
    ok = pc.fill_null(pc.or_kleene(arr.is_null(), pc.is_in(arr, value_set=pa.array(ROLES))), True)
    bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
    if bad.size:
        row = int(bad[0])
        raise CacheInputError(f"{where}: column 'role', row {row}: {arr[row].as_py()!r} is not one of {ROLES} or null")
    return arr


def _numbers(values, shape: tuple, name: str, where: Path, dtype) -> np.ndarray:
    arr = _as_numpy(values)
    if arr.shape != shape:
        raise CacheInputError(f"{where}: column {name!r} has shape {arr.shape}, expected {list(shape)}")
    if np.dtype(dtype).kind == "i":
        if arr.dtype.kind not in "iu":
            raise CacheInputError(f"{where}: column {name!r} must hold integers, got {arr.dtype}")
        info = np.iinfo(dtype)
        bad = np.flatnonzero((arr < 0) | (arr > info.max))
        if bad.size:
            raise CacheInputError(f"{where}: column {name!r}, row {bad[0]}: {arr[bad[0]]} is out of range")
    return np.ascontiguousarray(arr, dtype=dtype)


def _labels(values, n: int, k: int, where: Path) -> np.ndarray:
    if values is None:
        return np.full((n, k), np.nan, np.float32)
    return _numbers(values, (n, k), "labels", where, np.float32)


def _nullable_floats(values, n: int, name: str, where: Path) -> pa.Array:
    """[n] floats, NaN or None = null (base_score, margin)."""
    if values is None:
        return pa.nulls(n, pa.float32())
    if not isinstance(values, np.ndarray) and not hasattr(values, "numpy"):
        values = [np.nan if v is None else v for v in values]
    arr = _numbers(values, (n,), name, where, np.float32)
    return pa.array(arr, pa.float32(), mask=np.isnan(arr))


def _fixed_list(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    typ = pa.list_(pa.field("element", value_type, nullable=False), values.shape[1])
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), value_type), type=typ)


def _embedding(x: np.ndarray, spec: CacheSpec, ids: pa.Array, where: Path) -> pa.Array:
    if x.dtype.kind != "f":
        raise CacheInputError(f"{where}: column 'embedding' must be floating point, got {x.dtype}")
    fp16 = spec.storage_dtype == "float16"
    row = _first_bad_row(x, FP16_MAX if fp16 else float(np.finfo(np.float32).max))
    if row is not None:
        raise CacheInputError(_bad_embedding_message(x[row], row, ids[row].as_py(), fp16, where))
    return _fixed_list(np.ascontiguousarray(x, dtype=spec.storage_dtype), pa.float16() if fp16 else pa.float32())


def _first_bad_row(x: np.ndarray, limit: float) -> int | None:
    """First row holding a non-finite value or one with |value| > limit, without a temporary copy."""
    if x.dtype == np.float16:  # no finite float16 exceeds the limit
        bad = nonfinite_rows(x)
    else:
        with np.errstate(invalid="ignore"):
            bad = ~((x.max(axis=1, initial=-np.inf) <= limit) & (x.min(axis=1, initial=np.inf) >= -limit))
    rows = np.flatnonzero(bad)
    return int(rows[0]) if rows.size else None


def nonfinite_rows(x: np.ndarray, block: int = 512) -> np.ndarray:
    """Which rows of the float16 / float32 matrix ``x`` hold a NaN or an infinity: the exponent bits all set
    (|bits| >= the bits of +inf), tested a block of rows at a time so the scratch stays in cache (20 GB/s
    here, where np.isfinite manages 2 and torch.isfinite 1 on float16)."""
    uint, inf, magnitude = {2: (np.uint16, 0x7C00, 0x7FFF), 4: (np.uint32, 0x7F800000, 0x7FFFFFFF)}[x.dtype.itemsize]
    bits, bad = x.view(uint), np.zeros(len(x), bool)
    scratch = np.empty((min(block, len(x)), x.shape[1]), uint)
    for i in range(0, len(x), block):
        chunk = bits[i:i + block]
        np.bitwise_and(chunk, magnitude, out=scratch[:len(chunk)])  # drop the sign bit
        bad[i:i + block] = scratch[:len(chunk)].max(1, initial=0) >= inf
    return bad


def _bad_embedding_message(values: np.ndarray, row: int, row_id, fp16: bool, where: Path) -> str:
    v = values.astype(np.float64)
    n_nan, n_inf = int(np.isnan(v).sum()), int(np.isinf(v).sum())
    head = f"{where}: column 'embedding', row {row} (id {row_id!r}): "
    if n_nan or n_inf:
        return (head + f"{n_nan} NaN and {n_inf} infinite values; nothing was written. Non-finite features "
                "are never stored: check the backbone's compute dtype (a bf16/fp16 overflow?), or drop this row.")
    return (head + f"max |value| {np.abs(v).max():.6g} is outside the float16 range (|x| <= 65504); nothing was "
            "written. Use --storage-dtype float32.")


def _write_parquet_atomic(folder: Path, name: str, table: pa.Table, row_group_rows: int) -> dict:
    def write(tmp: Path) -> None:
        with pq.ParquetWriter(str(tmp), table.schema, **_parquet_options()) as w:
            w.write_table(table, row_group_size=row_group_rows)

    path = atomic_write(folder / name, write)
    return {"file": name, "bytes": path.stat().st_size, "sha256": file_sha256(path), "xxh3_128": file_xxh3(path)}


def _remove_stale_temps(folder: Path) -> None:
    for f in folder.iterdir():
        m = _TMP_RE.match(f.name)
        if m and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            f.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_cache_files(folder: Path) -> None:
    for f in folder.iterdir():
        if _PART_RE.match(f.name) or _JOURNAL_RE.match(f.name) or f.name == MANIFEST:
            f.unlink()


def _remove_unlisted_parts(folder: Path, parts: dict) -> bool:
    listed = {p["file"] for p in parts.values()}
    stray = [f for f in folder.iterdir() if _PART_RE.match(f.name) and f.name not in listed]
    for f in stray:
        f.unlink()
    return bool(stray)


def part_problem(folder: Path, part: dict, verify: bool) -> str | None:
    """Why a part listed in the manifest cannot be used (missing, resized, and with ``verify`` changed:
    its xxh3-128, or for a part written before that was recorded its sha256), or None."""
    path = folder / part["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size != part["bytes"]:
        return f"has {size} bytes, the manifest says {part['bytes']}"
    if verify:
        if "xxh3_128" in part and file_xxh3(path) != part["xxh3_128"]:
            return "has changed since it was written (its checksum differs)"
        if "xxh3_128" not in part and file_sha256(path) != part["sha256"]:
            return "has changed since it was written (its sha256 differs)"
    return None


def _fingerprint(m: dict) -> str:
    content = {k: m.get(k) for k in COMPAT_FIELDS}
    content["parts"] = [p["sha256"] for p in m["parts"]]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _json_normal(obj):
    try:
        return json.loads(json.dumps(obj))
    except TypeError as e:
        raise ValueError(f"cache spec/info must be JSON-serialisable: {e}") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(path) -> dict:
    """The manifest of the cache folder ``path`` (CacheError when there is none or it is unreadable)."""
    folder = Path(path)
    file = folder / MANIFEST
    if not file.exists():
        raise CacheError(f"{folder}: no {MANIFEST}, so this is not a feature cache; run `urm extract` to build it")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{file}: unreadable manifest ({e}); {REBUILD}") from None
    problem = manifest_problem(manifest)
    if problem:
        raise CacheError(f"{file}: not a cache manifest this version reads ({problem}); {REBUILD}")
    return manifest


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


MANIFEST_TYPES = {  # key: (check, what it must be)
    "format_version": (_whole, "a whole number"), "kind": (lambda v: v in KINDS, " or ".join(KINDS)),
    "backbone": (lambda v: isinstance(v, str), "a string"), "hidden_size": (lambda v: _whole(v) and v > 0,
                                                                           "a positive whole number"),
    "storage_dtype": (lambda v: v in STORAGE_DTYPES, " or ".join(STORAGE_DTYPES)),
    "max_length": (lambda v: _whole(v) and v > 0, "a positive whole number"),
    "label_names": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names"),
    "parts": (lambda v: isinstance(v, list), "a list"), "rows": (_whole, "a whole number"),
    "complete": (lambda v: isinstance(v, bool), "true or false"),
}
PART_TYPES = {"file": (lambda v: isinstance(v, str) and _PART_RE.match(v) is not None,
                       "a part file name (part-NNNNN.parquet)"),
              "rows": (_whole, "a whole number"), "bytes": (_whole, "a whole number")}


def rows_problem(m: dict) -> str | None:
    """A manifest whose row count is not the sum of its parts' is damaged: what it says, or None."""
    held = sum(p["rows"] for p in m["parts"])
    return None if m["rows"] == held else f"says {m['rows']} rows but its parts hold {held}"


def manifest_problem(m) -> str | None:
    """What makes ``m`` not a manifest: a missing or mistyped key, or a part entry without its file name,
    rows, size and checksum; None when it is one."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not an object"
    for key, (ok, what) in MANIFEST_TYPES.items():
        if key not in m:
            return f"no {key!r}"
        if not ok(m[key]):
            return f"{key!r} must be {what}, got {m[key]!r}"
    for i, part in enumerate(m["parts"]):
        if not isinstance(part, dict):
            return f"parts[{i}] is not an object"
        problem = _part_entry_problem(part)
        if problem:
            return f"parts[{i}]{problem}"
    return None


def _part_entry_problem(part: dict) -> str | None:
    for key, (ok, what) in PART_TYPES.items():
        if not ok(part.get(key)):
            return f".{key} must be {what}, got {part.get(key)!r}"
    if not isinstance(part.get("xxh3_128", part.get("sha256")), str):
        return " has no checksum (xxh3_128 or sha256)"
    return None

