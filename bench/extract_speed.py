"""Extraction speed on SmolLM2-135M-Instruct over real rows, side by side in one run.

Rows: the 200 shortest real hh-rlhf pairs (400 conversations; the rows of the SmolLM2 test).
Measured, each after a warm-up forward:
  ours_fp32      pipeline.features.embedding.embed_all: length-sorted token-budget batches, right padding
  one_at_a_time  ArmoRM's extractor loop: one conversation per forward, batch 1, no padding
  ours_bf16      embed_all in bfloat16 (on a subset of rows when the CPU has no native bf16)
Model FLOPs = 2 x non-embedding parameters x real tokens (padding excluded), as a share of this
machine's fp32 matmul rate (torch.mm 4096 x 4096, measured in the same run). Padding share =
padded tokens / all tokens processed. Targets on a CPU: ours >= one-at-a-time, >= 70% of the
matmul rate, padding <= 10%. Writes bench/results/extract_speed.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench import HH_RLHF, machine_info, matmul_gflops, shortest_real_pairs, write_result


def non_embedding_params(model) -> int:
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def run_ours(backbone, ids, max_tokens: int) -> dict:
    from pipeline.features import embed_all

    counts = {"tokens": 0, "padded": 0}

    def on_batch(n, tokens, padded):
        counts["tokens"] += tokens
        counts["padded"] += padded

    embed_all(backbone, ids[:2], max_tokens)  # warm-up
    counts.update(tokens=0, padded=0)
    t = time.perf_counter()
    embed_all(backbone, ids, max_tokens, on_batch)
    seconds = time.perf_counter() - t
    return {"rows": len(ids), "tokens": counts["tokens"], "processed_tokens": counts["padded"],
            "padding_share": 1 - counts["tokens"] / counts["padded"], "seconds": seconds,
            "tokens_per_s": counts["tokens"] / seconds, "max_tokens_per_batch": max_tokens}


@torch.inference_mode()
def run_one_at_a_time(backbone, ids) -> dict:
    """ArmoRM's loop: model(conv_ids).last_hidden_state[0][-1].cpu(), one conversation per call."""
    model = backbone.model
    model(input_ids=torch.tensor([ids[0]]))  # warm-up
    t = time.perf_counter()
    for x in ids:
        model(input_ids=torch.tensor([x], device=backbone.device)).last_hidden_state[0][-1].cpu()
    seconds = time.perf_counter() - t
    tokens = sum(len(x) for x in ids)
    return {"rows": len(ids), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> dict:
    from pipeline.configs import SMOLLM2_GGUF
    from pipeline.features import load_backbone, render_ids

    ap = argparse.ArgumentParser(prog="python -m bench extract_speed")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--max-tokens-per-batch", type=int, default=4096)
    ap.add_argument("--bf16-rows", type=int, default=16, help="rows for the bf16 run (slow without native bf16)")
    args = ap.parse_args(argv)
    if not HH_RLHF.is_file():
        print(f"skipped: {HH_RLHF} not found (real data lives in ../shared/data)")
        return {}
    load_before = machine_info()["load_average"]
    pairs = shortest_real_pairs(args.pairs)
    fp32 = load_backbone(SMOLLM2_GGUF, dtype="float32", device="cpu")
    ids = render_ids(fp32.tokenizer, [c for p in pairs for c in (p.chosen, p.rejected)])
    peak = matmul_gflops()
    ours = run_ours(fp32, ids, args.max_tokens_per_batch)
    single = run_one_at_a_time(fp32, ids)
    flops_per_token = 2 * non_embedding_params(fp32.model)
    del fp32
    bf16 = load_backbone(SMOLLM2_GGUF, dtype="bfloat16", device="cpu")
    ours_bf16 = run_ours(bf16, ids[: args.bf16_rows], args.max_tokens_per_batch)
    for r in (ours, single, ours_bf16):
        r["model_gflops_per_s"] = flops_per_token * r["tokens_per_s"] / 1e9
        r["share_of_fp32_matmul_rate"] = r["model_gflops_per_s"] / peak
    result = {
        "what": __doc__.split("\n")[0],
        "rows": f"{args.pairs} shortest pairs of {HH_RLHF.name} = {len(ids)} conversations, "
                f"{sum(len(x) for x in ids)} tokens (lengths {min(map(len, ids))}-{max(map(len, ids))})",
        "flops_per_token": flops_per_token,
        "fp32_matmul_gflops": peak,
        "ours_fp32": ours,
        "one_at_a_time_fp32": single,
        "ours_bf16": ours_bf16,
        "speedup_vs_one_at_a_time": ours["tokens_per_s"] / single["tokens_per_s"],
        "targets": {
            "not_slower_than_one_at_a_time": ours["tokens_per_s"] >= single["tokens_per_s"],
            "share_of_matmul_rate_ge_70pct": ours["share_of_fp32_matmul_rate"] >= 0.70,
            "padding_le_10pct": ours["padding_share"] <= 0.10,
        },
        "load_average_before": load_before,
        "machine": machine_info(),
    }
    path = write_result("extract_speed", result)
    print(f"ours fp32 {ours['tokens_per_s']:.0f} tok/s (padding {ours['padding_share']:.1%}, "
          f"{ours['share_of_fp32_matmul_rate']:.0%} of {peak:.0f} GFLOP/s) | one-at-a-time "
          f"{single['tokens_per_s']:.0f} tok/s | ours bf16 {ours_bf16['tokens_per_s']:.0f} tok/s "
          f"({args.bf16_rows} rows) -> {path}")
    return result


if __name__ == "__main__":
    main()
