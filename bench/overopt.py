"""Over-optimisation with a known gold reward: does a conservative reward keep more gold in best-of-n? SmolLM2 features.

The protocol of Gao et al. 2023 and Coste et al. 2023 (docs/method.md 10) on real features, seeded, on a CPU in minutes:
  pool       SmolLM2-135M-Instruct features (the offline backbone, its default dtype on CPU, float32 cache) of real
             responses from ../shared/data: the shortest pairs of hh-rlhf harmless (150) and UltraFeedback (70), the
             "training" sources; of RMB (120, answers of many LLMs), PandaLM (100) and anthropic-helpful (50), the
             "shift" sources, never trained on; and the 40 shortest SteerLM rows (rated). About 1,000 responses,
             ~80k tokens: the first run embeds them (~6 minutes on 2 cores), later runs reuse the caches.
  gold       per attribute, kernel ridge regression (RBF kernel on the features standardised over the pool, length
             half the median distance between pool rows, alpha by exact leave-one-out) fitted on every real label the
             pool has: the SteerLM rows' five ratings (0-4), and UltraFeedback's 1-10 score of each side mapped to
             0-4 as helpfulness and correctness; combined by fixed gold weights (the project's synthetic PAIR_WEIGHTS:
             helpfulness 1, correctness 0.5, coherence 0.25, complexity 0, verbosity -0.1) and scaled to mean 0, std 1
             over the pool. Why a fair stand-in for a gold model: like Gao's gold RM it is a fixed function of the
             response that encodes real judgements (fitted to them) and is richer than the proxy's function class
             (nonlinear in the features: the best linear function of the features reaches only `gold.linear_share` of
             its variance, LOO R^2), so a linear proxy is misspecified and can only approximate it from the data it is
             given; unlike a real gold model it is fitted on few labels (its LOO R^2 on them is in the result) and it
             flattens towards the labels' mean far from the labelled rows, as any smooth model fitted on them would.
  training   per seed, the proxy data: 30% of the training sources' pairs (and SteerLM rows) are held out as candidates; of the
             rest, a share (`sizes`) is used: rated rows = both sides of those pairs and the SteerLM rows, labelled
             gold attributes + Gaussian noise (std 0.5 x each gold attribute's std over the pool); pairs = the same
             real pairs with their label drawn from the gold by Bradley-Terry, P(a preferred) = sigmoid((G_a - G_b) /
             0.25), then 0% or 25% of the labels flipped (the same draw at both noise levels).
  proxies    this tool's own training (pipeline.train fit_value_head, then fit_gate): the `train-heads` defaults
             (closed-form ridge, calibrated sigma, 8 bootstrap members, its ridge posterior; --gate auto) and the
             seed's recipe (--loss reparam --ensemble 1 --gate urm). Each reward is computed from the heads' outputs
             by the package's transforms (pipeline.model.rewards) at the default --risk 1: mean, lcb (score - score_std:
             aleatoric), elcb (score - epistemic_std: the ridge posterior, epistemic), min and uwo (the
             bootstrap members; default recipe only, the seed's has one member).
  best-of-n  candidates: the held-out rows of the training sources and every row of the shift sources (~750). For
             n = 1, 2, 4, ..., 256: the expected gold reward of the candidate with the highest reward among n drawn at
             random without replacement, exact over every draw (P(the j-th ranked is picked) = C(N-j, n-1) / C(N, n)),
             less the pool's mean gold (= a random pick's): the gold gain, against KL_bon = log n - (n-1)/n; the
             proxy's own gain and the share of picks from shift sources beside it. Mean and 90% t-interval over seeds.
  targets    (reported, not asserted) the default recipe at the full size, n = 256: under 25% flipped the best
             conservative reward keeps >= 1.3 x mean's gold gain with the two 90% intervals apart; at 0% the same
             reward keeps >= 0.95 x mean's.
  curation   the default recipe's 25%-flipped pairs: bench.curate's cross-judging (each pair judged by a gate trained on
             the other half, the math of `urm curate`, pipeline.eval.curation) and signals, with `--signal epistemic`'s
             (1 - P(chosen) under the ridge posterior, epistemic_p) and the pair's unsigned epistemic std
             sqrt(e_c^2 + e_r^2) under the proxy's heads; the AUROC of each for the known flipped pairs (and for
             labels against the gold order); then the gate (--gate auto, 2 folds as bench.curate) trained on the clean,
             noisy, curated (`urm curate`'s rules; the default rule also by --signal epistemic) and random-control
             pairs, its accuracy on the held-out pairs ordered by the gold.
`python -m bench overopt` (10 seeds, sizes 0.5 and 1, both recipes, all curation rules) writes
bench/results/overopt.json and overopt.png; `--quick` (5 seeds, size 1, the default recipe, the default curation rule;
under 10 minutes on 2 cores with the first extraction) writes overopt_quick.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import SHARED_DATA, machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]
STEERLM = SHARED_DATA / "steerlm-attributes-sample512.jsonl"
UF_TRAIN = SHARED_DATA / "ultrafeedback-binarized-sample-train.jsonl"
# The response pool: the shortest pairs of each real file (what a 2-core CPU embeds in minutes). "train" sources give
# the proxy's training rows (a seeded share of their pairs) and candidates (the rest); "shift" sources only candidates.
SOURCES = {  # name: (file, pairs, role)
    "hh-rlhf": ("hh-rlhf-harmless-base-test.jsonl.gz", 150, "train"),
    "ultrafeedback": ("ultrafeedback-binarized-sample-train.jsonl", 70, "train"),
    "rmb": ("rmb-pairwise.jsonl", 120, "shift"),
    "pandalm": ("pandalm-test.jsonl", 100, "shift"),
    "anthropic-helpful": ("anthropic-helpful-subset.jsonl", 50, "shift"),
}
STEERLM_ROWS = 40  # the shortest rated rows of the SteerLM sample (rows are long: ~250 tokens at the shortest)


# ----------------------------------------------------------------------------------------------
# Data: the pool of real responses, embedded once (resumable caches)


def shortest_indices(pairs, n: int) -> list[int]:
    """Indices of the n pairs with the fewest characters, in file order."""
    size = [sum(len(m["content"]) for m in p.chosen + p.rejected) for p in pairs]
    return sorted(sorted(range(len(pairs)), key=lambda i: (size[i], i))[:n])


def write_pool_files(folder: Path) -> dict:
    """The derived JSONL files the caches are extracted from (pairs of each source; the SteerLM rows), and the
    UltraFeedback scores of its pairs' two sides by pair id."""
    from bench.gating_real import write_pairs_jsonl
    from pipeline.atomic import write_text
    from pipeline.data.preferences import load_preferences

    folder.mkdir(parents=True, exist_ok=True)
    files, uf_scores = {}, {}
    for name, (file, n, _) in SOURCES.items():
        pairs, _ = load_preferences(str(SHARED_DATA / file))
        keep = shortest_indices(pairs, n)
        if name == "ultrafeedback":  # the loader keeps every row of this file, in file order (checked)
            raw = [json.loads(line) for line in UF_TRAIN.read_text().splitlines() if line.strip()]
            if len(raw) != len(pairs):
                raise SystemExit(f"{UF_TRAIN}: {len(raw)} lines but {len(pairs)} pairs loaded")
            uf_scores = {pairs[i].pair_id: (raw[i]["metadata"]["score_chosen"], raw[i]["metadata"]["score_rejected"])
                         for i in keep}
        files[name] = folder / f"{name}-shortest-{n}.jsonl"
        if not files[name].is_file():
            write_pairs_jsonl([pairs[i] for i in keep], files[name])
    lines = [line for line in STEERLM.read_text().splitlines() if line.strip()]
    size = [len(line) for line in lines]
    keep = sorted(sorted(range(len(lines)), key=lambda i: (size[i], i))[:STEERLM_ROWS])
    files["steerlm"] = folder / f"steerlm-shortest-{STEERLM_ROWS}.jsonl"
    if not files["steerlm"].is_file():
        write_text(files["steerlm"], "".join(lines[i] + "\n" for i in keep))
    return {"files": files, "uf_scores": uf_scores}


def extract(cache: Path) -> tuple[dict, float]:
    """Embed the pool with the offline backbone (the default dtype; float32 storage), resumable."""
    from pipeline.configs import SMOLLM2_GGUF, DatasetSpec, ExtractConfig
    from pipeline.recipes.extract import run_extract

    t0 = time.perf_counter()
    pool = write_pool_files(cache / "data")
    datasets = {name: DatasetSpec(name, "preferences", str(pool["files"][name])) for name in SOURCES}
    datasets["steerlm"] = DatasetSpec("steerlm", "ratings", str(pool["files"]["steerlm"]))
    run_extract(ExtractConfig(backbone=SMOLLM2_GGUF, cache_dir=str(cache), datasets=datasets, device="cpu",
                              storage_dtype="float32", max_length=2048, part_rows=512, max_tokens_per_batch=4096))
    return pool, time.perf_counter() - t0



@dataclass
class Pool:
    """Every embedded response: features [N, d] (float64), its source, its real labels where it has any (the SteerLM
    rows' five ratings; UltraFeedback's 1-10 score on helpfulness and correctness, mapped to 0-4; NaN elsewhere),
    and the real pairs (chosen row, rejected row) with their source."""

    x: torch.Tensor
    source: np.ndarray
    labels: torch.Tensor
    pairs: torch.Tensor  # [P, 2] row indices
    pair_source: np.ndarray


def load_pool(cache: Path, uf_scores: dict) -> Pool:
    from pipeline import ATTRIBUTES
    from pipeline.cache import read_features, read_pairs

    xs, sources, labels, pairs, pair_source = [], [], [], [], []
    n = 0
    for name in SOURCES:
        p = read_pairs(cache / name)
        m = len(p)
        xs += [p.chosen.embedding.double(), p.rejected.embedding.double()]
        y = torch.full((2 * m, len(ATTRIBUTES)), float("nan"), dtype=torch.float64)
        if name == "ultrafeedback":
            for i, pid in enumerate(p.chosen.pair_id):
                sc, sr = uf_scores[pid]
                for row, s in ((i, sc), (m + i, sr)):
                    y[row, :2] = (float(s) - 1.0) * 4.0 / 9.0  # 1-10 -> 0-4, as helpfulness and correctness
        labels.append(y)
        sources += [name] * (2 * m)
        pairs.append(torch.stack([torch.arange(m), torch.arange(m, 2 * m)], 1) + n)
        pair_source += [name] * m
        n += 2 * m
    rated = read_features(cache / "steerlm")
    xs.append(rated.embedding.double())
    labels.append(rated.labels.double())
    sources += ["steerlm"] * len(rated.labels)
    return Pool(torch.cat(xs), np.array(sources), torch.cat(labels), torch.cat(pairs), np.array(pair_source))


# ----------------------------------------------------------------------------------------------
# The gold reward (pure: numbers in, numbers out)


def rbf(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """exp(-|a - b|^2 / (2 l^2)) for every row pair [len(a), len(b)]."""
    return torch.exp(-torch.cdist(a, b).square() / (2 * bandwidth**2))


def kernel_ridge_loo(k: torch.Tensor, y: torch.Tensor, alphas) -> tuple[float, torch.Tensor, float]:
    """Kernel ridge on a centred target: the alpha of ``alphas`` with the least exact leave-one-out squared error
    (residual_i / (1 - H_ii), H = K (K + alpha I)^-1, from one eigendecomposition of K); that alpha, the dual
    coefficients (K + alpha I)^-1 (y - mean y), and the leave-one-out MSE."""
    lam, u = torch.linalg.eigh(k)
    lam = lam.clamp(min=0)
    yc = y - y.mean()
    uy = u.T @ yc
    best = None
    for alpha in alphas:
        fitted = u @ (lam / (lam + alpha) * uy)
        hat = (u.square() * (lam / (lam + alpha))).sum(1)
        loo = (((yc - fitted) / (1 - hat)).square()).mean().item()
        if best is None or loo < best[2]:
            best = (alpha, u @ (uy / (lam + alpha)), loo)
    return best


@dataclass
class Gold:
    """The gold reward: per attribute a kernel ridge function of the standardised features (RBF kernel), combined by
    fixed gold weights, then put on the pool's scale (mean 0, std 1 over the pool)."""

    centre: torch.Tensor  # [d]
    scale: torch.Tensor  # [d]
    bandwidth: float
    anchors: list  # per attribute: the standardised features of its labelled rows [m_k, d]
    coef: list  # per attribute: dual coefficients [m_k]
    intercept: torch.Tensor  # [K]: the labels' mean
    weights: torch.Tensor  # [K]
    offset: float = 0.0
    unit: float = 1.0

    def attributes(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.double() - self.centre) / self.scale
        return torch.stack([self.intercept[k] + rbf(z, a, self.bandwidth) @ c
                            for k, (a, c) in enumerate(zip(self.anchors, self.coef))], 1)

    def reward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.attributes(x) @ self.weights - self.offset) / self.unit


GOLD_ALPHAS = tuple(10.0 ** np.arange(-3, 2.5, 0.5))
BANDWIDTH_SHARE = 0.5  # the RBF length: half the median distance between pool rows (a linear fit misses much of it)


def fit_gold(x_pool: torch.Tensor, labelled: torch.Tensor, y: torch.Tensor, weights, bandwidth_share: float =
             BANDWIDTH_SHARE) -> tuple[Gold, dict]:
    """The gold reward fitted on the real labels y [m, K] (NaN = none) of the rows ``labelled`` of the pool x_pool
    [N, d]: features standardised by the pool's mean and std; per attribute, kernel ridge (RBF, length
    ``bandwidth_share`` x the median distance between pool rows) on the rows that attribute labels, alpha by exact
    leave-one-out; combined by ``weights`` and scaled to mean 0, std 1 over the pool. Also what the fit shows."""
    centre, scale = x_pool.mean(0), x_pool.std(0).clamp(min=1e-6)
    z = (x_pool - centre) / scale
    g = torch.Generator().manual_seed(0)
    sample = z[torch.randperm(len(z), generator=g)[:500]]
    bandwidth = bandwidth_share * torch.cdist(sample, sample).median().item()
    anchors, coefs, intercepts, fits = [], [], [], []
    for k in range(y.shape[1]):
        has = ~torch.isnan(y[:, k])
        a, yk = z[labelled][has], y[has, k].double()
        alpha, coef, loo = kernel_ridge_loo(rbf(a, a, bandwidth), yk, GOLD_ALPHAS)
        anchors.append(a)
        coefs.append(coef)
        intercepts.append(yk.mean())
        fits.append({"labelled_rows": int(has.sum()), "alpha": alpha, "label_std": yk.std().item(),
                     "loo_rmse": loo**0.5, "loo_r2": 1 - loo / yk.var(correction=0).item()})
    gold = Gold(centre, scale, bandwidth, anchors, coefs, torch.stack(intercepts), torch.as_tensor(weights).double())
    raw = gold.reward(x_pool)
    gold.offset, gold.unit = raw.mean().item(), raw.std().item()
    return gold, {"bandwidth": bandwidth, "attributes": fits}


def linear_share(x: torch.Tensor, target: torch.Tensor) -> float:
    """Leave-one-out R^2 of the best ridge-regularised linear function of the standardised x (with an intercept)
    for the target: how much of the gold a linear head could represent on these rows at best."""
    z = (x - x.mean(0)) / x.std(0).clamp(min=1e-6)
    _, _, loo = kernel_ridge_loo(z @ z.T, target.double(), tuple(10.0 ** np.arange(-2, 6.5, 0.5)))
    return 1 - loo / target.double().var(correction=0).item()


# ----------------------------------------------------------------------------------------------
# Best-of-n (pure)


def kl_bon(n) -> np.ndarray:
    """KL of the best-of-n policy from the base policy: log n - (n - 1) / n (Gao et al. 2023)."""
    n = np.asarray(n, dtype=np.float64)
    return np.log(n) - (n - 1) / n


def pick_probabilities(pool: int, n: int) -> np.ndarray:
    """P(the row ranked j-th of ``pool`` is the best of n drawn without replacement), j = 1..pool:
    C(pool - j, n - 1) / C(pool, n)."""
    if not 1 <= n <= pool:
        raise ValueError(f"best-of-n needs 1 <= n <= pool size, got n = {n}, pool = {pool}")
    j = np.arange(1, pool + 1)
    out = np.zeros(pool)
    ok = pool - j >= n - 1
    lg = math.lgamma
    log_p = np.array([lg(pool - i + 1) - lg(n) - lg(pool - i - n + 2) for i in j[ok]]) \
        - (lg(pool + 1) - lg(n + 1) - lg(pool - n + 1))
    out[ok] = np.exp(log_p)
    return out


def best_of_n(reward, values, n: int) -> float:
    """E[value of the row with the highest reward among n rows drawn at random without replacement from the pool]:
    exact (every draw weighted), not sampled. ``reward`` and ``values`` [N]; ties in reward broken by row order."""
    reward, values = np.asarray(reward, dtype=np.float64), np.asarray(values, dtype=np.float64)
    order = np.argsort(-reward, kind="stable")
    return float(pick_probabilities(len(reward), n) @ values[order])


# ----------------------------------------------------------------------------------------------
# Proxy training data labelled by the gold (pure)


def bt_labels(gold_a: torch.Tensor, gold_b: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """True where a is sampled as preferred: Bernoulli(sigmoid((G_a - G_b) / temperature))."""
    p = torch.sigmoid((gold_a - gold_b) / temperature)
    return torch.rand(len(p), generator=gen, dtype=torch.float64) < p


def flip_mask(n: int, share: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly round(share x n) of n labels chosen at random to be flipped."""
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=gen)[: round(share * n)]] = True
    return flipped


def oriented(pairs: torch.Tensor, first_preferred: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """Pairs [P, 2] as (chosen, rejected) rows: the sampled label, then the flipped ones swapped."""
    keep = first_preferred ^ flipped
    return torch.where(keep[:, None], pairs, pairs.flip(1))


# ----------------------------------------------------------------------------------------------
# One seed: the proxy's data, the proxies (this tool's training), best-of-n, curation

NS = tuple(2**i for i in range(9))  # 1 .. 256
NOISES = (0.0, 0.25)
RISK = 1.0  # k of lcb and of the epistemic bound, lambda of uwo: the default --risk of `urm score` / `urm serve`
SWEEP_RISKS = (0.5, 1.0, 2.0, 4.0, 8.0)  # beside the default: how the gain at n = 256 moves with k / lambda
RATING_NOISE = 0.5  # the rated rows' label noise std, as a share of each gold attribute's std over the pool
BT_TEMPERATURE = 0.25  # the gold's BT temperature, in units of the gold's std over the pool
HELD_OUT = 0.3  # share of the training sources' pairs (and SteerLM rows) kept out of training: candidates
RECIPES = {  # name: (stage-1 options, stage-2 options), on top of the command defaults
    "default": ({}, {}),  # `urm train-heads` as shipped: ridge, calibrated sigma, 8 bootstrap members; --gate auto
    "seed": ({"loss": "reparam", "ensemble": 1}, {"gate": "urm"}),  # the seed's recipe
}


def rewards_of_outputs(out: dict) -> dict[str, np.ndarray]:
    """Each reward a user can pass to --reward that these heads support, through the package's transforms
    (``pipeline.model.rewards``) at the default risk."""
    from pipeline.model import rewards as R

    names = [t for t in R.TRANSFORMS if not (R.needs_ensemble(t) and out.get("ensemble_scores") is None)
             and not (t in R.POSTERIOR_TRANSFORMS and out.get("epistemic_std") is None)]
    return {t: R.rewards_of(out, t, RISK if t in R.RISK_TRANSFORMS else 0.0) for t in names}


def train_value(recipe: str, x_rated, y_rated, seed: int):
    """Stage 1 of this tool (``fit_value_head``) with the recipe's options."""
    from pipeline.configs import ValueHeadConfig, build
    from pipeline.train import fit_value_head

    cfg = build(ValueHeadConfig, dict(device="cpu", seed=seed, **RECIPES[recipe][0]))
    return fit_value_head(x_rated.float(), y_rated.float(), cfg).heads


def train_gate(recipe: str, value, xc, xr, seed: int):
    """Stage 2 of this tool (``fit_gate``) with the recipe's options, on the frozen value head."""
    from pipeline.configs import GatingConfig, build
    from pipeline.train import fit_gate

    cfg = build(GatingConfig, dict(device="cpu", seed=seed, **RECIPES[recipe][1]))
    return fit_gate(xc.float(), xr.float(), value, cfg)


@torch.no_grad()
def outputs(heads, x) -> dict:
    return {k: v.double() for k, v in heads(x.float()).items()}


def split_seed(pool: Pool, seed: int) -> dict:
    """The seed's split of the training sources (pairs and SteerLM rows): a HELD_OUT share becomes candidates."""
    g = torch.Generator().manual_seed(seed)
    train_src = [s for s, (_, _, role) in SOURCES.items() if role == "train"]
    in_train = torch.from_numpy(np.isin(pool.pair_source, train_src))
    pair_ids = torch.nonzero(in_train).flatten()
    pair_ids = pair_ids[torch.randperm(len(pair_ids), generator=g)]
    n_out = round(HELD_OUT * len(pair_ids))
    test_pairs, train_pairs = pair_ids[:n_out].sort().values, pair_ids[n_out:].sort().values
    steer = torch.nonzero(torch.from_numpy(pool.source == "steerlm")).flatten()
    steer = steer[torch.randperm(len(steer), generator=g)]
    n_steer = round(HELD_OUT * len(steer))
    shift = torch.nonzero(torch.from_numpy(~np.isin(pool.source, train_src + ["steerlm"]))).flatten()
    candidates = torch.cat([pool.pairs[test_pairs].flatten(), steer[:n_steer], shift]).sort().values
    return {"train_pairs": train_pairs, "test_pairs": test_pairs, "train_steer": steer[n_steer:].sort().values,
            "candidates": candidates}


def key(recipe: str, size: float, noise: float) -> str:
    return f"{recipe}|{size}|{noise}"


def run_seed(pool: Pool, g_pool: torch.Tensor, g_attr: torch.Tensor, seed: int, sizes, recipes, curation: bool,
             rules) -> dict:
    """One seed: its split, and for each size and recipe the proxy at each noise level and its best-of-n curves
    (the expected gold gain over a random pick, exact over the draws of n candidates; and at n = 256 the gain of each
    risk transform at the risks SWEEP_RISKS); with ``curation``, the curation experiment on the 25%-noise pairs of the
    default recipe at the largest size."""
    from pipeline.model import rewards as R

    split = split_seed(pool, seed)
    cand = split["candidates"]
    shift = torch.from_numpy(np.isin(pool.source[cand.numpy()], [s for s, v in SOURCES.items() if v[2] == "shift"]))
    gold_c = g_pool[cand].numpy()
    out = {"candidates": len(cand), "shift_candidates": int(shift.sum()), "oracle": {}, "proxies": {}}
    for n in NS:
        out["oracle"][n] = best_of_n(gold_c, gold_c, n) - gold_c.mean()
    attr_std = g_attr.std(0)
    for size in sizes:
        g = torch.Generator().manual_seed(10_000 * seed + round(100 * size))
        train_pairs = split["train_pairs"]
        train_pairs = train_pairs[torch.randperm(len(train_pairs), generator=g)[: round(size * len(train_pairs))]]
        rated = torch.cat([pool.pairs[train_pairs].flatten(), split["train_steer"]])
        y_rated = g_attr[rated] + RATING_NOISE * attr_std * torch.randn(len(rated), g_attr.shape[1], generator=g,
                                                                         dtype=torch.float64)
        ab = pool.pairs[train_pairs]
        first = bt_labels(g_pool[ab[:, 0]], g_pool[ab[:, 1]], BT_TEMPERATURE, g)
        flips = flip_mask(len(ab), 0.25, g)
        for recipe in recipes:  # the rated rows are the same at both noise levels: one value head
            t0 = time.perf_counter()
            value = train_value(recipe, pool.x[rated], y_rated, seed)
            value_seconds = time.perf_counter() - t0
            for noise in NOISES:
                t0 = time.perf_counter()
                cr = oriented(ab, first, flips if noise > 0 else torch.zeros_like(flips))
                fit = train_gate(recipe, value, pool.x[cr[:, 0]], pool.x[cr[:, 1]], seed)
                o = outputs(fit.heads, pool.x[cand])
                rewards = rewards_of_outputs(o)
                entry = {"pairs": len(ab), "rated_rows": len(rated), "gate": fit.val.get("gate"),
                         "label_agrees_with_gold": ((g_pool[cr[:, 0]] > g_pool[cr[:, 1]]).double().mean().item()),
                         "value_head_seconds": value_seconds, "gate_seconds": time.perf_counter() - t0, "rewards": {}}
                for name, r in rewards.items():
                    entry["rewards"][name] = {
                        "gold_gain": {n: best_of_n(r, gold_c, n) - gold_c.mean() for n in NS},
                        "proxy_gain": {n: best_of_n(r, r, n) - r.mean() for n in NS},
                        "shift_share": {n: best_of_n(r, shift.double().numpy(), n) for n in NS},
                        "pearson_with_gold": float(np.corrcoef(r, gold_c)[0, 1])}
                entry["risk_sweep"] = {t: {str(k): best_of_n(R.rewards_of(o, t, k), gold_c, NS[-1]) - gold_c.mean()
                                           for k in SWEEP_RISKS} for t in R.RISK_TRANSFORMS if t in rewards}
                out["proxies"][key(recipe, size, noise)] = entry
                if curation and noise > 0 and recipe == "default" and size == max(sizes):
                    out["curation"] = curate_seed(pool, g_pool, value, fit, cr, flips, split, seed, rules)
    return out


def curate_seed(pool: Pool, g_pool, value, fit, cr, flipped, split, seed: int, rules) -> dict:
    """bench.curate's flip detection and curated training on these gold-labelled pairs (25% flipped): each signal's
    AUROC for the flipped pairs (judged 2-fold by gates that did not see them), with the epistemic std of the pair
    (sqrt(e_c^2 + e_r^2) under the proxy's heads) where the heads state it; held-out gold accuracy of the gate trained
    on the clean, noisy, curated and random-control pairs."""
    from bench import curate as C
    from pipeline import metrics as M
    from pipeline.eval.curation import certainty, kept_pairs, suspects

    xc, xr = pool.x[cr[:, 0]].float(), pool.x[cr[:, 1]].float()
    clean = torch.where(flipped[:, None], cr.flip(1), cr)
    test = pool.pairs[split["test_pairs"]]
    better = g_pool[test[:, 0]] > g_pool[test[:, 1]]
    test = torch.where(better[:, None], test, test.flip(1))  # held out: ordered by the gold
    xt_c, xt_r = pool.x[test[:, 0]].float(), pool.x[test[:, 1]].float()
    gen = torch.Generator().manual_seed(5000 + seed)
    j = C.cross_judged(value, xc, xr, seed)
    signals = C.suspicion(j, gen)
    if "p_chosen_epistemic" in j:  # `urm curate --signal epistemic`: P(chosen) under the ridge posterior (signed)
        signals["epistemic_p"] = 1 - j["p_chosen_epistemic"]
    oc, orr = outputs(fit.heads, xc), outputs(fit.heads, xr)
    if "epistemic_std" in oc:
        signals["epistemic_std"] = (oc["epistemic_std"].square() + orr["epistemic_std"].square()).sqrt()
    wrong = g_pool[cr[:, 0]] < g_pool[cr[:, 1]]  # the label disagrees with the gold order (flips and BT draws)
    res = {"auroc_flipped": {k: M.auroc(s, flipped) for k, s in signals.items()},
           "auroc_against_gold": {k: M.auroc(s, wrong) for k, s in signals.items()}, "training": {}}
    suspect = suspects(j["p_chosen"], 0.2)
    runs = {"clean": (clean, torch.ones(len(cr), dtype=torch.bool)), "noisy": (cr, torch.ones(len(cr), dtype=torch.bool))}
    for name in rules:
        runs[name] = (cr, kept_pairs(certainty(j, "gaussian"), suspect, **C.RULES[name]))
    if "p_chosen_epistemic" in j:  # the default rule (keep the most certain half, drop suspects) by that signal
        runs[C.DEFAULT + "_epistemic"] = (cr, kept_pairs(certainty(j, "epistemic"), suspect, **C.RULES[C.DEFAULT]))
    control = torch.zeros(len(cr), dtype=torch.bool)
    control[torch.randperm(len(cr), generator=torch.Generator().manual_seed(3000 + seed))[
        : int(runs[C.DEFAULT][1].sum())]] = True
    runs[C.CONTROL] = (cr, control)
    for name, (pairs, keep) in runs.items():
        heads, _, kind = C.gate(value, pool.x[pairs[keep, 0]].float(), pool.x[pairs[keep, 1]].float(), seed)
        res["training"][name] = {"pairs": int(keep.sum()), "flipped_kept": int((keep & flipped).sum())
                                 if name != "clean" else 0, "gate": kind,
                                 "held_out_gold_accuracy": C.accuracy(heads, xt_c, xt_r)}
    return res


# ----------------------------------------------------------------------------------------------
# Over the seeds


def interval(values) -> dict:
    """Mean, sd and the 90% t-interval of the mean over the seeds."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    half = float(t.ppf(0.95, len(v) - 1)) * sd / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "sd": sd, "ci90": [float(v.mean()) - half, float(v.mean()) + half],
            "runs": [float(x) for x in v]}


CONSERVATIVE = ("lcb", "elcb", "min", "uwo")


def summarise(seeds: list[dict], sizes, recipes) -> dict:
    """Per proxy setting and reward: the gold gain (and the proxy's own gain, the share of picks from shifted
    sources) at every n over the seeds; the oracle's gain; the targets on the default recipe at the largest size."""
    out = {"oracle_gold_gain": {n: interval([s["oracle"][n] for s in seeds]) for n in NS}, "proxies": {}}
    for k in seeds[0]["proxies"]:
        entries = [s["proxies"][k] for s in seeds]
        rewards = {}
        for name in entries[0]["rewards"]:
            r = [e["rewards"][name] for e in entries]
            rewards[name] = {field: {n: interval([x[field][n] for x in r]) for n in NS}
                             for field in ("gold_gain", "proxy_gain", "shift_share")}
            rewards[name]["pearson_with_gold"] = interval([x["pearson_with_gold"] for x in r])
            mean_256 = np.array([e["rewards"]["mean"]["gold_gain"][NS[-1]] for e in entries])
            gain_256 = np.array([x["gold_gain"][NS[-1]] for x in r])
            rewards[name]["gain_256_over_mean"] = float(gain_256.mean() / mean_256.mean())  # ratio of the means
            rewards[name]["gain_256_minus_mean"] = interval(gain_256 - mean_256)  # paired over the seeds
            rewards[name]["seeds_above_mean_256"] = int((gain_256 > mean_256).sum())
        out["proxies"][k] = {"pairs": entries[0]["pairs"], "rated_rows": entries[0]["rated_rows"],
                             "label_agrees_with_gold": interval([e["label_agrees_with_gold"] for e in entries]),
                             "gates": {g: sum(e["gate"] == g for e in entries) for g in sorted({e["gate"] for e in entries})},
                             "seconds": interval([e["value_head_seconds"] + e["gate_seconds"] for e in entries]),
                             "rewards": rewards,
                             "risk_sweep_gain_256": {t: {k: interval([e["risk_sweep"][t][k] for e in entries])
                                                         for k in entries[0]["risk_sweep"][t]}
                                                     for t in entries[0]["risk_sweep"]}}
    out["targets"] = targets(out["proxies"], max(sizes)) if "default" in recipes else None
    return out


def targets(proxies: dict, size: float) -> dict:
    """The issue's targets on the default recipe at the largest size, n = 256: under 25% noise the best conservative
    reward keeps >= 30% more gold gain than mean, their 90% intervals apart; at 0% noise it loses <= 5% of mean's."""
    noisy, clean = proxies[key("default", size, 0.25)]["rewards"], proxies[key("default", size, 0.0)]["rewards"]
    n = NS[-1]
    best = max((r for r in CONSERVATIVE if r in noisy), key=lambda r: noisy[r]["gold_gain"][n]["mean"])
    m, b = noisy["mean"]["gold_gain"][n], noisy[best]["gold_gain"][n]
    ratio_noisy = b["mean"] / m["mean"]
    ratio_clean = clean[best]["gold_gain"][n]["mean"] / clean["mean"]["gold_gain"][n]["mean"]
    paired = noisy[best]["gain_256_minus_mean"]
    return {"best_conservative_under_noise": best, "gain_ratio_at_25pct": ratio_noisy,
            "gain_ratio_at_0pct": ratio_clean,
            "intervals_apart_at_25pct": b["ci90"][0] > m["ci90"][1],
            "paired_difference_at_25pct": paired, "paired_interval_above_0_at_25pct": paired["ci90"][0] > 0,
            "seeds_above_mean_at_25pct": noisy[best]["seeds_above_mean_256"],
            "paired_difference_at_0pct": clean[best]["gain_256_minus_mean"],
            "target_30pct_more_at_25pct": bool(ratio_noisy >= 1.3 and b["ci90"][0] > m["ci90"][1]),
            "target_loses_le_5pct_at_0pct": bool(ratio_clean >= 0.95)}


def summarise_curation(runs: list[dict]) -> dict:
    from bench import curate as C

    names = list(runs[0]["training"])
    acc = {n: interval([r["training"][n]["held_out_gold_accuracy"] for r in runs]) for n in names}
    lost = acc["clean"]["mean"] - acc["noisy"]["mean"]
    return {
        "auroc_flipped": {s: interval([r["auroc_flipped"][s] for r in runs]) for s in runs[0]["auroc_flipped"]},
        "auroc_label_against_gold": {s: interval([r["auroc_against_gold"][s] for r in runs])
                                     for s in runs[0]["auroc_against_gold"]},
        "held_out_gold_accuracy": acc,
        "pairs_kept": {n: interval([r["training"][n]["pairs"] for r in runs]) for n in names},
        "flipped_kept": {n: interval([r["training"][n]["flipped_kept"] for r in runs]) for n in names},
        "gates": {n: {g: sum(r["training"][n]["gate"] == g for r in runs)
                      for g in sorted({r["training"][n]["gate"] for r in runs})} for n in names},
        "accuracy_lost_to_noise": lost,
        "curated_minus_random_control": interval([r["training"][C.DEFAULT]["held_out_gold_accuracy"]
                                                  - r["training"][C.CONTROL]["held_out_gold_accuracy"] for r in runs]),
    }


LABELS = {"mean": "mean", "lcb": "lcb (aleatoric)", "elcb": "elcb (epistemic)", "min": "min (WCO)",
          "uwo": "uwo"}


def plot(summary: dict, sizes, recipes, path: Path) -> Path:
    """Gold gain of the best-of-n pick against KL_bon, one curve per reward (90% band over seeds), one panel per
    noise level, one row per recipe (the largest size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.atomic import atomic_write

    kl = kl_bon(NS)
    fig, axes = plt.subplots(len(recipes), len(NOISES), figsize=(11, 4.2 * len(recipes)), squeeze=False, sharey=True)
    oracle = summary["oracle_gold_gain"]
    for i, recipe in enumerate(recipes):
        for j, noise in enumerate(NOISES):
            ax = axes[i][j]
            ax.plot(kl, [oracle[n]["mean"] for n in NS], "k:", label="oracle (the gold itself)")
            for name, r in summary["proxies"][key(recipe, max(sizes), noise)]["rewards"].items():
                g = r["gold_gain"]
                line, = ax.plot(kl, [g[n]["mean"] for n in NS], marker="o", ms=3, label=LABELS.get(name, name))
                ax.fill_between(kl, [g[n]["ci90"][0] for n in NS], [g[n]["ci90"][1] for n in NS],
                                color=line.get_color(), alpha=0.15)
            ax.set_title(f"{recipe} recipe, {noise:.0%} of pair labels flipped")
            ax.set_xlabel("KL_bon = log n - (n-1)/n   (n = 1 ... 256)")
            ax.set_ylabel("gold gain of the pick over a random pick (gold std)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------


def method_steps(doc: str) -> dict[str, str]:
    """The docstring's named steps ("  name   text..." and its indented continuation lines), each on one line."""
    steps, name = {}, None
    for line in doc.split("\n\n", 2)[1].splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            name, _, text = line.strip().partition(" ")
            steps[name] = text.strip()
        elif line.startswith("   ") and name:
            steps[name] += " " + line.strip()
        else:
            name = None
    return steps


def main(argv: list[str] | None = None) -> dict:
    from bench import RESULTS
    from pipeline import ATTRIBUTES
    from pipeline.data.synthetic import PAIR_WEIGHTS

    ap = argparse.ArgumentParser(prog="python -m bench overopt", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 seeds, the default recipe at the full size, one "
                    "curation rule (under 10 minutes on 2 cores with the first run's extraction); writes "
                    "overopt_quick.json / .png unless --out is given")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 10; 5 with --quick)")
    ap.add_argument("--out", default=None, help="result name under bench/results (default overopt, or overopt_quick)")
    ap.add_argument("--cache-dir", default=str(ROOT / "cache" / "bench-overopt"))
    args = ap.parse_args(argv or [])
    if not all((SHARED_DATA / f).is_file() for f, _, _ in SOURCES.values()) or not STEERLM.is_file():
        print(f"skipped: the real data in {SHARED_DATA} is not there")
        return {}
    from bench import curate as C

    seeds = args.seeds or (5 if args.quick else 10)
    if seeds < 2:
        raise SystemExit("--seeds must be 2 or more (the intervals are over seeds)")
    sizes = (1.0,) if args.quick else (0.5, 1.0)
    recipes = ("default",) if args.quick else tuple(RECIPES)
    rules = (C.DEFAULT,) if args.quick else tuple(C.RULES)
    name = args.out or ("overopt_quick" if args.quick else "overopt")
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    pool_files, extract_seconds = extract(Path(args.cache_dir))
    pool = load_pool(Path(args.cache_dir), pool_files["uf_scores"])
    labelled = ~torch.isnan(pool.labels).all(1)
    weights = [PAIR_WEIGHTS[a] for a in ATTRIBUTES]
    gold, gold_fit = fit_gold(pool.x, labelled, pool.labels[labelled], weights)
    g_pool, g_attr = gold.reward(pool.x), gold.attributes(pool.x)
    gold_fit.update(weights=dict(zip(ATTRIBUTES, weights)), linear_share=linear_share(pool.x, g_pool),
                    by_source={s: {"rows": int((pool.source == s).sum()),
                                   "mean": g_pool[torch.from_numpy(pool.source == s)].mean().item(),
                                   "std": g_pool[torch.from_numpy(pool.source == s)].std().item()}
                               for s in [*SOURCES, "steerlm"]},
                    real_pairs_agreeing={s: ((g_pool[pool.pairs[:, 0]] > g_pool[pool.pairs[:, 1]])[
                        torch.from_numpy(pool.pair_source == s)]).double().mean().item() for s in SOURCES})
    print(f"gold: a linear head can represent {gold_fit['linear_share']:.2f} of it (LOO R^2 on the pool); "
          f"per attribute LOO R^2 on the real labels "
          f"{[round(a['loo_r2'], 3) for a in gold_fit['attributes']]}", flush=True)
    runs = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        runs.append(run_seed(pool, g_pool, g_attr, seed, sizes, recipes, True, rules))
        p = runs[-1]["proxies"][key("default", 1.0, 0.25)]["rewards"] if "default" in recipes else {}
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s; default, 25% flipped, gold gain at n = 256: "
              f"{ {r: round(v['gold_gain'][NS[-1]], 3) for r, v in p.items()} }", flush=True)
    summary = summarise(runs, sizes, recipes)
    result = {
        "what": __doc__.split("\n")[0], "method": method_steps(__doc__), "quick": args.quick, "seeds": seeds, "sizes": list(sizes),
        "recipes": {r: RECIPES[r] for r in recipes}, "ns": list(NS), "kl_bon": kl_bon(NS).tolist(),
        "settings": {"risk": RISK, "rating_noise_share": RATING_NOISE, "bt_temperature": BT_TEMPERATURE,
                     "held_out": HELD_OUT, "flipped": 0.25, "bandwidth_share": BANDWIDTH_SHARE},
        "pool": {"sources": {s: {"file": f, "pairs_asked": n, "role": role} for s, (f, n, role) in SOURCES.items()},
                 "steerlm_rows": STEERLM_ROWS, "rows": len(pool.x), "candidates_per_seed": runs[0]["candidates"],
                 "shift_candidates_per_seed": runs[0]["shift_candidates"]},
        "gold": gold_fit, **summary,
        "curation": summarise_curation([r["curation"] for r in runs]), "curation_rules": list(rules),
        "extract_seconds": extract_seconds, "wall_seconds": time.perf_counter() - started,
        "load_average_before": load_before, "machine": machine_info()}
    result["plot"] = f"bench/results/{name}.png"
    plot(summary, sizes, recipes, RESULTS / f"{name}.png")
    path = write_result(name, result)
    t = result["targets"]
    print(f"targets: {json.dumps(t)}\nwall {result['wall_seconds']:.0f} s (extraction {extract_seconds:.0f} s)\n-> "
          f"{path} and {result['plot']}")
    return result


if __name__ == "__main__":
    main()
