"""The Parquet feature cache: backbone features stored once, in crash-safe parts, read back fast.

Owns the on-disk layout of a cached dataset, the check that refuses to mix features made with
other settings, resumable atomic writing (`open_writer`), and the reader that loads a cache into
torch tensors (`read_features`, `read_pairs`), plus `read_manifest`, `verify_cache`, `cache_info`.

One cached dataset is one folder, e.g. cache/demo/ratings/:
  part-00000.parquet, part-00001.parquet, ...  plain Parquet, columns below
  _manifest.json    what made the features (backbone + revision, template hash, max_length, dtype,
                    dataset fingerprint, ...), each part's rows + size + sha256, `complete`, and a
                    content `fingerprint` that downstream artifacts record.
The manifest's name starts with "_" (the Hive/Spark convention for sidecar files such as
`_SUCCESS`), so Parquet readers that open the whole folder skip it; temporary files start with ".".

Columns: id string, source string, subset string?, pair_id string?, role string? ("chosen" |
"rejected"), n_tokens int32, embedding fixed_size_list<float16|float32>[d], labels
fixed_size_list<float32>[5] (NaN = missing; all NaN for pairs), base_score float32? (null = none).

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
(os.replace), so no reader ever sees half a part; the manifest is rewritten the same way after
every part. A writer that opens an existing cache removes stale temporary files, drops part files
the manifest does not list (killed between rename and manifest update) and listed parts whose
size changed, and skips the rest (`part_done`). `finish()` marks the cache complete; readers
refuse an incomplete cache.

Speed: the embedding column is written uncompressed, PLAIN, without dictionary or statistics, in
data pages v2. Arrow's generic decoder for a fixed-size list walks repetition/definition levels
value by value (~0.3 GB/s here), so for such pages the reader locates them from the Parquet page
headers and reads the values straight into one preallocated array: one pread per 8 MB page for a
run of rows, a gather from a memory map for a filtered selection, no per-row Python loop. Any
other layout falls back to pyarrow's decoder, bit-identical. `python -m bench cache_read`
measures it (bench/results/cache_read.json).
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import ATTRIBUTES, __version__
from pipeline.errors import UserError
from pipeline.sources import file_sha256

if TYPE_CHECKING:  # torch is imported where tensors are made: writing and `cache info` don't need it
    import torch

FORMAT_VERSION = 1
MANIFEST = "_manifest.json"
FIX = "pass --overwrite to replace it, or choose another --cache-dir"
KINDS = ("ratings", "preferences")
STORAGE_DTYPES = ("float16", "float32")
ROLES = ("chosen", "rejected")
FP16_MAX = 65504.0
ROW_GROUP_BYTES = 256 << 20  # embedding bytes per row group: large groups read fastest
DATA_PAGE_BYTES = 8 << 20  # large pages: fewer page headers to walk when reading
SMALL_COLUMNS = ("id", "source", "subset", "pair_id", "role", "n_tokens", "labels", "base_score")
REQUIRED_COLUMNS = ("id", "source", "n_tokens", "embedding")
# Fields that decide what the features are: a cache that differs in any of them is refused.
COMPAT_FIELDS = ("format_version", "kind", "backbone", "backbone_revision", "hidden_size",
                 "storage_dtype", "max_length", "chat_template_hash", "dataset_fingerprint",
                 "label_names", "extra")
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")
_TMP_RE = re.compile(r"^\.(?:part-\d+\.parquet|_manifest\.json)\.(\d+)\.tmp$")


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
    ])


def _parquet_options() -> dict:
    leaf = {"embedding": "embedding.list.element", "labels": "labels.list.element"}
    compression = {leaf.get(c, c): "zstd" for c in SMALL_COLUMNS}
    compression[leaf["embedding"]] = "none"
    return dict(
        compression=compression,
        use_dictionary=["source", "subset", "role"],
        write_statistics=["source", "subset", "role", "n_tokens", "base_score"],
        data_page_version="2.0",
        data_page_size=DATA_PAGE_BYTES,
    )


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


# --------------------------------------------------------------------------------------- writing


def open_writer(path, spec: CacheSpec, *, overwrite: bool = False, n_parts: int | None = None,
                verify: bool = False) -> CacheWriter:
    """Open (create or resume) the cache at `path` for writing `spec`'s features.

    An existing cache made with other settings raises CacheMismatch naming each differing field,
    unless `overwrite` (then its parts and manifest are removed first). `n_parts`, when known,
    is recorded (so a half-written cache can say "N of M parts") and must match on resume.
    `verify` checks every done part's sha256 (otherwise only its size).
    """
    return CacheWriter(Path(path), spec, overwrite=overwrite, n_parts=n_parts, verify=verify)


class CacheWriter:
    """Writes the parts of one cache atomically; `done_parts` are those a resumed run can skip."""

    def __init__(self, folder: Path, spec: CacheSpec, *, overwrite: bool, n_parts: int | None, verify: bool):
        self.folder, self.spec = folder, spec
        self.parts_written = 0  # by this writer
        folder.mkdir(parents=True, exist_ok=True)
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
        lost = self._drop_bad_parts(verify)  # listed parts that are gone or changed: not complete now
        if lost:
            self.manifest.update(complete=False, completed=None)
        stray = _remove_unlisted_parts(folder, self._parts)  # e.g. killed between rename and manifest
        if old is None or lost or stray or n_parts is not None:
            self._save()

    @property
    def done_parts(self) -> set[int]:
        return set(self._parts)

    def part_done(self, index: int) -> bool:
        return int(index) in self._parts

    def write_part(self, index: int, columns: dict, dropped: int = 0) -> dict:
        """Write part `index` atomically (replacing it if done) and record it in the manifest.

        `columns`: id, source, n_tokens, embedding [n, d] (np.ndarray or torch tensor; cast to the
        storage dtype after a range check), optional subset, pair_id, role (arrays, or one string
        for the whole part), labels [n, 5] float32 (NaN = missing; default all NaN) and base_score
        [n] (NaN or None = null). `dropped`: rows of this part's input left out (too long).
        """
        index, total = int(index), self.manifest.get("n_parts")
        if index < 0 or (total is not None and index >= total):
            raise CacheInputError(f"{self.folder}: part index {index} is outside 0..{(total or 1) - 1} (n_parts {total})")
        name = part_name(index)
        table = _build_table(self.spec, columns, self.folder / name)
        entry = _write_parquet_atomic(self.folder, name, table, _row_group_rows(self.spec))
        entry = {"index": index, **entry, "rows": table.num_rows, "dropped": int(dropped)}
        self._parts[index] = entry
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
        return copy.deepcopy(self.manifest)

    def _drop_bad_parts(self, verify: bool) -> bool:
        bad = {i: why for i, p in self._parts.items() if (why := _part_problem(self.folder, p, verify))}
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
        _atomic_write(self.folder, MANIFEST, lambda tmp: tmp.write_bytes(data))


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
        "base_score": _base_score(columns.get("base_score"), n, where),
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


def _base_score(values, n: int, where: Path) -> pa.Array:
    if values is None:
        return pa.nulls(n, pa.float32())
    arr = _numbers(values, (n,), "base_score", where, np.float32)
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
    if x.dtype == np.float16:  # exponent bits all ones = inf or nan; no float16 exceeds the limit
        bad = ((x.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
    else:
        with np.errstate(invalid="ignore"):
            bad = ~((x.max(axis=1, initial=-np.inf) <= limit) & (x.min(axis=1, initial=np.inf) >= -limit))
    rows = np.flatnonzero(bad)
    return int(rows[0]) if rows.size else None


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

    _atomic_write(folder, name, write)
    path = folder / name
    return {"file": name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _atomic_write(folder: Path, name: str, write) -> None:
    """write(tmp) under a temporary name in `folder`, fsync, rename over `name`, fsync the folder."""
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        if _PART_RE.match(f.name) or f.name == MANIFEST:
            f.unlink()


def _remove_unlisted_parts(folder: Path, parts: dict) -> bool:
    listed = {p["file"] for p in parts.values()}
    stray = [f for f in folder.iterdir() if _PART_RE.match(f.name) and f.name not in listed]
    for f in stray:
        f.unlink()
    return bool(stray)


def _part_problem(folder: Path, part: dict, verify: bool) -> str | None:
    path = folder / part["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size != part["bytes"]:
        return f"has {size} bytes, the manifest says {part['bytes']}"
    if verify and file_sha256(path) != part["sha256"]:
        return "has changed since it was written (sha256 differs)"
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


# --------------------------------------------------------------------------------------- reading


@dataclass
class Features:
    """Rows of a cache as tensors (embedding [N, d], labels [N, 5], base_score [N] NaN = null,
    n_tokens [N]) and numpy object arrays (None = null) for the string columns."""

    embedding: torch.Tensor
    labels: torch.Tensor
    base_score: torch.Tensor
    n_tokens: torch.Tensor
    id: np.ndarray
    source: np.ndarray
    subset: np.ndarray
    pair_id: np.ndarray
    role: np.ndarray
    manifest: dict

    def __len__(self) -> int:
        return int(self.embedding.shape[0])


@dataclass
class Pairs:
    """Preference pairs: chosen[i] and rejected[i] share pair_id."""

    chosen: Features
    rejected: Features

    def __len__(self) -> int:
        return len(self.chosen)


def read_manifest(path) -> dict:
    folder = Path(path)
    file = folder / MANIFEST
    if not file.exists():
        raise CacheError(f"{folder}: no {MANIFEST}, so this is not a feature cache; run `urm extract` to build it")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{file}: unreadable manifest ({e}); {FIX}") from None


def verify_cache(path) -> dict:
    """Check every part's size and sha256 against the manifest; returns the manifest."""
    return _open_complete(Path(path), verify=True)


def read_features(path, *, source=None, subset=None, role=None, dtype=None, device="cpu",
                  verify: bool = False) -> Features:
    """Load a complete cache into tensors. source / subset / role: a name or a list of names
    (rows whose value is one of them are kept; None = no filter). dtype: of the embedding
    (default: the storage dtype). verify: check part checksums first."""
    folder = Path(path)
    m = _open_complete(folder, verify)
    small, starts = _read_small(folder, m)
    rows = np.flatnonzero(_mask(small, source=source, subset=subset, role=role))
    return _load(folder, m, small, starts, [rows], dtype, device)[0]


def read_pairs(path, *, subset=None, dtype=None, device="cpu", verify: bool = False) -> Pairs:
    """Load a preferences cache as aligned pairs: chosen[i] and rejected[i] have the same pair_id."""
    folder = Path(path)
    m = _open_complete(folder, verify)
    if m["kind"] != "preferences":
        raise CacheError(f"{folder} is a {m['kind']!r} cache; read_pairs needs a 'preferences' cache (use read_features)")
    small, starts = _read_small(folder, m)
    keep = _mask(small, subset=subset)
    chosen = np.flatnonzero(keep & _mask(small, role="chosen"))
    rejected = np.flatnonzero(keep & _mask(small, role="rejected"))
    rejected = rejected[_align(folder, m, starts, small["pair_id"].combine_chunks(), chosen, rejected)]
    return Pairs(*_load(folder, m, small, starts, [chosen, rejected], dtype, device))


def _open_complete(folder: Path, verify: bool) -> dict:
    m = read_manifest(folder)
    if m.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{folder}: cache format {m.get('format_version')}, this package reads format "
                         f"{FORMAT_VERSION}; run `urm extract --overwrite` to rebuild it")
    if not m.get("complete"):
        total = m.get("n_parts") or "?"
        raise CacheIncomplete(f"{folder}: cache is incomplete: {len(m['parts'])} of {total} parts; "
                              "run `urm extract` again to finish it")
    for p in m["parts"]:
        why = _part_problem(folder, p, verify)
        if why:
            raise CacheError(f"{folder / p['file']}: part {why}; run `urm extract` again to rewrite it")
    return m


def _read_small(folder: Path, m: dict) -> tuple[pa.Table, np.ndarray]:
    tables = []
    for p in m["parts"]:
        t = pq.ParquetFile(folder / p["file"], memory_map=True).read(columns=list(SMALL_COLUMNS))
        if t.num_rows != p["rows"]:
            raise CacheError(f"{folder / p['file']}: {t.num_rows} rows, the manifest says {p['rows']}; "
                             "run `urm extract` again to rewrite it")
        tables.append(t)
    starts = np.cumsum([0] + [p["rows"] for p in m["parts"]])
    small = pa.concat_tables(tables) if tables else arrow_schema(m["hidden_size"], m["storage_dtype"]).empty_table()
    return small.select(list(SMALL_COLUMNS)), starts


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
            raise CacheError(f"{_where(folder, m, starts, row)}: {side} row without a pair_id")
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
                             f"{ids[i].as_py()!r} ({_where(folder, m, starts, rows[i])}); every pair needs one "
                             "chosen and one rejected row: re-extract with `urm extract --overwrite`")
    return match.to_numpy(zero_copy_only=False).astype(np.int64)


def _where(folder: Path, m: dict, starts, row: int) -> str:
    part = int(np.searchsorted(starts, row, side="right")) - 1
    return f"{folder / m['parts'][part]['file']} row {int(row - starts[part])}"


def _load(folder: Path, m: dict, small: pa.Table, starts, row_sets: list, dtype, device) -> list[Features]:
    import torch

    d = m["hidden_size"]
    np_dtype, torch_dtype = _out_dtype(dtype, m["storage_dtype"])
    outs = [np.empty((len(rows), d), dtype=np_dtype) for rows in row_sets]  # numpy asks for huge pages
    _gather_embeddings(folder, m, starts, list(zip(row_sets, outs)))
    result = []
    for rows, out in zip(row_sets, outs):
        everything = len(rows) == small.num_rows and np.array_equal(rows, np.arange(len(rows)))
        t = small if everything else small.take(pa.array(rows, pa.int64()))
        emb = torch.from_numpy(out)
        emb = emb if torch_dtype is None else emb.to(torch_dtype)
        labels = _fixed_list_numpy(t["labels"], len(m["label_names"]))
        base = pc.fill_null(t["base_score"], float("nan")).to_numpy().astype(np.float32)
        tensors = [emb, torch.from_numpy(labels), torch.from_numpy(base),
                   torch.from_numpy(t["n_tokens"].to_numpy().astype(np.int32))]
        if str(device) != "cpu":
            tensors = [x.to(device) for x in tensors]
        strings = [t[c].to_numpy(zero_copy_only=False) for c in ("id", "source", "subset", "pair_id", "role")]
        result.append(Features(*tensors, *strings, manifest=copy.deepcopy(m)))
    return result


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


def _fixed_list_numpy(col: pa.ChunkedArray, width: int) -> np.ndarray:
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return np.array(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)


def _gather_embeddings(folder: Path, m: dict, starts, targets: list) -> None:
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
        for block in _embedding_blocks(folder / p["file"], m["hidden_size"], m["storage_dtype"]):
            lo = start + block.row
            for s, order, out, ascending in prepared:
                a, b = np.searchsorted(s, lo), np.searchsorted(s, lo + block.rows)
                if a < b:
                    _copy_rows(block, s[a:b] - lo, order[a:b], out, ascending)


@dataclass
class _Block:
    """Rows [row, row + rows) of a part's embedding column: `values` [rows, d] (a view of the
    memory-mapped file, or decoded by pyarrow), and where they lie in the file when stored raw."""

    row: int
    rows: int
    values: np.ndarray
    fd: int | None = None
    offset: int = 0


def _copy_rows(block: _Block, local: np.ndarray, dst: np.ndarray, out: np.ndarray, ascending: bool) -> None:
    """out[dst] = block.values[local]: one pread or memcpy for a run of rows, a gather otherwise."""
    k = len(local)
    if not ascending:
        out[dst] = block.values[local]
        return
    target = out[dst[0]:dst[0] + k]
    if local[-1] - local[0] == k - 1:  # sorted, unique: a run of rows
        row_bytes = block.values.strides[0]
        if block.fd is not None and block.values.dtype == out.dtype and target.flags.c_contiguous:
            nbytes = os.preadv(block.fd, [memoryview(target).cast("B")], block.offset + int(local[0]) * row_bytes)
            if nbytes == k * row_bytes:
                return
        np.copyto(target, block.values[local[0]:local[0] + k])
    elif block.values.dtype == out.dtype:
        np.take(block.values, local, axis=0, out=target)
    else:
        target[...] = block.values[local]


def _embedding_blocks(file: Path, d: int, storage_dtype: str) -> Iterator[_Block]:
    """A part's embedding column in blocks of rows: its PLAIN pages, located from the page headers
    and read straight from the file, where the layout allows; else row groups decoded by pyarrow."""
    pf = pq.ParquetFile(file, memory_map=True)
    expected = arrow_schema(d, storage_dtype).field("embedding").type
    if pf.schema_arrow.field("embedding").type != expected:
        raise CacheError(f"{file}: column 'embedding' is {pf.schema_arrow.field('embedding').type}, the manifest "
                         f"says {expected}; run `urm extract --overwrite` to rebuild the cache")
    md = pf.metadata
    leaf = [md.schema.column(i).path for i in range(md.num_columns)].index("embedding.list.element")
    dt = np.dtype("<f2" if storage_dtype == "float16" else "<f4")
    with open(file, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        row = 0
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            pages = _plain_pages(mm, rg.column(leaf), rg.num_rows, d * dt.itemsize)
            if pages is None:
                values = pf.read_row_group(g, columns=["embedding"])["embedding"].combine_chunks().flatten()
                yield _Block(row, rg.num_rows, values.to_numpy(zero_copy_only=False).reshape(-1, d))
            else:
                for offset, r0, nr in pages:
                    view = np.frombuffer(mm, dt, nr * d, offset).reshape(nr, d)
                    yield _Block(row + r0, nr, view, f.fileno() if dt.isnative else None, offset)
            row += rg.num_rows


def _plain_pages(mm: mmap.mmap, chunk, n_rows: int, row_bytes: int) -> list[tuple[int, int, int]] | None:
    """(file offset of the values, first row, rows) for each page of a column chunk made only of
    uncompressed PLAIN v2 data pages without nulls; None for any other layout (then pyarrow reads)."""
    if chunk.compression != "UNCOMPRESSED" or chunk.dictionary_page_offset is not None:
        return None
    pos, end = chunk.data_page_offset, chunk.data_page_offset + chunk.total_compressed_size
    pages, row = [], 0
    while pos < end:
        try:
            header, size = _thrift_struct(mm[pos:min(end, pos + 4096)], 0)
        except (IndexError, ValueError, struct.error):
            return None
        v2, body = header.get(8), header.get(3)
        if header.get(1) != 3 or not isinstance(v2, dict) or body is None:  # 3 = DATA_PAGE_V2
            return None
        levels = v2.get(5, 0) + v2.get(6, 0)
        nr = v2.get(3, -1)
        if v2.get(2) != 0 or v2.get(4) != 0 or body - levels != nr * row_bytes:  # nulls, encoding PLAIN
            return None
        pages.append((pos + size + levels, row, nr))
        row += nr
        pos += size + body
    return pages if pos == end and row == n_rows else None


def _thrift_struct(buf: bytes, pos: int) -> tuple[dict, int]:
    """Decode a Thrift compact-protocol struct (a Parquet page header): {field id: value}, end."""
    out, last = {}, 0
    while True:
        head = buf[pos]
        pos += 1
        if head == 0:
            return out, pos
        kind, delta = head & 0x0F, head >> 4
        if delta:
            fid = last + delta
        else:
            raw, pos = _varint(buf, pos)
            fid = (raw >> 1) ^ -(raw & 1)
        last = fid
        out[fid], pos = _thrift_value(buf, pos, kind)


def _thrift_value(buf: bytes, pos: int, kind: int):
    if kind in (1, 2):  # bool true / false
        return kind == 1, pos
    if kind == 3:  # byte
        return struct.unpack_from("b", buf, pos)[0], pos + 1
    if kind in (4, 5, 6):  # i16, i32, i64: zigzag varint
        raw, pos = _varint(buf, pos)
        return (raw >> 1) ^ -(raw & 1), pos
    if kind == 7:  # double
        return struct.unpack_from("<d", buf, pos)[0], pos + 8
    if kind == 8:  # binary
        n, pos = _varint(buf, pos)
        if pos + n > len(buf):
            raise IndexError("binary past the buffer")
        return bytes(buf[pos:pos + n]), pos + n
    if kind in (9, 10):  # list, set
        head = buf[pos]
        pos += 1
        n, elem = head >> 4, head & 0x0F
        if n == 15:
            n, pos = _varint(buf, pos)
        items = []
        for _ in range(n):
            if elem in (1, 2):
                items.append(buf[pos] == 1)
                pos += 1
            else:
                item, pos = _thrift_value(buf, pos, elem)
                items.append(item)
        return items, pos
    if kind == 11:  # map
        n, pos = _varint(buf, pos)
        if n == 0:
            return {}, pos
        types = buf[pos]
        pos += 1
        out = {}
        for _ in range(n):
            key, pos = _thrift_value(buf, pos, types >> 4)
            out[key], pos = _thrift_value(buf, pos, types & 0x0F)
        return out, pos
    if kind == 12:
        return _thrift_struct(buf, pos)
    raise ValueError(f"unknown thrift type {kind}")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


# ------------------------------------------------------------------------------------------ info


def cache_info(path) -> str:
    """A human summary of a cache (complete or not): what made it, its size, rows per group."""
    folder = Path(path)
    m = read_manifest(folder)
    parts = m["parts"]
    size = sum(p["bytes"] for p in parts) + (folder / MANIFEST).stat().st_size
    state = "complete" if m.get("complete") else "INCOMPLETE: run `urm extract` again to finish it"
    lines = [
        f"{folder}  ({state})",
        f"  backbone       {m['backbone']} @ {m.get('backbone_revision') or 'unknown revision'}",
        f"  hidden size    {m['hidden_size']}, stored as {m['storage_dtype']}",
        f"  max_length     {m['max_length']}",
        f"  chat template  {m['chat_template_hash']}",
        f"  dataset        {m['dataset']} (fingerprint {m['dataset_fingerprint']})",
        f"  kind           {m['kind']}; labels {', '.join(m['label_names'])}",
        f"  rows           {m['rows']} ({m['dropped_rows']} dropped: longer than max_length)",
        f"  parts          {len(parts)} of {m.get('n_parts') or '?'} complete, {_human_bytes(size)} on disk",
        f"  created        {m.get('created')}" + (f", completed {m['completed']}" if m.get("completed") else ""),
        f"  fingerprint    {m.get('fingerprint') or '(none until complete)'}",
        f"  written by     urm-pipeline {m.get('package_version')}, cache format {m.get('format_version')}",
    ]
    if m.get("extra"):
        lines.append(f"  extra          {json.dumps(m['extra'], sort_keys=True)}")
    return "\n".join(lines + _group_counts(folder, parts))


def _group_counts(folder: Path, parts: list) -> list[str]:
    keys = ["source", "subset", "role"]
    tables = [pq.read_table(folder / p["file"], columns=keys) for p in parts if (folder / p["file"]).exists()]
    if not tables:
        return []
    counts = pa.concat_tables(tables).group_by(keys).aggregate([([], "count_all")]).sort_by([(k, "ascending") for k in keys])
    rows = [["-" if r[k] is None else str(r[k]) for k in keys + ["count_all"]] for r in counts.to_pylist()]
    header = ["source", "subset", "role", "rows"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "    " + "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + f"  {{:>{widths[-1]}}}"
    return ["  rows by source / subset / role:", fmt.format(*header)] + [fmt.format(*r) for r in rows]


def _human_bytes(n: float) -> str:
    unit = next((u for u in ("B", "KB", "MB", "GB") if n < 1024 ** (("B", "KB", "MB", "GB").index(u) + 1)), "TB")
    return f"{n / 1024 ** ('B', 'KB', 'MB', 'GB', 'TB').index(unit):.1f} {unit}"
