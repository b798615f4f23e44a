"""Does the model's uncertainty find bad labels, and does acting on it help? SmolLM2 features, real pairs, seeded.

The offline backbone (SmolLM2-135M-Instruct, fp32 on CPU) over the N shortest real hh-rlhf harmless pairs and the
synthetic generator's rated rows (whose labels are true by construction), cached once in cache/bench-curate.
  value head  stage 1 with the default recipe (closed-form ridge, calibrated sigma, 8 bootstrap members) on a
              seeded 60% of the rated rows; the other 40% are the best-of-n pool.
  pairs       a seeded split: 75% training, 25% held out (labels as given). In the training pairs a seeded 20%
              have their labels flipped (chosen and rejected swapped).
  1. flips    every noisy training pair is judged by a gate that did not see it (2 folds: the gate trained on
              one half's noisy pairs judges the other half; the same math as `urm curate`,
              pipeline.eval.curation); the AUROC with which each signal ranks the flipped pairs first:
              score gap -(s_c - s_r), Gaussian P 1 - P_gauss(chosen), BT 1 - P_bt(chosen), the members' signed
              agreement -ensemble_z, the members' disagreement std_m(d_m) (unsigned), beside a random ranking.
  2. training the gate (--gate auto, as `urm train-gating`, 2 folds) and the linear BT probe on the clean, the noisy and the curated training pairs
              (`urm curate`'s rules on those judgements: the default --keep-certain 0.5 dropping suspects,
              --drop-suspect-only, --keep-certain 0.8), held-out accuracy of each; the share of the accuracy lost
              to the noise that curating recovers.
  3. best-of-n on the pool (true reward R = the generator's PAIR_WEIGHTS . true labels): the model's score under
              the same weights (so the only error is the value head's), n rows drawn at random, the row each rule
              picks: mean (the score), lcb (score - k std), min (the worst member), uwo (members' mean - lambda x
              their variance); the picked row's true reward, and how often it is truly low (true R in the pool's
              bottom half) although the rule rated it highest.
Repeated over --seeds flip draws (1, 2) and pool draws (3). Writes bench/results/curate.json.

The rules are the reward transforms of `urm score` / `urm serve` (``pipeline.model.reward``), applied to the
value head's outputs with the synthetic data's attribute weights (``bon_rewards``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench import HH_RLHF, machine_info, shortest_real_pairs, write_result

ROOT = Path(__file__).resolve().parents[1]
FLIP = 0.2
SIGNAL_NAMES = ("score_gap", "gaussian_p", "bt_p", "ensemble_z", "ensemble_disagreement", "random")
RULES = {"keep_certain_0.5": dict(keep_fraction=0.5), "drop_suspect_only": dict(keep_fraction=1.0,
         drop_suspect_only=True), "keep_certain_0.8": dict(keep_fraction=0.8)}


def quiet(line):
    pass


# ----------------------------------------------------------------------------------------------
# Data


def extract(args) -> tuple[Path, Path]:
    """The ratings and pairs caches (resumable: a rerun reuses them)."""
    from bench.gating_real import write_pairs_jsonl
    from pipeline.configs import SMOLLM2_GGUF, DatasetSpec, ExtractConfig
    from pipeline.recipes.extract import run_extract

    cache = Path(args.cache_dir)
    pairs_file = cache / f"hh-rlhf-harmless-shortest-{args.pairs}.jsonl"
    if not pairs_file.is_file():
        write_pairs_jsonl(shortest_real_pairs(args.pairs), pairs_file)
    datasets = {"ratings": DatasetSpec("ratings", "ratings", f"synthetic:ratings?n={args.ratings}&seed=0"),
                "preferences": DatasetSpec("preferences", "preferences", str(pairs_file))}
    run_extract(ExtractConfig(backbone=SMOLLM2_GGUF, cache_dir=str(cache), datasets=datasets, storage_dtype="float32",
                              max_length=1024, part_rows=512, max_tokens_per_batch=4096))
    return cache / "ratings", cache / "preferences"


# ----------------------------------------------------------------------------------------------
# The model pieces (the library's own: stage 1, stage 2, the curation math)


def value_head(x, y, seed: int):
    from pipeline.configs import ValueHeadConfig, build
    from pipeline.train import fit_value_head

    return fit_value_head(x, y, build(ValueHeadConfig, dict(device="cpu", seed=seed)), log=quiet).heads


GATE_FOLDS = 2  # --gate auto's cross-validation folds (the command's default is 5: 2 keeps the bench in minutes)


def gate(value, xc, xr, seed: int):
    """Stage 2 as `urm train-gating` runs it (--gate auto); the heads and their pair temperatures."""
    from pipeline.configs import GatingConfig, build
    from pipeline.train import fit_gate

    cfg = build(GatingConfig, dict(device="cpu", seed=seed, gate_folds=GATE_FOLDS))
    fit = fit_gate(xc, xr, value, cfg, log=quiet)
    return fit.heads, fit.calibration, fit.val["gate"]


def judged(heads, calibration, xc, xr) -> dict:
    from pipeline.eval.baselines import heads_scores
    from pipeline.eval.curation import judge_pairs

    with torch.no_grad():
        c, r = heads_scores(heads, xc), heads_scores(heads, xr)
    return judge_pairs(c, r, calibration.temperature_bt, calibration.temperature_gaussian)


def accuracy(heads, xc, xr) -> float:
    from pipeline.eval.baselines import heads_scores

    with torch.no_grad():
        return (heads_scores(heads, xc).score > heads_scores(heads, xr).score).double().mean().item()


def probe_accuracy(xc, xr, xc_test, xr_test, seed: int) -> float:
    """Held-out accuracy of the linear BT probe (a reward with d weights, not 5: more room to fit the noise)."""
    from types import SimpleNamespace

    from pipeline.eval.baselines import linear_probe

    probe, _ = linear_probe(xc, xr, 0.1, seed)
    c, r = (probe.scores(SimpleNamespace(embedding=x)).score for x in (xc_test, xr_test))
    return (c > r).double().mean().item()


def suspicion(j: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per pair, how likely each signal says its label is flipped (larger = more suspect)."""
    return {"score_gap": -j["gap"], "gaussian_p": 1 - j["p_chosen_gaussian"], "bt_p": 1 - j["p_chosen"],
            "ensemble_z": -j["ensemble_z"], "ensemble_disagreement": j["ensemble_disagreement"],
            "random": torch.rand(len(j["gap"]), generator=gen, dtype=torch.float64)}


def cross_judged(value, xc, xr, seed: int) -> dict:
    """Every pair judged by a gate trained on the other half of the pairs (2 folds)."""
    perm = torch.randperm(len(xc), generator=torch.Generator().manual_seed(seed))
    halves = perm[: len(xc) // 2], perm[len(xc) // 2:]
    out = {}
    for judge, train in (halves, halves[::-1]):
        heads, calibration, _ = gate(value, xc[train], xr[train], seed)
        for name, values in judged(heads, calibration, xc[judge], xr[judge]).items():
            out.setdefault(name, torch.empty(len(xc), dtype=values.dtype))[judge] = values
    return out


# ----------------------------------------------------------------------------------------------
# 1 + 2: flipped labels


def noisy_labels(value, xc, xr, xc_test, xr_test, seed: int) -> dict:
    from pipeline import metrics as M
    from pipeline.eval.curation import certainty, kept_pairs, suspects

    gen = torch.Generator().manual_seed(1000 + seed)
    flipped = torch.zeros(len(xc), dtype=torch.bool)
    flipped[torch.randperm(len(xc), generator=gen)[: round(FLIP * len(xc))]] = True
    nc, nr = torch.where(flipped[:, None], xr, xc), torch.where(flipped[:, None], xc, xr)
    j = cross_judged(value, nc, nr, seed)
    auroc = {name: M.auroc(s, flipped) for name, s in suspicion(j, gen).items()}
    runs = {"clean": torch.ones(len(xc), dtype=torch.bool), "noisy": torch.ones(len(xc), dtype=torch.bool)}
    suspect = suspects(j["p_chosen"], 0.2)
    for name, rule in RULES.items():
        runs[name] = kept_pairs(certainty(j, "gaussian"), suspect, **rule)
    out = {"auroc": auroc, "judge_accuracy": ((j["gap"] > 0) != flipped).double().mean().item(),
           "suspects": int(suspect.sum()), "flipped_among_suspects": int((suspect & flipped).sum()),
           "training": {}}
    for name, keep in runs.items():
        xa, xb = (xc, xr) if name == "clean" else (nc, nr)
        heads, _, kind = gate(value, xa[keep], xb[keep], seed)
        out["training"][name] = {"pairs": int(keep.sum()), "flipped_kept": int((keep & flipped).sum()) if name != "clean"
                                 else 0, "gate": kind, "held_out_accuracy": accuracy(heads, xc_test, xr_test),
                                 "probe_held_out_accuracy": probe_accuracy(xa[keep], xb[keep], xc_test, xr_test, seed)}
    return out


# ----------------------------------------------------------------------------------------------
# 3: best-of-n with a known truth


def bon_rewards(mu, sigma, member_mu, w, k: float = 1.0, lam: float = 1.0) -> dict[str, torch.Tensor]:
    """The reward each rule gives every row, through the transforms `urm score` / `urm serve` use
    (pipeline.model.rewards): mean = s = w . mu; lcb = s - k sqrt(sum_k w_k^2 sigma_k^2); min = the worst member's
    w . mu_m; uwo = the members' mean - lam x their variance (Coste et al. 2023)."""
    from pipeline.model import reward

    s = mu @ w
    std = (sigma.square() @ w.square()).sqrt()
    members = (member_mu @ w).T  # [N, M]
    parts = {"score": s.numpy(), "score_std": std.numpy(), "ensemble_scores": members.numpy()}
    return {rule: torch.from_numpy(reward(rule, risk, **parts))
            for rule, risk in (("mean", 0.0), ("lcb", k), ("min", 0.0), ("uwo", lam))}


def best_of_n(value, x_pool, y_pool, ns, draws: int, seed: int) -> dict:
    from pipeline import ATTRIBUTES
    from pipeline.data.synthetic import PAIR_WEIGHTS
    from pipeline.model import split_mean_logstd

    w = torch.tensor([PAIR_WEIGHTS[a] for a in ATTRIBUTES], dtype=torch.float64)
    truth = y_pool.double() @ w
    low = truth < truth.median()
    with torch.no_grad():
        mu, log_sigma = (t.double() for t in split_mean_logstd(value.score(x_pool.float())))
        member_mu = split_mean_logstd(value.ensemble(x_pool.float()))[0].double()
    rewards = bon_rewards(mu, log_sigma.exp(), member_mu, w)
    gen = torch.Generator().manual_seed(2000 + seed)
    out = {"score_truth_pearson": torch.corrcoef(torch.stack([rewards["mean"], truth]))[0, 1].item()}
    for n in ns:
        picks = torch.stack([torch.randperm(len(truth), generator=gen)[:n] for _ in range(draws)])  # [draws, n]
        best = truth[picks].max(1).values
        out[n] = {"oracle_true_reward": best.mean().item(), "random_true_reward": truth[picks].mean().item()}
        for rule, r in rewards.items():
            chosen = picks[torch.arange(draws), r[picks].argmax(1)]
            out[n][rule] = {"true_reward": truth[chosen].mean().item(),
                            "regret": (best - truth[chosen]).mean().item(),
                            "truly_low_picked": low[chosen].double().mean().item()}
    return out


# ----------------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def main(argv: list[str] | None = None) -> dict:
    from pipeline.cache import read_features, read_pairs
    from pipeline.train import split_rows

    ap = argparse.ArgumentParser(prog="python -m bench curate")
    ap.add_argument("--pairs", type=int, default=800, help="shortest real hh-rlhf pairs to use")
    ap.add_argument("--ratings", type=int, default=500, help="synthetic rated rows (value head + best-of-n pool)")
    ap.add_argument("--seeds", type=int, default=5, help="flip draws (and pool draws)")
    ap.add_argument("--draws", type=int, default=2000, help="best-of-n draws per n and seed")
    ap.add_argument("--cache-dir", default=str(ROOT / "cache" / "bench-curate"))
    args = ap.parse_args(argv or [])
    if not HH_RLHF.is_file():
        print(f"skipped: {HH_RLHF} not found (real data lives in ../shared/data)")
        return {}
    t0 = time.perf_counter()
    ratings_path, pairs_path = extract(args)
    extract_seconds = time.perf_counter() - t0
    ratings, pairs = read_features(ratings_path), read_pairs(pairs_path)
    x, y = ratings.embedding.float(), ratings.labels.float()
    xc_all, xr_all = pairs.chosen.embedding.float(), pairs.rejected.embedding.float()
    t1 = time.perf_counter()
    flips, bon = [], []
    for seed in range(args.seeds):
        train_rows, pool = split_rows(len(x), 0.4, seed)
        value = value_head(x[train_rows], y[train_rows], seed)
        train, test = split_rows(len(xc_all), 0.25, seed)
        flips.append(noisy_labels(value, xc_all[train], xr_all[train], xc_all[test], xr_all[test], seed))
        bon.append(best_of_n(value, x[pool], y[pool], (4, 16), args.draws, seed))
        acc = {k: (round(v["held_out_accuracy"], 3), round(v["probe_held_out_accuracy"], 3))
               for k, v in flips[-1]["training"].items()}
        print(f"seed {seed}: AUROC {({k: round(v, 3) for k, v in flips[-1]['auroc'].items()})}; held-out "
              f"(gate, probe) {acc}", flush=True)
    training = {name: {key: mean_sd([f["training"][name][key] for f in flips])
                       for key in ("held_out_accuracy", "probe_held_out_accuracy", "pairs", "flipped_kept")}
                for name in ("clean", "noisy", *RULES)}
    acc = {name: t["held_out_accuracy"]["mean"] for name, t in training.items()}
    probe = {name: t["probe_held_out_accuracy"]["mean"] for name, t in training.items()}
    lost, probe_lost = acc["clean"] - acc["noisy"], probe["clean"] - probe["noisy"]
    recovered = {name: (acc[name] - acc["noisy"]) / lost if lost > 0 else None for name in RULES}
    probe_recovered = {name: (probe[name] - probe["noisy"]) / probe_lost if probe_lost > 0 else None for name in RULES}
    auroc = {name: mean_sd([f["auroc"][name] for f in flips]) for name in SIGNAL_NAMES}
    bon_summary = {n: {rule: {key: mean_sd([b[n][rule][key] for b in bon])
                              for key in ("true_reward", "regret", "truly_low_picked")}
                       for rule in ("mean", "lcb", "min", "uwo")} for n in (4, 16)}
    bon_summary["score_truth_pearson"] = mean_sd([b["score_truth_pearson"] for b in bon])
    for n in (4, 16):
        bon_summary[n]["oracle_true_reward"] = mean_sd([b[n]["oracle_true_reward"] for b in bon])
        bon_summary[n]["random_true_reward"] = mean_sd([b[n]["random_true_reward"] for b in bon])
    best = max((s for s in SIGNAL_NAMES if s != "random"), key=lambda s: auroc[s]["mean"])
    judge = mean_sd([f["judge_accuracy"] for f in flips])
    normal = torch.distributions.Normal(0.0, 1.0)
    # a judge right on a share a of the pairs, its gap d ~ N(m, 1) with Phi(m) = a: flipped pairs' gaps are
    # N(-m, 1), so the gap ranks them with AUROC Phi(sqrt(2) m) (0.7 needs a >= 0.645)
    expected = normal.cdf(2 ** 0.5 * normal.icdf(torch.tensor(judge["mean"]))).item()
    result = {
        "what": __doc__.split("\n")[0],
        "data": {"pairs": f"{len(xc_all)} shortest pairs of {HH_RLHF.name} (75% training, 25% held out, seeded)",
                 "ratings": f"synthetic:ratings?n={args.ratings}&seed=0 (60% value head, 40% best-of-n pool)",
                 "flipped": FLIP, "seeds": args.seeds, "draws": args.draws},
        "flip_detection_auroc": auroc, "best_signal": best, "judge_accuracy_on_true_labels": judge,
        "auroc_a_gaussian_gap_judge_of_that_accuracy_would_give": expected,
        "target_auroc_above_0.7": auroc[best]["mean"] > 0.7,
        "training": training, "accuracy_lost_to_noise": lost, "share_recovered": recovered,
        "probe_accuracy_lost_to_noise": probe_lost, "probe_share_recovered": probe_recovered,
        "target_recover_half": bool(lost > 0 and recovered["keep_certain_0.5"] is not None
                                    and recovered["keep_certain_0.5"] >= 0.5),
        "suspects": mean_sd([f["suspects"] for f in flips]),
        "flipped_among_suspects": mean_sd([f["flipped_among_suspects"] for f in flips]),
        "best_of_n": bon_summary,
        "extract_seconds": extract_seconds, "bench_seconds": time.perf_counter() - t1,
        "machine": machine_info(),
    }
    path = write_result("curate", result)
    print(f"flip AUROC (best: {best}) {auroc[best]['mean']:.3f}; held-out accuracy clean {acc['clean']:.3f}, noisy "
          f"{acc['noisy']:.3f}, curated {acc['keep_certain_0.5']:.3f} -> {path}")
    return result


if __name__ == "__main__":
    main()
