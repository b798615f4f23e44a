"""Demo extraction in fp32 and in bf16, side by side in one run: is `dtype = "auto-bf16"` right here?

Rows: the first N conversations of the demo's ratings (synthetic:ratings?n=N&seed=0), rendered for
SmolLM2-135M-Instruct. Both dtypes are loaded once, warmed up, then timed in alternation, ``--repeats``
times each; the best run of each counts (the least disturbed by anything else on the machine).
Reported: tokens/s per dtype, the bf16/fp32 speed ratio, what auto-bf16 picks on this CPU
(pipeline.device.native_bf16_cpu), and how far bf16 features are from fp32 ones (relative error,
smallest cosine). Writes bench/results/demo_dtype.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench import machine_info, write_result


def main(argv: list[str]) -> None:
    from pipeline.configs import SMOLLM2_GGUF
    from pipeline.data import load_ratings
    from pipeline.device import native_bf16_cpu
    from pipeline.features import embed_all, load_weights, open_backbone, rating_rows, render_ids

    ap = argparse.ArgumentParser(prog="python -m bench demo_dtype")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    load_before = machine_info()["load_average"]
    files = open_backbone(SMOLLM2_GGUF)
    records, _ = load_ratings(f"synthetic:ratings?n={args.rows}&seed=0")
    ids = render_ids(files.tokenizer, rating_rows(records).conversations)
    tokens = sum(len(x) for x in ids)
    models = {dtype: load_weights(files, dtype, "cpu") for dtype in ("float32", "bfloat16")}
    features, runs = {}, {dtype: [] for dtype in models}
    for dtype, model in models.items():
        embed_all(model, ids[:4], 4096)  # warm-up
    for _ in range(args.repeats):
        for dtype, model in models.items():
            t = time.perf_counter()
            features[dtype], _ = embed_all(model, ids, 4096)
            runs[dtype].append(time.perf_counter() - t)
    a, b = features["float32"].astype(np.float64), features["bfloat16"].astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    speed = {dtype: tokens / min(seconds) for dtype, seconds in runs.items()}
    result = {
        "what": __doc__.strip().splitlines()[0],
        "rows": f"{len(ids)} demo rating conversations, {tokens} tokens",
        "native_bf16_cpu": native_bf16_cpu(),
        "auto_bf16_picks": "bfloat16" if native_bf16_cpu() else "float32",
        "tokens_per_s": speed, "seconds": runs,
        "bf16_over_fp32_speed": speed["bfloat16"] / speed["float32"],
        "bf16_vs_fp32_features": {"relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
                                  "min_cosine": float(cosine.min())},
        "load_average_before": load_before, "machine": machine_info(),
    }
    print(f"fp32 {speed['float32']:.0f} tok/s, bf16 {speed['bfloat16']:.0f} tok/s: bf16 is "
          f"{result['bf16_over_fp32_speed']:.2f}x fp32 here; auto-bf16 picks {result['auto_bf16_picks']}")
    print(f"-> {write_result('demo_dtype', result)}")
