"""How fast `pipeline.cache.reader.read_features` loads a cache into a torch tensor, beside a plain numpy copy.

Writes a cache of ROWS x DIM float16 random rows (in a temporary folder under /tmp, the same
disk as the repository here), reads it once to warm the page cache, then takes the best of 3
reads. So this measures decoding + copying from a hot page cache, not the disk. Reference: the
same bytes copied by numpy, `np.copyto` into a preallocated (already touched) array and
`arr.copy()` (which, like the reader, also allocates and faults in its output). Targets: >= 1 GB/s
and read time within 2x of the numpy copy: reported against both (a reader that returns a new
tensor pays what `arr.copy()` pays for its output's fresh pages, which `np.copyto` here does not;
and it copies out of the page cache, which costs more than copying between two hot arrays).
Every read verifies each part's xxh3-128 by default: the read is timed with and without it (the
ratio is the cost of verification), and both checksums are timed alone over the part files (why
xxh3-128 and not sha256). Figures go to bench/results/cache_read.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from bench import machine_info, write_result
from pipeline.cache import CacheSpec, open_writer, read_features
from pipeline.hashing import file_sha256, file_xxh3

ROWS, DIM, ROWS_PER_PART, REPEATS = 100_000, 4096, 10_000, 3


def best_of(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def write_cache(folder: str, rows: int, dim: int) -> tuple[np.ndarray, float]:
    spec = CacheSpec(backbone="bench/random", backbone_revision="0", hidden_size=dim, storage_dtype="float16",
                     max_length=4096, chat_template_hash="none", dataset="random", dataset_fingerprint="seed0",
                     kind="ratings", extra={"rows_per_part": ROWS_PER_PART})
    rng = np.random.default_rng(0)
    every = np.empty((rows, dim), np.float16)
    n_parts = -(-rows // ROWS_PER_PART)
    writer = open_writer(folder, spec, n_parts=n_parts)
    seconds = 0.0
    for i in range(n_parts):
        lo, hi = i * ROWS_PER_PART, min(rows, (i + 1) * ROWS_PER_PART)
        every[lo:hi] = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        t = time.perf_counter()
        writer.write_part(i, {"id": [f"r{j}" for j in range(lo, hi)], "source": "bench",
                              "n_tokens": np.full(hi - lo, 100, np.int32), "embedding": every[lo:hi]})
        seconds += time.perf_counter() - t
    writer.finish(n_parts)
    return every, seconds  # write_part time only (not the random data generation)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench cache_read")
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--dim", type=int, default=DIM)
    args = ap.parse_args(argv or [])
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="urm-bench-cache-") as folder:
        every, write_s = write_cache(folder, args.rows, args.dim)
        nbytes = every.nbytes
        first = read_features(folder)  # warm-up: page cache hot, code paths loaded
        assert np.array_equal(first.embedding.numpy().view(np.uint16), every.view(np.uint16)), "read != written"
        del first
        read_s = best_of(lambda: read_features(folder))  # every part's checksum verified (the default)
        unverified_s = best_of(lambda: read_features(folder, verify=False))  # sizes only
        parts = sorted(Path(folder).glob("part-*.parquet"))
        xxh3_s = best_of(lambda: [file_xxh3(p) for p in parts])  # the checksum alone, and sha256 beside it
        sha256_s = best_of(lambda: [file_sha256(p) for p in parts], repeats=1)
        file_bytes = sum(p.stat().st_size for p in parts)
        t = time.perf_counter()
        pq.read_table(folder, columns=["embedding"])  # pyarrow's own decoder, once, for context
        arrow_s = time.perf_counter() - t
    dst = np.empty_like(every)
    np.copyto(dst, every)  # touch the destination once
    copyto_s = best_of(lambda: np.copyto(dst, every))
    copy_s = best_of(lambda: every.copy())
    gbps = lambda s: nbytes / s / 1e9  # noqa: E731
    result = {
        "what": "read_features() of a float16 cache into a torch tensor, best of 3 after a warm-up read "
                "(page cache hot), with every part's xxh3-128 verified (the default) and without, vs numpy copies "
                "of the same bytes; the checksums alone (xxh3-128, sha256) over the part files",
        "rows": args.rows, "dim": args.dim, "dtype": "float16", "bytes": nbytes, "parts": -(-args.rows // ROWS_PER_PART),
        "read_seconds": read_s, "read_gbps": gbps(read_s),
        "read_unverified_seconds": unverified_s, "read_unverified_gbps": gbps(unverified_s),
        "verify_cost_ratio": read_s / unverified_s,  # verified read time / unverified read time, same run
        "part_file_bytes": file_bytes, "xxh3_128_seconds": xxh3_s, "xxh3_128_gbps": file_bytes / xxh3_s / 1e9,
        "sha256_seconds": sha256_s, "sha256_gbps": file_bytes / sha256_s / 1e9,
        "numpy_copyto_seconds": copyto_s, "numpy_copyto_gbps": gbps(copyto_s),
        "numpy_copy_seconds": copy_s, "numpy_copy_gbps": gbps(copy_s),
        "ratio_vs_copyto": read_s / copyto_s, "ratio_vs_copy": read_s / copy_s,
        "pyarrow_read_table_seconds": arrow_s, "pyarrow_read_table_gbps": gbps(arrow_s),
        "write_seconds": write_s, "write_gbps": gbps(write_s),
        "target_1gbps_met": gbps(read_s) >= 1.0,
        "target_within_2x_of_numpy_copy_met": read_s <= 2 * copy_s,  # arr.copy(): also allocates its output
        "target_within_2x_of_numpy_copyto_met": read_s <= 2 * copyto_s,  # into an already-touched array
        "load_average_before": load_before,
        "machine": machine_info(),
    }
    path = write_result("cache_read", result)
    print(f"read_features {gbps(read_s):.2f} GB/s verified, {gbps(unverified_s):.2f} GB/s with verify=False "
          f"(verifying costs {read_s / unverified_s:.2f}x); xxh3-128 {result['xxh3_128_gbps']:.2f} GB/s, sha256 "
          f"{result['sha256_gbps']:.2f} GB/s")
    print(f"read_features {gbps(read_s):.2f} GB/s ({read_s:.3f} s for {nbytes / 1e9:.2f} GB); numpy copyto "
          f"{gbps(copyto_s):.2f} GB/s, copy() {gbps(copy_s):.2f} GB/s; ratio {read_s / copyto_s:.2f}x (copyto), "
          f"{read_s / copy_s:.2f}x (copy); pyarrow read_table {gbps(arrow_s):.2f} GB/s; write {gbps(write_s):.2f} GB/s; "
          f"load {load_before} -> {result['machine']['load_average']}\n-> {path}")
    return result
