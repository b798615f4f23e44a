"""Does stage-2 gating help on real pairs? SmolLM2 features, value head vs value head + gate.

The whole pipeline on the offline backbone (SmolLM2-135M-Instruct, fp32 on CPU):
  1. extract synthetic HelpSteer2-schema ratings and real hh-rlhf pairs (the N shortest of
     harmless-base test, written as a derived JSONL under the cache folder) with `run_extract`;
  2. stage 1: the value head on the ratings (`train_value_head`);
  3. stage 2: the URM gate on the pairs, train / validation split of the pairs (`train_gating`).
Reported: validation pairwise accuracy and BT loss of the gate against the equal-weight
combination (w_k = 1/K) of the same frozen value head, on the same validation pairs, and the
gate weights' spread across prompts. The caches are resumable: a rerun reuses them.
Writes bench/results/gating_real.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench import HH_RLHF, machine_info, shortest_real_pairs, write_result

ROOT = Path(__file__).resolve().parents[1]


def write_pairs_jsonl(pairs, path: Path) -> None:
    """Pairs as conversational chosen/rejected message lists (TRL's format), atomically."""
    from pipeline.atomic import write_text

    write_text(path, "".join(json.dumps({"id": p.pair_id, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                             for p in pairs))


def main(argv: list[str] | None = None) -> dict:
    from pipeline.configs import SMOLLM2_GGUF, DatasetSpec, ExtractConfig, GatingConfig, ValueHeadConfig, build
    from pipeline.recipes.extract import run_extract
    from pipeline.recipes.train import train_gating, train_value_head

    ap = argparse.ArgumentParser(prog="python -m bench gating_real")
    ap.add_argument("--pairs", type=int, default=1200, help="shortest real hh-rlhf pairs to use")
    ap.add_argument("--ratings", type=int, default=500, help="synthetic rating rows for stage 1")
    ap.add_argument("--cache-dir", default=str(ROOT / "cache" / "bench-smollm2"))
    ap.add_argument("--loss", default="nll")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv or [])
    if not HH_RLHF.is_file():
        print(f"skipped: {HH_RLHF} not found (real data lives in ../shared/data)")
        return {}
    cache = Path(args.cache_dir)
    pairs_file = cache / f"hh-rlhf-harmless-shortest-{args.pairs}.jsonl"
    if not pairs_file.is_file():
        write_pairs_jsonl(shortest_real_pairs(args.pairs), pairs_file)
    datasets = {
        "ratings": DatasetSpec("ratings", "ratings", f"synthetic:ratings?n={args.ratings}&seed=0"),
        "preferences": DatasetSpec("preferences", "preferences", str(pairs_file)),
    }
    t0 = time.perf_counter()
    stats = run_extract(ExtractConfig(backbone=SMOLLM2_GGUF, cache_dir=str(cache), datasets=datasets,
                                      storage_dtype="float32", max_length=1024, part_rows=512,
                                      max_tokens_per_batch=4096))
    extract_seconds = time.perf_counter() - t0
    heads_dir = str(cache / "heads")
    # 450 training rows: small minibatches, so that an epoch is more than one optimiser step
    stage1 = train_value_head(build(ValueHeadConfig, dict(cache_dir=str(cache), heads_dir=heads_dir, loss=args.loss,
                                                          batch_size=32, patience=20, epochs=400, seed=args.seed,
                                                          device="cpu")))
    stage2 = train_gating(build(GatingConfig, dict(cache_dir=str(cache), heads_dir=heads_dir, gate="urm",
                                                   seed=args.seed, device="cpu", gate_val_fraction=0.2)))
    gate, equal = stage2["val"], stage2["val"]["equal_weights"]
    result = {
        "what": __doc__.split("\n")[0],
        "backbone": SMOLLM2_GGUF,
        "data": {"ratings": datasets["ratings"].source, "pairs": f"{args.pairs} shortest pairs of {HH_RLHF.name}",
                 "validation_pairs": round(args.pairs * 0.2)},
        "extract": {name: {"rows": s.rows, "dropped": s.dropped, "tokens": s.tokens,
                           "tokens_per_s": s.tokens_per_s} for name, s in stats.items()},
        "extract_seconds": extract_seconds,
        "stage1_val": stage1["val"],
        "gate_val_accuracy": gate["accuracy"], "equal_weights_val_accuracy": equal["accuracy"],
        "gate_val_bt_loss": gate["bt_loss"], "equal_weights_val_bt_loss": equal["bt_loss"],
        "gate_weights_mean": gate["weights_mean"], "gate_weights_std_across_prompts": gate["weights_std"],
        "gate_beats_equal_weights": gate["accuracy"] > equal["accuracy"],
        "stage2_epochs_run": stage2["epochs_run"],
        "machine": machine_info(),
    }
    path = write_result("gating_real", result)
    print(f"validation accuracy on {round(args.pairs * 0.2)} real pairs: gate {gate['accuracy']:.3f} vs equal "
          f"weights {equal['accuracy']:.3f} (BT loss {gate['bt_loss']:.3f} vs {equal['bt_loss']:.3f}) -> {path}")
    return result


if __name__ == "__main__":
    main()
