"""How far SGLang's float16 gate moves our score: SmolLM2 features, heads in the published URM shape.

SGLang serves an export in the published layout with LlamaForSequenceClassificationWithNormal_Weights,
whose gate (``weights.fc``) runs in float16 (python/sglang/srt/models/llama_reward.py); our model keeps
the heads in float32. On SmolLM2-135M-Instruct (fp32 on CPU) last-token features of synthetic
HelpSteer2-schema rows: a value head (the default recipe) and a URM gate as wide as the backbone (the
published shape) are fitted, then every held-out pair is scored both ways: the score's absolute gap and
how many pair decisions (sign of s_chosen - s_rejected) the float16 gate flips. The caches are resumable.
Writes bench/results/published_gap.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench import machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]


def published_score(heads, h: torch.Tensor, gate_dtype: torch.dtype) -> torch.Tensor:
    """SGLang's reward on h: sum_k mu_k w_k with the gate run in ``gate_dtype`` (its Weights.forward)."""
    mu = heads.score(h)[:, 0::2]
    w = heads.weights.fc.to(gate_dtype)(h.to(gate_dtype))
    heads.weights.fc.float()
    return (mu * w).sum(-1).float()


def main(argv: list[str] | None = None) -> dict:
    from pipeline.cache import read_features, read_pairs
    from pipeline.configs import SMOLLM2_GGUF, DatasetSpec, ExtractConfig, GatingConfig, ValueHeadConfig, build
    from pipeline.recipes.extract import run_extract
    from pipeline.train import fit_gate, fit_value_head

    ap = argparse.ArgumentParser(prog="python -m bench published_gap")
    ap.add_argument("--ratings", type=int, default=120)
    ap.add_argument("--pairs", type=int, default=80)
    ap.add_argument("--cache-dir", default=str(ROOT / "cache" / "bench-published-gap"))
    args = ap.parse_args(argv or [])
    cache = Path(args.cache_dir)
    datasets = {"ratings": DatasetSpec("ratings", "ratings", f"synthetic:ratings?n={args.ratings}&seed=0"),
                "preferences": DatasetSpec("preferences", "preferences",
                                           f"synthetic:preferences?n={args.pairs}&seed=1")}
    t0 = time.perf_counter()
    run_extract(ExtractConfig(backbone=SMOLLM2_GGUF, cache_dir=str(cache), datasets=datasets, storage_dtype="float32",
                              dtype="float32", device="cpu", max_tokens_per_batch=4096))
    ratings, pairs = read_features(cache / "ratings"), read_pairs(cache / "preferences")
    value = fit_value_head(ratings.embedding, ratings.labels, build(ValueHeadConfig, {"device": "cpu"}))
    n = len(pairs.chosen.embedding) // 2  # the gate on the first half of the pairs, scored on the rest
    chosen, rejected = pairs.chosen.embedding, pairs.rejected.embedding
    gated = fit_gate(chosen[:n], rejected[:n], value.heads, build(GatingConfig, {"gate": "urm", "device": "cpu"}))
    heads = gated.heads.float().eval()
    with torch.no_grad():
        s32 = {side: heads(x[n:].float())["score"] for side, x in (("chosen", chosen), ("rejected", rejected))}
        s16 = {side: published_score(heads, x[n:].float(), torch.float16)
               for side, x in (("chosen", chosen), ("rejected", rejected))}
    gap = torch.cat([(s16[s] - s32[s]).abs() for s in s32])
    flips = ((s32["chosen"] > s32["rejected"]) != (s16["chosen"] > s16["rejected"])).sum().item()
    margin = (s32["chosen"] - s32["rejected"]).abs()
    result = {"what": __doc__.splitlines()[0], "backbone": SMOLLM2_GGUF, "hidden_size": heads.d,
              "gate_hidden": heads.architecture["gate_hidden"], "scored_pairs": len(margin),
              "score_abs_max": torch.cat(list(s32.values())).abs().max().item(),
              "gap_max": gap.max().item(), "gap_mean": gap.mean().item(), "gap_median": gap.median().item(),
              "pair_decisions_flipped": flips, "smallest_pair_margin": margin.min().item(),
              "seconds": time.perf_counter() - t0, "machine": machine_info()}
    print(f"fp16 gate vs fp32 over {2 * len(margin)} scores (|s| up to {result['score_abs_max']:.3g}): max gap "
          f"{result['gap_max']:.3g}, mean {result['gap_mean']:.3g}; {flips} of {len(margin)} pair decisions flipped")
    write_result("published_gap", result)
    return result
