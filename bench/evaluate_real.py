"""Uncertainty on real data: SmolLM2 features of real rated rows and real pairs, `urm evaluate` with every baseline.

The whole pipeline on the offline backbone (SmolLM2-135M-Instruct, fp32 on CPU), real data only:
  ratings   the SteerLM sample of ../shared/data (512 rows rated on the five HelpSteer attributes;
            rows up to 2048 tokens), split train / held out by conversation (rows that continue the same
            first user turn stay on one side), seeded;
  pairs     training: the N shortest UltraFeedback pairs of its train sample; held out: UltraFeedback's
            eval sample (pairs up to 1024 tokens) and the shortest hh-rlhf harmless pairs (another kind
            of preference: a shift the uncertainty should see).
Stage 1 with the default recipe (closed-form ridge, sigma from the leave-one-out residuals calibrated on
held-out rows, 8 bootstrap members, the ridge posterior), stage 2 `--gate auto`, then `urm evaluate` with every
baseline and the shift check (the demo's synthetic rated rows as another rated source; epistemic_std, the
posterior's, beside the bootstrap spread ensemble_std), its report (report.md,
report.json, plots) kept in
bench/results/evaluate_real/. Measured against the targets of the evaluate issue (not tests):
  - calibrated sigma: coverage of the central 90% interval on the held-out ratings within 0.85-0.95
    for every attribute (reparam alone: far less);
  - ECE of P(chosen) on held-out pairs <= 0.05 at the fitted temperature (beside the ECE a perfectly
    calibrated model would show on as few pairs: the noise floor);
  - AUROC of at least one uncertainty signal for the wrong pairs > 0.5, and accuracy on the most
    certain half above the overall accuracy.
Caches are resumable: a rerun reuses them. Writes bench/results/evaluate_real.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

from bench import HH_RLHF, RESULTS, SHARED_DATA, machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]
STEERLM = SHARED_DATA / "steerlm-attributes-sample512.jsonl"
UF_TRAIN = SHARED_DATA / "ultrafeedback-binarized-sample-train.jsonl"
UF_EVAL = SHARED_DATA / "ultrafeedback-binarized-sample-eval.jsonl"


def split_steerlm(folder: Path, held_out: float, seed: int) -> tuple[Path, Path]:
    """The SteerLM file's lines in two files, grouped by the first user turn (no conversation on both sides)."""
    from pipeline.atomic import write_text

    train, test = [], []
    for line in STEERLM.read_text().splitlines():
        first = json.loads(line)["conversations"][0]["value"].split("<extra_id_1>")[0]
        bucket = int(hashlib.sha256(f"{seed}:{first}".encode()).hexdigest(), 16) % 1000 / 1000
        (test if bucket < held_out else train).append(line)
    paths = folder / "steerlm-train.jsonl", folder / "steerlm-heldout.jsonl"
    for path, lines in zip(paths, (train, test)):
        write_text(path, "".join(line + "\n" for line in lines))
    return paths


def shortest_pairs_file(source: Path, n: int, path: Path) -> Path:
    from pipeline.atomic import write_text
    from pipeline.data.testing import shortest_real_pairs

    pairs = shortest_real_pairs(n, source)
    write_text(path, "".join(json.dumps({"id": p.pair_id, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                             for p in pairs))
    return path


def targets(report: dict) -> dict:
    """The issue's measured targets, on the main model (the heads under evaluation) and reparam alone."""
    models = {m["name"]: m for m in report["models"]}
    main, raw = models["URM (these heads)"], models.get("URM, reparam, sigma as trained")
    coverage = {a: v["coverage90"] for a, v in main["attributes"]["per_attribute"].items()}
    out = {"coverage90_calibrated": coverage,
           "coverage90_reparam_alone": {a: v["coverage90"] for a, v in raw["attributes"]["per_attribute"].items()}
           if raw else None,
           "coverage90_within_0.85_0.95": {a: 0.85 <= c <= 0.95 for a, c in coverage.items()}, "pairs": {}}
    for dataset, p in main["pairs"].items():
        best = max(p["signals"].items(), key=lambda kv: kv[1]["auroc"] if kv[1]["auroc"] is not None else 0.5)
        out["pairs"][dataset] = {"accuracy": p["accuracy"], "ece_at_temperature": p["calibration"]["ece"],
                                 "ece_le_0.05": p["calibration"]["ece"] <= 0.05,
                                 "ece_if_calibrated": p["calibration"]["ece_if_calibrated"],
                                 "ece_within_noise_floor": p["calibration"]["ece"] <= p["calibration"]["ece_if_calibrated"],
                                 "best_signal": best[0], "best_auroc": best[1]["auroc"],
                                 "auroc_gt_0.5": any((s["auroc"] or 0) > 0.5 for s in p["signals"].values()),
                                 "accuracy_on_most_certain_half": {n: s["accuracy_at_50"] for n, s in p["signals"].items()},
                                 "most_certain_half_above_overall": any(s["accuracy_at_50"] > p["accuracy"]
                                                                        for s in p["signals"].values())}
    out["shift"] = {cache: {"auroc": v["auroc"], **({"coverage90": v["attributes"]["coverage90"]}
                                                      if v.get("attributes") else {})}
                    for cache, v in main.get("shift", {}).items()}
    out["shift_auroc_gt_0.6"] = {cache: any((a or 0) > 0.6 for a in v["auroc"].values())
                                 for cache, v in out["shift"].items()}
    out["wrong_pair_auroc_of_the_ensemble"] = {d: {k: p["signals"][k]["auroc"] for k in
                                                   ("ensemble_std", "ensemble_range", "ensemble_z") if k in p["signals"]}
                                               for d, p in main["pairs"].items()}
    # the two epistemic signals on the same caches: the ridge posterior's std (closed form) and the bootstrap spread
    out["epistemic_vs_bootstrap"] = {
        "shift_auroc": {c: {k: v["auroc"].get(k) for k in ("epistemic_std", "ensemble_std")}
                        for c, v in out["shift"].items()},
        "wrong_pair_auroc": {d: {k: p["signals"][k]["auroc"] for k in ("epistemic_std", "ensemble_std")
                                 if k in p["signals"]} for d, p in main["pairs"].items()}}
    out["chosen"] = report.get("chosen")
    return out


def main(argv: list[str] | None = None) -> dict:
    from pipeline.configs import (SMOLLM2_GGUF, DatasetSpec, EvaluateConfig, ExtractConfig, GatingConfig,
                                  ValueHeadConfig, build)
    from pipeline.recipes.evaluate import run_evaluate, summary
    from pipeline.recipes.extract import run_extract
    from pipeline.recipes.train import train_gating, train_value_head

    ap = argparse.ArgumentParser(prog="python -m bench evaluate_real")
    ap.add_argument("--train-pairs", type=int, default=600, help="shortest UltraFeedback train pairs for the gate")
    ap.add_argument("--hh-pairs", type=int, default=200, help="shortest hh-rlhf pairs held out")
    ap.add_argument("--held-out", type=float, default=0.25, help="share of SteerLM conversations held out")
    ap.add_argument("--cache-dir", default=str(ROOT / "cache" / "bench-evaluate-real"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ridge-alpha", default="shared", choices=("shared", "per-attribute"))
    args = ap.parse_args(argv or [])
    if not (STEERLM.is_file() and UF_TRAIN.is_file() and HH_RLHF.is_file()):
        print(f"skipped: the real data in {SHARED_DATA} is not there")
        return {}
    cache = Path(args.cache_dir)
    data = cache / "data"
    steer_train, steer_test = split_steerlm(data, args.held_out, args.seed)
    uf_train = shortest_pairs_file(UF_TRAIN, args.train_pairs, data / f"uf-train-shortest{args.train_pairs}.jsonl")
    hh = shortest_pairs_file(HH_RLHF, args.hh_pairs, data / f"hh-harmless-shortest{args.hh_pairs}.jsonl")
    common = dict(backbone=SMOLLM2_GGUF, cache_dir=str(cache), storage_dtype="float32", device="cpu", part_rows=256)
    t0 = time.perf_counter()
    stats = run_extract(ExtractConfig(**common, max_length=2048, max_tokens_per_batch=8192, datasets={
        "ratings": DatasetSpec("ratings", "ratings", str(steer_train)),
        "eval_ratings": DatasetSpec("eval_ratings", "ratings", str(steer_test))}))
    stats.update(run_extract(ExtractConfig(**common, max_length=1024, max_tokens_per_batch=8192, datasets={
        "preferences": DatasetSpec("preferences", "preferences", str(uf_train)),
        "ultrafeedback_eval": DatasetSpec("ultrafeedback_eval", "preferences", str(UF_EVAL)),
        "hh_rlhf_harmless": DatasetSpec("hh_rlhf_harmless", "preferences", str(hh)),
        # another source of rated rows (the demo's generator): the shift check's coverage there (a label shift too)
        "synthetic_ratings": DatasetSpec("synthetic_ratings", "ratings", "synthetic:ratings?n=80&seed=2")})))
    extract_seconds = time.perf_counter() - t0
    heads_dir = str(cache / "heads")
    run = dict(cache_dir=str(cache), heads_dir=heads_dir, seed=args.seed, device="cpu")
    t0 = time.perf_counter()
    stage1 = train_value_head(build(ValueHeadConfig, dict(**run, batch_size=32, epochs=400, patience=20,
                                                          ridge_alpha=args.ridge_alpha,
                                                          calibration_fraction=0.15, val_fraction=0.15)))
    stage2 = train_gating(build(GatingConfig, dict(**run, gate_batch_size=32, gate_patience=5,
                                                   gate_val_fraction=0.2)))
    train_seconds = time.perf_counter() - t0
    report_dir = RESULTS / "evaluate_real"
    shutil.rmtree(report_dir, ignore_errors=True)
    report = run_evaluate(build(EvaluateConfig, dict(cache_dir=str(cache), heads_dir=heads_dir, device="cpu",
                                                     eval_preferences=["ultrafeedback_eval", "hh_rlhf_harmless"],
                                                     eval_ratings="eval_ratings", shift_ratings=["synthetic_ratings"],
                                                     report_dir=str(report_dir))))
    result = {"what": __doc__.split("\n")[0], "backbone": SMOLLM2_GGUF,
              "data": {name: {"rows": s.rows, "dropped": s.dropped, "tokens": s.tokens} for name, s in stats.items()},
              "extract_seconds": extract_seconds, "train_seconds": train_seconds,
              "evaluate_seconds": report["seconds"], "stage1_val": stage1["val"], "stage2_val": stage2["val"],
              "targets": targets(report), "report": str(report_dir.relative_to(ROOT)), "machine": machine_info()}
    path = write_result("evaluate_real", result)
    print(summary(report))
    print(json.dumps(result["targets"], indent=1))
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
