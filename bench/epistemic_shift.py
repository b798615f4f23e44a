"""Epistemic std in closed form against the bootstrap spread on real features: which flags rows of another source,
and what each costs, side by side in one run.

SmolLM2-135M-Instruct features (fp32, CPU) of real rows: the value head (the default closed-form ridge, 8 bootstrap
members) is fitted on SteerLM rated rows (the train side of ``bench/evaluate_real.py``'s split by conversation, rows
up to ``--max-length`` tokens: shorter than evaluate_real's 2048, so the run takes minutes); the reference is the
held-out SteerLM rows, the other sources both sides of the shortest UltraFeedback eval pairs and of the shortest
hh-rlhf harmless pairs. For each row signal, stage 1 only (equal gate weights), the AUROC with which it tells the
other source's rows from the reference rows (``pipeline.eval.shift_metrics``): ``epistemic_std`` (the ridge
posterior, docs/method.md 10), ``ensemble_std`` (the bootstrap members' spread, docs/method.md 4) and ``score_std``
(aleatoric), with a 90% bootstrap interval (rows resampled) of the epistemic_std - ensemble_std difference. Cost, each the median of ``--repeats`` runs in this process: the fit with 8 members less the fit with 1
(training 8 bootstrap members) against building the posterior factor from the fit's spectrum plus epistemic_std on
every scored row, on these rows (a few hundred: both take milliseconds); and on seeded features of a size where a fit
takes seconds (``--speed-rows`` x ``--speed-dim``), training (the members against the posterior factor) and
inference (epistemic_std against the members' scores, every row) apart. The scale of the number, on the held-out rated rows: their MSE against the fit's leave-one-out MSE
s^2 plus the mean epistemic variance there (equal if both are right). Writes bench/results/epistemic_shift.json;
caches are resumable.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench import HH_RLHF, SHARED_DATA, machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]
UF_EVAL = SHARED_DATA / "ultrafeedback-binarized-sample-eval.jsonl"
MEMBERS = 8


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    """(median wall seconds of ``repeats`` calls of ``fn``, the last call's result)."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def paired_difference_ci(reference, other, resamples: int, seed: int) -> list[float]:
    """The 90% interval of AUROC(epistemic_std) - AUROC(ensemble_std) over ``resamples`` bootstrap resamples of the
    rows (each side resampled apart, both signals on the same resample)."""
    import numpy as np
    import torch

    from pipeline import metrics as M
    from pipeline.eval import row_signals

    ref, oth = row_signals(reference), row_signals(other)
    n_ref, n_oth = len(reference.score), len(other.score)
    truth = torch.cat([torch.zeros(n_ref, dtype=torch.bool), torch.ones(n_oth, dtype=torch.bool)])
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        i, j = torch.from_numpy(rng.integers(n_ref, size=n_ref)), torch.from_numpy(rng.integers(n_oth, size=n_oth))
        diffs.append(M.auroc(torch.cat([ref["epistemic_std"][i], oth["epistemic_std"][j]]), truth)
                     - M.auroc(torch.cat([ref["ensemble_std"][i], oth["ensemble_std"][j]]), truth))
    return [float(np.quantile(diffs, 0.05)), float(np.quantile(diffs, 0.95))]


def cost_at(rows: int, d: int, repeats: int, seed: int) -> dict:
    """The cost comparison on seeded features of a size where fitting takes time (``bench/ridge_fit.py``'s float16
    N(0, 1) rows, ratings with a linear signal), each the median of ``repeats``: at training, the fit with 8 members
    less the fit with 1 (training the members) against the posterior factor from the fit's spectrum (what
    epistemic_std adds to the fit: the spectrum is the fit's own); at inference, epistemic_std of every row against
    the members' scores of every row."""
    import torch

    from bench.ridge_fit import labels, random_features
    from pipeline.configs import ValueHeadConfig, build
    from pipeline.model import epistemic_variance
    from pipeline.train import fit_value_head
    from pipeline.train import ridge as R
    from pipeline.train.closed_form import decomposed
    from pipeline.train.feature_stream import as_rows

    x = random_features(rows, d, seed)
    y = labels(x, "linear", seed + 1)
    one_s, _ = median_seconds(lambda: fit_value_head(x, y, build(ValueHeadConfig, dict(device="cpu", ensemble=1))), repeats)
    many_s, fit = median_seconds(lambda: fit_value_head(x, y, build(ValueHeadConfig, dict(device="cpu",
                                                                                           ensemble=MEMBERS))),
                                 repeats)
    _, sp, _ = decomposed(as_rows(x, torch.device("cpu")), torch.arange(rows), y.double(), "common direction")
    alpha = torch.tensor(list(fit.selection["alpha"].values()), dtype=torch.float64)
    noise = torch.tensor(list(fit.selection["loo_mse"].values()), dtype=torch.float64)
    factor_s, _ = median_seconds(lambda: R.posterior_factor(sp, alpha, noise), repeats)
    heads = fit.heads.eval()
    chunks = [x[i:i + 4096].float() for i in range(0, rows, 4096)]

    def inference(fn):
        with torch.no_grad():
            return median_seconds(lambda: [fn(h) for h in chunks], repeats)[0]

    members_s = max(many_s - one_s, 0.0)
    return {"rows": rows, "hidden_size": d, "decomposition": fit.selection["decomposition"],
            "posterior_basis": [list(g.basis.shape) for g in heads.posterior],
            "fit_1_member_seconds": one_s, f"fit_{MEMBERS}_members_seconds": many_s,
            f"training_{MEMBERS}_bootstrap_members_seconds": members_s, "posterior_factor_seconds": factor_s,
            "members_over_posterior_factor": members_s / factor_s if factor_s else None,
            "at_least_5x_faster": members_s >= 5 * factor_s,
            "inference_rows": rows,
            "epistemic_std_seconds": inference(lambda h: epistemic_variance(heads, h)),
            f"{MEMBERS}_members_scores_seconds": inference(lambda h: heads.ensemble(h)),
            "repeats": repeats}


def main(argv: list[str] | None = None) -> dict:
    import torch

    from bench.evaluate_real import STEERLM, shortest_pairs_file, split_steerlm
    from pipeline.cache import read_features, read_pairs
    from pipeline.configs import SMOLLM2_GGUF, DatasetSpec, ExtractConfig, ValueHeadConfig, build
    from pipeline.eval import shift_metrics
    from pipeline.eval.baselines import heads_scores
    from pipeline.recipes.extract import run_extract
    from pipeline.train import fit_value_head
    from pipeline.train import ridge as R
    from pipeline.train.closed_form import decomposed, label_groups
    from pipeline.train.feature_stream import as_rows

    ap = argparse.ArgumentParser(prog="python -m bench epistemic_shift")
    ap.add_argument("--max-length", type=int, default=640, help="longest SteerLM row (tokens) to train on")
    ap.add_argument("--uf-pairs", type=int, default=100, help="shortest UltraFeedback eval pairs (other source)")
    ap.add_argument("--hh-pairs", type=int, default=100, help="shortest hh-rlhf harmless pairs (other source)")
    ap.add_argument("--held-out", type=float, default=0.25, help="share of SteerLM conversations held out")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each cost, median kept")
    ap.add_argument("--cache-dir", default=str(ROOT / "cache" / "bench-epistemic-shift"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples for the AUROC difference's interval")
    ap.add_argument("--speed-rows", type=int, default=8000, help="rows of the seeded features the cost is timed on")
    ap.add_argument("--speed-dim", type=int, default=1024, help="their width")
    args = ap.parse_args(argv or [])
    if not (STEERLM.is_file() and UF_EVAL.is_file() and HH_RLHF.is_file()):
        print(f"skipped: the real data in {SHARED_DATA} is not there")
        return {}
    cache = Path(args.cache_dir)
    data = cache / "data"
    steer_train, steer_test = split_steerlm(data, args.held_out, args.seed)
    uf = shortest_pairs_file(UF_EVAL, args.uf_pairs, data / f"uf-eval-shortest{args.uf_pairs}.jsonl")
    hh = shortest_pairs_file(HH_RLHF, args.hh_pairs, data / f"hh-harmless-shortest{args.hh_pairs}.jsonl")
    common = dict(backbone=SMOLLM2_GGUF, cache_dir=str(cache), storage_dtype="float32", device="cpu", part_rows=256,
                  max_length=args.max_length, max_tokens_per_batch=8192)
    t0 = time.perf_counter()
    stats = run_extract(ExtractConfig(**common, datasets={
        "ratings": DatasetSpec("ratings", "ratings", str(steer_train)),
        "heldout_ratings": DatasetSpec("heldout_ratings", "ratings", str(steer_test)),
        "ultrafeedback_eval": DatasetSpec("ultrafeedback_eval", "preferences", str(uf)),
        "hh_rlhf_harmless": DatasetSpec("hh_rlhf_harmless", "preferences", str(hh))}))
    extract_seconds = time.perf_counter() - t0
    train = read_features(cache / "ratings")
    x, y = train.embedding.float(), train.labels.float()
    cfg = {m: build(ValueHeadConfig, dict(device="cpu", seed=args.seed, ensemble=m)) for m in (1, MEMBERS)}
    one_s, _ = median_seconds(lambda: fit_value_head(x, y, cfg[1]), args.repeats)
    many_s, fit = median_seconds(lambda: fit_value_head(x, y, cfg[MEMBERS]), args.repeats)
    heads = fit.heads.eval()
    rows = as_rows(x, torch.device("cpu"))
    groups = []
    for cols, idx in label_groups(y.double()):  # each label group's spectrum, as the fit decomposes it
        t = y.double()[idx][:, cols]
        _, sp, _ = decomposed(rows, idx, t, "common direction")
        alpha = torch.tensor([fit.selection["alpha"][a] for a in (fit.selection["alpha"])], dtype=torch.float64)[cols]
        noise = torch.tensor([fit.selection["loo_mse"][a] for a in fit.selection["loo_mse"]], dtype=torch.float64)[cols]
        groups.append((sp, alpha, noise))
    reference = read_features(cache / "heldout_ratings").embedding.float()
    others = {name: torch.cat([p.chosen.embedding, p.rejected.embedding]).float()
              for name in ("ultrafeedback_eval", "hh_rlhf_harmless") for p in [read_pairs(cache / name)]}
    scored = torch.cat([reference, *others.values()])

    def epistemic():
        for sp, alpha, noise in groups:
            R.posterior_factor(sp, alpha, noise)
        with torch.no_grad():
            return heads(scored)["epistemic_std"]

    epistemic_s, _ = median_seconds(epistemic, args.repeats)
    ref_scores = heads_scores(heads, reference)
    # the scale of the stated number, on the held-out rated rows: E[(y - mu)^2] = noise + Var_epi if both are right
    held = read_features(cache / "heldout_ratings")
    with torch.no_grad():
        out, train_out = heads(held.embedding.float()), heads(x)
    labelled = ~torch.isnan(held.labels)
    err = torch.where(labelled, held.labels.double() - out["attribute_means"].double(), 0.0).square()
    names = list(fit.selection["loo_mse"])
    scale = {}
    for k, a in enumerate(names):
        epi = out["attribute_epistemic_stds"][:, k].double().square()[labelled[:, k]].mean().item()
        scale[a] = {"held_out_mse": (err[:, k].sum() / labelled[:, k].sum()).item(),
                    "loo_mse_s2": fit.selection["loo_mse"][a], "mean_epistemic_var": epi,
                    "s2_plus_epistemic": fit.selection["loo_mse"][a] + epi,
                    "mean_epistemic_var_train": train_out["attribute_epistemic_stds"][:, k].double().square().mean().item()}
    shift = {}
    for name, h in others.items():
        other_scores = heads_scores(heads, h)
        got = shift_metrics(ref_scores, other_scores)
        shift[name] = {"rows": got["rows"], "reference_rows": got["reference_rows"], "auroc": got["auroc"],
                       "epistemic_minus_bootstrap_90ci": paired_difference_ci(
                           ref_scores, other_scores, args.bootstrap, args.seed)}
    members_s = max(many_s - one_s, 0.0)
    speed = cost_at(args.speed_rows, args.speed_dim, args.repeats, args.seed)
    result = {"what": " ".join(__doc__.split("\n\n")[0].split()), "backbone": SMOLLM2_GGUF,
              "data": {name: {"rows": s.rows, "dropped": s.dropped} for name, s in stats.items()},
              "train_rows": len(x), "hidden_size": x.shape[1],
              "decomposition": fit.selection["decomposition"], "posterior_rank": [g["rank"] for g in
                                                                                   heads.architecture["posterior"]],
              "alpha": fit.selection["alpha"], "loo_mse": fit.selection["loo_mse"],
              "shift": shift,
              "held_out_scale": scale,
              "epistemic_above_bootstrap": {n: v["auroc"]["epistemic_std"] > v["auroc"]["ensemble_std"]
                                            for n, v in shift.items()},
              "cost": {"fit_1_member_seconds": one_s, f"fit_{MEMBERS}_members_seconds": many_s,
                       f"training_{MEMBERS}_bootstrap_members_seconds": members_s,
                       "epistemic_seconds": epistemic_s, "epistemic_rows_scored": len(scored),
                       "epistemic_is_what": "posterior_factor of every label group's spectrum + epistemic_std of "
                                            "every scored row (the spectrum itself is the fit's, needed without it)",
                       "members_over_epistemic": members_s / epistemic_s if epistemic_s else None,
                       "at_least_5x_faster": members_s >= 5 * epistemic_s, "repeats": args.repeats},
              "cost_at_size": speed,
              "extract_seconds": extract_seconds, "machine": machine_info()}
    path = write_result("epistemic_shift", result)
    print({k: result[k] for k in ("shift", "epistemic_above_bootstrap", "cost", "cost_at_size")})
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
