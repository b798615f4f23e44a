"""A part's columns (numpy arrays, torch tensors or lists) checked and turned into the Arrow table of one
part file: shapes, types, roles, label and float ranges, and no non-finite feature ever stored.

``CacheInputError`` names the part file, the column and the row of the first bad value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.cache.layout import REQUIRED_COLUMNS, ROLES, SMALL_COLUMNS, CacheInputError, CacheSpec, arrow_schema

FP16_MAX = 65504.0


def build_table(spec: CacheSpec, columns: dict, where: Path) -> pa.Table:
    """The Arrow table of part file ``where`` from ``columns`` (see ``CacheWriter.write_part``), every value
    checked; CacheInputError naming the column and row of the first bad one."""
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
