"""Features for the trainers, held in memory or streamed from a cache's part files: the minibatch source.

Both trainers ask one object for their rows: ``TensorRows`` (features in memory, as before) or
``StreamedRows`` (features left in the cache's Parquet parts and read, memory-mapped, a part at a
time; for caches larger than ``--memory-budget``). A sample is a rating row (one side) or a pair
(two sides, chosen and rejected). Both give the same three reads:

- ``batches(order, size)``: training minibatches in ``order`` ([n] or [M, n] sample ids);
- ``take(rows)``: some samples whole, in memory (the validation and calibration splits);
- ``chunks(size)``: every sample once, in order, ``size`` at a time (the frozen value head's outputs).

The training order is ``part_shuffled``: the parts in a seeded random order, taken PARTS_PER_WINDOW
(8) at a time, the samples of those parts shuffled together. A streamed epoch then holds about one
window of parts (two where a minibatch crosses a boundary); the in-memory path uses the same order,
so a cache trained in memory and streamed gives bit-identical heads for the same seed
(``tests/test_feature_stream.py``). With one part the order is a plain shuffle.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import CacheError, fixed_list_numpy, gather_embeddings, nonfinite_rows, row_index, row_location

EVAL_ROWS = 8192  # samples per chunk when a whole split is evaluated
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
PARTS_PER_WINDOW = 8  # parts whose rows are shuffled together (and held together when streaming)


def row_chunks(n: int, size: int = EVAL_ROWS):
    """Slices of range(n), ``size`` at a time: how a whole split is evaluated (bounds the float32 copy).

    >>> list(row_chunks(5, 2))
    [slice(0, 2, None), slice(2, 4, None), slice(4, 6, None)]
    """
    return (slice(i, i + size) for i in range(0, n, size))


def part_shuffled(rows: torch.Tensor, part: torch.Tensor | None, gens: list[torch.Generator],
                  part_gen: torch.Generator, window: int = None) -> torch.Tensor:
    """One epoch's order [M, n] of ``rows`` (sample ids), one row per generator in ``gens``: the parts in one
    random order drawn from ``part_gen``, taken ``window`` parts at a time (default PARTS_PER_WINDOW), the rows
    of a window shuffled together by each member's own generator. The windows are shared, so column i lies in
    the same window for every member. With no parts, or one, each member's order is a plain shuffle,
    ``rows[randperm(n)]``."""
    window = window or PARTS_PER_WINDOW
    of_row = None if part is None else part.to(rows.device)[rows]
    parts = None if of_row is None else torch.unique(of_row)
    if parts is None or len(parts) == 1:
        return torch.stack([rows[torch.randperm(len(rows), generator=g).to(rows.device)] for g in gens])
    parts = parts[torch.randperm(len(parts), generator=part_gen).to(rows.device)]
    mine = [rows[torch.isin(of_row, parts[i:i + window])] for i in range(0, len(parts), window)]
    return torch.stack([torch.cat([r[torch.randperm(len(r), generator=g).to(rows.device)] for r in mine])
                        for g in gens])


def as_rows(features, device) -> "TensorRows | StreamedRows":
    """A trainer's features as a minibatch source: a source as it is, a tensor (or a tuple of them, one per
    side) moved to ``device`` and held in memory."""
    if isinstance(features, (TensorRows, StreamedRows)):
        return features
    sides = features if isinstance(features, (tuple, list)) else (features,)
    return TensorRows(*(s.to(device) for s in sides))


class TensorRows:
    """Features held in memory: one [N, d] tensor per side (ratings: one; pairs: chosen, rejected),
    with each sample's part (``part`` [N], or None) for the training order."""

    def __init__(self, *sides: torch.Tensor, part: torch.Tensor | None = None):
        self.sides = sides
        self.part = part
        self.n, self.d = sides[0].shape
        self.device = sides[0].device

    def take(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return [s[rows.to(s.device)] for s in self.sides]

    def batches(self, order: torch.Tensor, size: int):
        for i in range(0, order.shape[-1], size):
            idx = order[..., i:i + size]
            yield idx, [s[idx] for s in self.sides]

    def chunks(self, size: int = EVAL_ROWS):
        for i in range(0, self.n, size):
            yield slice(i, i + size), [s[i:i + size] for s in self.sides]


class StreamedRows:
    """Features left in a cache's part files: sample i of side s is the cache's global row ``rows[s][i]``.
    Rows are read memory-mapped (``pipeline.cache.parquet_pages``) when asked for, checked for non-finite
    values, and moved to ``device``; only the parts that later minibatches of the epoch still need are held."""

    def __init__(self, folder: Path, manifest: dict, starts: np.ndarray, rows: list[np.ndarray], device="cpu"):
        self.folder, self.manifest, self.starts = Path(folder), manifest, starts
        self.rows = [np.asarray(r, dtype=np.int64) for r in rows]
        self.n, self.d = len(self.rows[0]), manifest["hidden_size"]
        self.device = torch.device(device)
        self.dtype = np.dtype(manifest["storage_dtype"])
        part = np.searchsorted(starts, self.rows[0], side="right") - 1  # the part of the first side's row
        self.part = torch.from_numpy(part)
        self.reads = 0  # rows read from the files (a measure for tests and the benchmark)
        self.peak_held = 0  # the most training samples held at once by ``batches``

    def feature_bytes(self) -> int:
        return sum(len(r) for r in self.rows) * self.d * self.dtype.itemsize

    def _read(self, samples: np.ndarray) -> list[torch.Tensor]:
        """The features of ``samples`` (in that order), one tensor per side."""
        outs = [np.empty((len(samples), self.d), dtype=self.dtype) for _ in self.rows]
        gather_embeddings(self.folder, self.manifest, self.starts, [(r[samples], o) for r, o in zip(self.rows, outs)])
        for r, o in zip(self.rows, outs):
            bad = nonfinite_rows(o)
            if bad.any():
                row = int(r[samples][np.flatnonzero(bad)[0]])
                raise CacheError(f"{row_location(self.folder, self.manifest, self.starts, row)} holds non-finite features: "
                                 "the cache is damaged; rebuild it with `urm extract --overwrite`")
        self.reads += len(samples) * len(self.rows)
        return [torch.from_numpy(o).to(self.device) for o in outs]

    def take(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return self._read(rows.cpu().numpy())

    def chunks(self, size: int = EVAL_ROWS):
        for i in range(0, self.n, size):
            yield slice(i, i + size), self._read(np.arange(i, min(i + size, self.n)))

    def batches(self, order: torch.Tensor, size: int):
        """Minibatches of ``order`` ([n] or [M, n]): a part is read when a minibatch first needs it (its rows
        in ``order``, once) and dropped after the last minibatch that does."""
        ids = order.cpu().numpy().reshape(-1, order.shape[-1])
        part = self.part.numpy()[ids]  # [M, n]
        last = np.zeros(len(self.starts), dtype=np.int64)  # the last column each part is used in
        np.maximum.at(last, part.ravel(), np.broadcast_to(np.arange(ids.shape[1]), ids.shape).ravel())
        samples = np.unique(ids)
        by_part = np.split(samples, np.searchsorted(self.part.numpy()[samples], np.arange(1, len(self.starts))))
        held: dict[int, list[torch.Tensor]] = {}
        for i in range(0, ids.shape[1], size):
            idx, of = ids[:, i:i + size], part[:, i:i + size]
            needed = np.unique(of)
            for p in needed:
                if p not in held:
                    held[int(p)] = self._read(by_part[p])
            self.peak_held = max(self.peak_held, sum(len(by_part[p]) for p in held))
            out = [torch.empty((*idx.shape, self.d), dtype=TORCH_DTYPES[self.dtype.name], device=self.device)
                   for _ in self.rows]
            flat = of.ravel()
            for p in needed:
                where = np.flatnonzero(flat == p)
                local = torch.from_numpy(np.searchsorted(by_part[p], idx.ravel()[where])).to(self.device)
                where = torch.from_numpy(where).to(self.device)
                for o, f in zip(out, held[int(p)]):
                    o.view(-1, self.d)[where] = f[local]
            for p in [p for p in held if last[p] < i + size]:
                del held[p]
            batch_ids = torch.from_numpy(idx.reshape(order[..., i:i + size].shape))
            yield batch_ids, [o.reshape(*batch_ids.shape, self.d) for o in out]


def open_streamed(path, *, pairs: bool, device="cpu", verify: bool = True):
    """(StreamedRows, labels [N, K], margin [N]) of a complete cache: every row for ratings, the aligned
    (chosen, rejected) rows for pairs (labels and margin of the chosen side); no feature is read yet."""
    folder = Path(path)
    m, starts, rows, small = row_index(folder, pairs=pairs, verify=verify)
    labels, margin = small_columns(folder, m, starts, rows[0], small)
    return StreamedRows(folder, m, starts, rows, device), labels.to(device), margin.to(device)


def small_columns(folder, m, starts, rows, small):
    """Labels [N, K] (infinite refused) and margin [N] (NaN = null) of the global ``rows``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = small.take(pa.array(rows, pa.int64()))
    labels = fixed_list_numpy(t["labels"], len(m["label_names"]))
    bad = np.any(np.isinf(labels), axis=1)
    if bad.any():
        raise CacheError(f"{row_location(folder, m, starts, int(rows[np.flatnonzero(bad)[0]]))} holds infinite labels: "
                         "the cache is damaged; rebuild it with `urm extract --overwrite`")
    margin = pc.fill_null(t["margin"], float("nan")).to_numpy().astype(np.float32)
    return torch.from_numpy(labels), torch.from_numpy(margin)


def default_memory_budget(device: str) -> float:
    """Bytes of features the trainers hold before streaming: half the device's memory (the GPU's on
    CUDA, else the machine's RAM)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory / 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2


def streams(manifest: dict, memory_budget_gb: float | None, device: str) -> tuple[bool, float, float]:
    """(whether a cache's features are streamed from its parts rather than held, the bytes they take, the budget):
    held when they fit ``memory_budget_gb`` (GB; None: ``default_memory_budget``)."""
    need = sum(p["rows"] for p in manifest.get("parts", [])) * manifest.get("hidden_size", 0) * (
        2 if manifest.get("storage_dtype") == "float16" else 4)
    budget = memory_budget_gb * 1e9 if memory_budget_gb is not None else default_memory_budget(device)
    return need > budget, need, budget

