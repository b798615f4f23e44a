"""Does the model's uncertainty find bad labels, and does acting on it help? SmolLM2 features, real and synthetic pairs, seeded.

The offline backbone (SmolLM2-135M-Instruct, fp32 on CPU) over the N shortest real hh-rlhf harmless pairs, the
synthetic generator's preference pairs (synthetic:preferences, seed 1 as in the demo preset) and its rated rows
(the generator's labels and preferences are true by construction), cached once in cache/bench-curate.
Steps 1 and 2 run on each of the two pair sets (sections `hh-rlhf`, `synthetic`; step 3 is `best-of-n`;
--only SECTION runs one, keeping the others' figures in curate.json).
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
              --drop-suspect-only, --keep-certain 0.8), and, as a control, on as many noisy pairs as the default
              rule keeps drawn at random; held-out accuracy of each; the share of the accuracy lost to the noise
              that curating recovers.
  3. best-of-n on the pool (true reward R = the generator's PAIR_WEIGHTS . true labels): the model's score under
              the same weights (so the only error is the value head's), n rows drawn at random, the row each rule
              picks: mean (the score), lcb (score - k std), min (the worst member), uwo (members' mean - lambda x
              their variance); the picked row's true reward, and how often it is truly low (true R in the pool's
              bottom half) although the rule rated it highest.
Repeated over --seeds flip draws (1, 2) and pool draws (3). Writes bench/results/curate.json: the hh-rlhf section
at the top level (as before), the synthetic pairs' under "synthetic_pairs".

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
DEFAULT, CONTROL = "keep_certain_0.5", "random_same_size"


# ----------------------------------------------------------------------------------------------
# Data


def synthetic_pairs_source(n: int) -> str:
    """The generator's preference pairs, seed 1 as in the demo preset (its rated rows are seed 0)."""
    return f"synthetic:preferences?n={n}&seed=1"


def extract(args, sections) -> tuple[dict[str, Path], float]:
    """The caches the sections need, by name: ratings, and preferences (hh-rlhf) and/or synthetic_preferences
    (resumable: a rerun reuses them); and the seconds extraction took."""
    from bench.gating_real import write_pairs_jsonl
    from pipeline.configs import SMOLLM2_GGUF, DatasetSpec, ExtractConfig
    from pipeline.recipes.extract import run_extract

    t0 = time.perf_counter()
    cache = Path(args.cache_dir)
    datasets = {"ratings": DatasetSpec("ratings", "ratings", f"synthetic:ratings?n={args.ratings}&seed=0")}
    if "hh-rlhf" in sections:
        pairs_file = cache / f"hh-rlhf-harmless-shortest-{args.pairs}.jsonl"
        if not pairs_file.is_file():
            write_pairs_jsonl(shortest_real_pairs(args.pairs), pairs_file)
        datasets["preferences"] = DatasetSpec("preferences", "preferences", str(pairs_file))
    if "synthetic" in sections:
        datasets["synthetic_preferences"] = DatasetSpec("synthetic_preferences", "preferences",
                                                        synthetic_pairs_source(args.synthetic_pairs))
    run_extract(ExtractConfig(backbone=SMOLLM2_GGUF, cache_dir=str(cache), datasets=datasets, storage_dtype="float32",
                              max_length=1024, part_rows=512, max_tokens_per_batch=4096))
    return {name: cache / name for name in datasets}, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# The model pieces (the library's own: stage 1, stage 2, the curation math)


def value_head(x, y, seed: int):
    from pipeline.configs import ValueHeadConfig, build
    from pipeline.train import fit_value_head

    return fit_value_head(x, y, build(ValueHeadConfig, dict(device="cpu", seed=seed))).heads


GATE_FOLDS = 2  # --gate auto's cross-validation folds (the command's default is 5: 2 keeps the bench in minutes)


def gate(value, xc, xr, seed: int):
    """Stage 2 as `urm train-gating` runs it (--gate auto); the heads and their pair temperatures."""
    from pipeline.configs import GatingConfig, build
    from pipeline.train import fit_gate

    cfg = build(GatingConfig, dict(device="cpu", seed=seed, gate_folds=GATE_FOLDS))
    fit = fit_gate(xc, xr, value, cfg)
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
    # the control: as many noisy pairs as the default rule keeps, drawn at random (what halving the data alone costs)
    control = torch.zeros(len(xc), dtype=torch.bool)
    draw = torch.randperm(len(xc), generator=torch.Generator().manual_seed(3000 + seed))
    control[draw[: int(runs[DEFAULT].sum())]] = True
    runs[CONTROL] = control
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


def flip_summary(flips: list[dict]) -> dict:
    """Steps 1 and 2 over the seeds: each signal's AUROC, the judge's accuracy and the AUROC it bounds, held-out
    accuracy of each training set, the share of the noise's loss each rule recovers, and the targets."""
    training = {name: {key: mean_sd([f["training"][name][key] for f in flips])
                       for key in ("held_out_accuracy", "probe_held_out_accuracy", "pairs", "flipped_kept")}
                for name in ("clean", "noisy", *RULES, CONTROL)}
    for name, t in training.items():
        t["gate_kinds"] = {kind: sum(f["training"][name]["gate"] == kind for f in flips)
                           for kind in sorted({f["training"][name]["gate"] for f in flips})}
    acc = {name: t["held_out_accuracy"]["mean"] for name, t in training.items()}
    probe = {name: t["probe_held_out_accuracy"]["mean"] for name, t in training.items()}
    lost, probe_lost = acc["clean"] - acc["noisy"], probe["clean"] - probe["noisy"]
    recovered = {name: (acc[name] - acc["noisy"]) / lost if lost > 0 else None for name in (*RULES, CONTROL)}
    probe_recovered = {name: (probe[name] - probe["noisy"]) / probe_lost if probe_lost > 0 else None
                       for name in (*RULES, CONTROL)}
    auroc = {name: mean_sd([f["auroc"][name] for f in flips]) for name in SIGNAL_NAMES}
    best = max((s for s in SIGNAL_NAMES if s != "random"), key=lambda s: auroc[s]["mean"])
    judge = mean_sd([f["judge_accuracy"] for f in flips])
    normal = torch.distributions.Normal(0.0, 1.0)
    # a judge right on a share a of the pairs, its gap d ~ N(m, 1) with Phi(m) = a: flipped pairs' gaps are
    # N(-m, 1), so the gap ranks them with AUROC Phi(sqrt(2) m) (0.7 needs a >= 0.645)
    expected = normal.cdf(2 ** 0.5 * normal.icdf(torch.tensor(judge["mean"]))).item()
    return {
        "flip_detection_auroc": auroc, "best_signal": best, "judge_accuracy_on_true_labels": judge,
        "auroc_a_gaussian_gap_judge_of_that_accuracy_would_give": expected,
        "target_auroc_above_0.7": auroc[best]["mean"] > 0.7,
        "training": training, "accuracy_lost_to_noise": lost, "share_recovered": recovered,
        "probe_accuracy_lost_to_noise": probe_lost, "probe_share_recovered": probe_recovered,
        "target_recover_half": bool(lost > 0 and recovered["keep_certain_0.5"] is not None
                                    and recovered["keep_certain_0.5"] >= 0.5),
        "suspects": mean_sd([f["suspects"] for f in flips]),
        "flipped_among_suspects": mean_sd([f["flipped_among_suspects"] for f in flips]),
    }


def print_seed(section: str, seed: int, f: dict) -> None:
    acc = {k: (round(v["held_out_accuracy"], 3), round(v["probe_held_out_accuracy"], 3))
           for k, v in f["training"].items()}
    print(f"{section} seed {seed}: AUROC {({k: round(v, 3) for k, v in f['auroc'].items()})}; held-out "
          f"(gate, probe) {acc}", flush=True)


def print_summary(section: str, s: dict) -> None:
    best, acc = s["best_signal"], {k: v["held_out_accuracy"]["mean"] for k, v in s["training"].items()}
    print(f"{section}: flip AUROC (best: {best}) {s['flip_detection_auroc'][best]['mean']:.3f}; held-out accuracy "
          f"clean {acc['clean']:.3f}, noisy {acc['noisy']:.3f}, curated {acc['keep_certain_0.5']:.3f}", flush=True)


SECTIONS = ("hh-rlhf", "synthetic", "best-of-n")
HH_RLHF_KEYS = ("data", "flip_detection_auroc", "best_signal", "judge_accuracy_on_true_labels",
                "auroc_a_gaussian_gap_judge_of_that_accuracy_would_give", "target_auroc_above_0.7", "training",
                "accuracy_lost_to_noise", "share_recovered", "probe_accuracy_lost_to_noise", "probe_share_recovered",
                "target_recover_half", "suspects", "flipped_among_suspects")


def main(argv: list[str] | None = None) -> dict:
    import json

    from bench import RESULTS
    from pipeline.cache import read_features, read_pairs
    from pipeline.train import split_rows

    ap = argparse.ArgumentParser(prog="python -m bench curate")
    ap.add_argument("--pairs", type=int, default=800, help="shortest real hh-rlhf pairs to use")
    ap.add_argument("--synthetic-pairs", type=int, default=300,
                    help="the synthetic generator's preference pairs (labels true by construction; ~130 tokens a side)")
    ap.add_argument("--ratings", type=int, default=500, help="synthetic rated rows (value head + best-of-n pool)")
    ap.add_argument("--seeds", type=int, default=5, help="flip draws (and pool draws)")
    ap.add_argument("--draws", type=int, default=2000, help="best-of-n draws per n and seed")
    ap.add_argument("--only", action="append", choices=SECTIONS,
                    help="run only this section (repeatable); the others' figures already in curate.json are kept")
    ap.add_argument("--cache-dir", default=str(ROOT / "cache" / "bench-curate"))
    args = ap.parse_args(argv or [])
    sections = set(args.only or SECTIONS)
    if "hh-rlhf" in sections and not HH_RLHF.is_file():
        print(f"hh-rlhf section skipped: {HH_RLHF} not found (real data lives in ../shared/data)")
        sections.discard("hh-rlhf")
    if not sections:
        return {}
    caches, extract_seconds = extract(args, sections)
    ratings = read_features(caches["ratings"])
    x, y = ratings.embedding.float(), ratings.labels.float()
    pair_sets = {}
    for section, name in (("hh-rlhf", "preferences"), ("synthetic", "synthetic_preferences")):
        if section in sections:
            pairs = read_pairs(caches[name])
            pair_sets[section] = pairs.chosen.embedding.float(), pairs.rejected.embedding.float()
    flips = {section: [] for section in pair_sets}
    seconds = {section: 0.0 for section in sections}
    bon = []
    for seed in range(args.seeds):
        t = time.perf_counter()
        train_rows, pool = split_rows(len(x), 0.4, seed)
        value = value_head(x[train_rows], y[train_rows], seed)
        head_seconds = time.perf_counter() - t
        for section, (xc_all, xr_all) in pair_sets.items():
            t = time.perf_counter()
            train, test = split_rows(len(xc_all), 0.25, seed)
            flips[section].append(noisy_labels(value, xc_all[train], xr_all[train], xc_all[test], xr_all[test], seed))
            seconds[section] += head_seconds + time.perf_counter() - t
            print_seed(section, seed, flips[section][-1])
        if "best-of-n" in sections:
            t = time.perf_counter()
            bon.append(best_of_n(value, x[pool], y[pool], (4, 16), args.draws, seed))
            seconds["best-of-n"] += head_seconds + time.perf_counter() - t
    path = RESULTS / "curate.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    result = {"what": __doc__.split("\n")[0]}
    if "hh-rlhf" in sections:
        n = len(pair_sets["hh-rlhf"][0])
        result["data"] = {"pairs": f"{n} shortest pairs of {HH_RLHF.name} (75% training, 25% held out, seeded)",
                          "ratings": f"synthetic:ratings?n={args.ratings}&seed=0 (60% value head, 40% best-of-n pool)",
                          "flipped": FLIP, "seeds": args.seeds, "draws": args.draws}
        result.update(flip_summary(flips["hh-rlhf"]))
        print_summary("hh-rlhf", result)
    else:
        result.update({key: previous[key] for key in HH_RLHF_KEYS if key in previous})
    if "best-of-n" in sections:
        bon_summary = {n: {rule: {key: mean_sd([b[n][rule][key] for b in bon])
                                  for key in ("true_reward", "regret", "truly_low_picked")}
                           for rule in ("mean", "lcb", "min", "uwo")} for n in (4, 16)}
        bon_summary["score_truth_pearson"] = mean_sd([b["score_truth_pearson"] for b in bon])
        for n in (4, 16):
            bon_summary[n]["oracle_true_reward"] = mean_sd([b[n]["oracle_true_reward"] for b in bon])
            bon_summary[n]["random_true_reward"] = mean_sd([b[n]["random_true_reward"] for b in bon])
        result["best_of_n"] = bon_summary
    elif "best_of_n" in previous:
        result["best_of_n"] = previous["best_of_n"]
    if "hh-rlhf" in sections:
        result.update(extract_seconds=extract_seconds, bench_seconds=seconds["hh-rlhf"] + seconds.get("best-of-n", 0),
                      machine=machine_info())
    else:
        result.update({key: previous[key] for key in ("extract_seconds", "bench_seconds", "machine") if key in previous})
    if "synthetic" in sections:
        n = len(pair_sets["synthetic"][0])
        result["synthetic_pairs"] = {
            "data": {"pairs": f"{synthetic_pairs_source(n)}: the generator's pairs, preference true by construction "
                              "(75% training, 25% held out, seeded)",
                     "ratings": f"synthetic:ratings?n={args.ratings}&seed=0 (the value head on the same 60%)",
                     "flipped": FLIP, "seeds": args.seeds},
            **flip_summary(flips["synthetic"]),
            "extract_seconds": extract_seconds, "bench_seconds": seconds["synthetic"], "machine": machine_info()}
        print_summary("synthetic", result["synthetic_pairs"])
    elif "synthetic_pairs" in previous:
        result["synthetic_pairs"] = previous["synthetic_pairs"]
    print(f"-> {write_result('curate', result)}")
    return result


if __name__ == "__main__":
    main()
