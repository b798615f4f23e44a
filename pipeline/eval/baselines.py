"""The models `urm evaluate` sets beside the URM heads, fitted in the same run on the same training
caches (docs/method.md 6), each as an ``evaluation.Candidate``:

- ``linear_probe``     a linear Bradley-Terry probe: logistic regression (scikit-learn) on
                       h_chosen - h_rejected, no intercept, its C chosen by log loss on validation pairs
- ``armorm``           ArmoRM's recipe: ridge regression per attribute on the ratings (scikit-learn's
                       RidgeCV, alpha by leave-one-out on the training rows), then its softmax gate
                       trained with the BT loss on the pairs
- ``equal_weights``    the heads' value head with fixed weights w_k = 1/K (SteerLM-style)
- ``base_score``       the backbone's own reward, where the cache has it
- ``urm_variant``      URM heads trained again by another recipe: the seed's (reparam by AdamW, the URM
                       gate from a random start), another stage-1 loss, no calibration, the seed's ensemble

Every baseline's pair temperatures are fitted on the same validation pairs of the training cache
that the gate's early stopping held out, so that calibration is compared on equal terms.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from pipeline import unheard
from pipeline.eval.evaluation import Candidate, Scores
from pipeline.model import VALUE_PREFIXES, Heads
from pipeline.train import fit_pair_temperatures, split_rows


logger = logging.getLogger(__name__)

EVAL_ROWS = 8192
PROBE_C = tuple(10.0 ** np.arange(-4, 2))  # inverse regularisation strengths tried on validation


@torch.no_grad()
def heads_scores(heads: Heads, x: torch.Tensor) -> Scores:
    """The heads' outputs for every row of the features x, in chunks."""
    parts = [heads(x[i:i + EVAL_ROWS].float()) for i in range(0, len(x), EVAL_ROWS)]

    def cat(name):
        return torch.cat([p[name] for p in parts]).cpu() if name in parts[0] else None

    return Scores(cat("score"), cat("score_std"), cat("ensemble_scores"), cat("attribute_means"), cat("attribute_stds"),
                  cat("epistemic_std"))


def heads_candidate(name: str, about: str, heads: Heads, pairs=None) -> Candidate:
    """URM heads as a candidate, at the pair temperatures fitted with them (``heads_io.PairCalibration``)."""
    return Candidate(name, about, lambda rows: heads_scores(heads, rows.embedding),
                     pairs.temperature_bt if pairs else 1.0, pairs.temperature_gaussian if pairs else 1.0)


def with_temperatures(candidate: Candidate, chosen_val, rejected_val) -> Candidate:
    """``candidate`` with its pair temperatures fitted on these validation pairs (cache rows)."""
    c, r = candidate.scores(chosen_val), candidate.scores(rejected_val)
    var_sum = None if c.score_std is None else c.score_std.double().square() + r.score_std.double().square()
    t_bt, t_gauss = fit_pair_temperatures((c.score - r.score).double(), var_sum)
    return dataclasses.replace(candidate, temperature_bt=t_bt, temperature_gaussian=t_gauss)


# ----------------------------------------------------------------------------------------------
# Fitted on the training caches


def linear_probe(xc: torch.Tensor, xr: torch.Tensor, val_fraction: float, seed: int) -> tuple[Candidate, dict]:
    """Logistic regression on h_c - h_r without intercept (the BT model with a linear reward s = w.h).

    Each pair enters once, its sign flipped for a seeded half of them (label = not flipped): the
    same log loss as counting every pair in both orders, at half the memory. C is chosen by the
    validation log loss; features are scaled by their std for the fit and the scale folded back.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    diff = (xc.float() - xr.float()).cpu().numpy()
    train, val = (i.numpy() for i in split_rows(len(diff), val_fraction, seed, "--gate-val-fraction"))
    flip = np.random.default_rng(seed).random(len(diff)) < 0.5
    x = np.where(flip[:, None], -diff, diff)
    scale = x[train].std(0) + 1e-6
    x, y = x / scale, (~flip).astype(int)
    fits = {}
    for c in PROBE_C:
        model = LogisticRegression(C=c, fit_intercept=False, max_iter=2000).fit(x[train], y[train])
        fits[c] = (log_loss(y[val], model.predict_proba(x[val])[:, 1], labels=[0, 1]), model)
    best = min(fits, key=lambda c: fits[c][0])
    w = torch.from_numpy(fits[best][1].coef_[0] / scale).float()
    info = {"C": best, "val_log_loss": fits[best][0], "tried": {str(c): fits[c][0] for c in fits}}
    return Candidate("linear BT probe", f"logistic regression on h_c - h_r (C = {best:g}, by validation log loss)",
                     lambda rows: Scores(rows.embedding.float().cpu() @ w)), info


def ridge_value_head(x: torch.Tensor, y: torch.Tensor) -> tuple[Heads, dict]:
    """ArmoRM's stage 1: one ridge regression per attribute (alpha by leave-one-out, RidgeCV) as a value
    head with a bias; its log-sigma rows are zero (sigma = 1: ridge states no uncertainty)."""
    from sklearn.linear_model import RidgeCV

    alphas = 10.0 ** np.arange(-2, 5)
    features, labels = x.float().cpu().numpy(), y.float().cpu().numpy()
    heads = Heads(x.shape[1], y.shape[1], bias=True)
    chosen = []
    with torch.no_grad():
        heads.score.weight.zero_()
        heads.score.bias.zero_()
        for k in range(y.shape[1]):
            rows = ~np.isnan(labels[:, k])
            model = RidgeCV(alphas=alphas).fit(features[rows], labels[rows, k])
            heads.score.weight[2 * k] = torch.from_numpy(model.coef_).float()
            heads.score.bias[2 * k] = float(model.intercept_)
            chosen.append(float(model.alpha_))
    return heads, {"alpha": chosen}


def armorm(x: torch.Tensor, y: torch.Tensor, xc: torch.Tensor, xr: torch.Tensor,
           gating) -> tuple[Candidate, dict]:
    """Ridge per attribute, then ArmoRM's softmax gate with the BT loss (the value head frozen)."""
    from pipeline.train import fit_gate

    value, info = ridge_value_head(x, y)
    with unheard("pipeline.train"):  # a baseline's training: not the run's own lines
        fit = fit_gate(xc, xr, value, dataclasses.replace(gating, gate="softmax", gate_hidden=None, temperature=None,
                                                          pair_temperature=True))

    def scores(rows):
        s = heads_scores(fit.heads, rows.embedding)
        return dataclasses.replace(s, score_std=None, attribute_stds=None)  # sigma = 1 says nothing

    pairs = fit.calibration
    return Candidate("ArmoRM recipe", f"ridge per attribute (alpha {info['alpha']}) + softmax gate",
                     scores, pairs.temperature_bt, pairs.temperature_gaussian), {**info, "gate_val": fit.val}


def equal_weights(heads: Heads) -> Candidate:
    """The value head of ``heads`` with w_k = 1/K for every row (no gate)."""
    plain = Heads(heads.d, heads.k, heads.members, bias=heads.score.bias is not None,
                  posterior=heads.architecture.get("posterior")).to(heads.score.weight.device)
    value = {n: t for n, t in heads.state_dict().items() if n.startswith(VALUE_PREFIXES)}
    plain.load_state_dict(value)
    return heads_candidate("equal weights", "the same value head, w_k = 1/K (SteerLM-style)", plain)


def base_score() -> Candidate:
    """The backbone reward model's own score (the cache's ``base_score`` column)."""
    return Candidate("backbone's own score", "the base reward model's head (cached base_score)",
                     lambda rows: Scores(rows.base_score.float().cpu()))


def urm_variant(name: str, about: str, x, y, xc, xr, value_cfg, gating_cfg,
                names) -> tuple[Candidate, dict]:
    """URM heads trained again, both stages, with these configs (another recipe on the same caches)."""
    from pipeline.train import fit_gate, fit_value_head

    with unheard("pipeline.train"):  # a baseline's training: not the run's own lines
        value = fit_value_head(x, y, value_cfg, names)
        gated = fit_gate(xc, xr, value.heads, gating_cfg, names)
    return heads_candidate(name, about, gated.heads, gated.calibration), {"value_val": value.val,
                                                                          "gate_val": gated.val}


def variants(ensemble: int, gate: str | None) -> list[tuple[str, str, dict, dict]]:
    """(name, about, value-head config changes, gate config changes) of every other URM recipe trained on the same
    caches. The gate is ``gate``, the kind the heads under evaluation chose (not chosen again: the comparison is of
    stage 1), except in the seed's recipe, whose gate is the URM MLP from a random start."""
    same_gate = {"gate": gate} if gate else {}
    return [("URM, the seed's recipe", "reparam means by AdamW, sigma calibrated, the URM gate from a random start",
             dict(loss="reparam", calibrate=True, ensemble=1), {"gate": "urm"}),
            ("URM, reparam, sigma as trained", "the seed's loss alone: sigma driven towards 0",
             dict(loss="reparam", calibrate=False, ensemble=1), same_gate),
            ("URM, nll", "Gaussian NLL on the training rows by AdamW, no held-out calibration",
             dict(loss="nll", calibrate=False, ensemble=1), same_gate),
            (f"URM ensemble of {ensemble}, seeds only", f"the seed's URME: {ensemble} reparam value heads that differ "
             "in seed only, sigma calibrated", dict(loss="reparam", calibrate=True, ensemble=ensemble), same_gate)]


@dataclasses.dataclass(frozen=True)
class TrainingCaches:
    """What the baselines are fitted on: the heads' training ratings and pairs (their features), the pairs the gate's
    early stopping held out (every pair temperature is fitted there), and whether every cache, held-out ones
    included, holds the backbone's own reward (then it is a baseline too)."""

    ratings: object  # pipeline.cache Features
    pairs: object  # pipeline.cache Pairs
    val_pairs: object
    base_score: bool


@dataclasses.dataclass(frozen=True)
class HeadsRecipe:
    """How the heads under evaluation were trained: their stage configs (as heads.json recorded them), the gate kind
    they chose, and whether they were trained on these very caches (then a variant that is exactly their recipe is
    their own row, not trained twice)."""

    value: object  # the value head's config as heads.json recorded it (pipeline.configs.ValueHeadConfig)
    gating: object  # the gate's (pipeline.configs.GatingConfig)
    gate: str | None
    on_these_caches: bool


def fit_baselines(heads: Heads, caches: TrainingCaches, recipe: HeadsRecipe, ensemble: int,
                  names: list[str]) -> tuple[list[Candidate], dict]:
    """Every baseline above, fitted on ``caches``: (candidates, what each fit found, with its seconds; a variant
    that is the heads' own recipe gets ``same_as`` instead). ``ensemble``: the members of the seed's URME."""
    x, y = caches.ratings.embedding, caches.ratings.labels
    xc, xr = caches.pairs.chosen.embedding, caches.pairs.rejected.embedding
    val = caches.val_pairs
    candidates, info = [], {}

    def add(name, make):
        logger.info(f"baseline: {name} ...")
        t0 = time.perf_counter()
        candidate, found = make()
        candidates.append(candidate)
        info[candidate.name] = {**found, "seconds": time.perf_counter() - t0}

    def on_val(fitted):
        candidate, found = fitted
        return with_temperatures(candidate, val.chosen, val.rejected), found

    gating = recipe.gating
    add("linear BT probe", lambda: on_val(linear_probe(xc, xr, gating.optim.val_fraction, gating.run.seed)))
    add("ArmoRM recipe", lambda: armorm(x, y, xc, xr, gating))
    add("equal weights", lambda: on_val((equal_weights(heads), {})))
    if caches.base_score:
        add("backbone's own score", lambda: on_val((base_score(), {})))
    for name, about, changes, gate_changes in variants(ensemble, recipe.gate):
        v_cfg, g_cfg = dataclasses.replace(recipe.value, **changes), dataclasses.replace(gating, **gate_changes)
        if recipe.on_these_caches and (v_cfg, g_cfg) == (recipe.value, gating):
            info[name] = {"same_as": "URM (these heads)"}  # their recipe exactly: not trained twice
            continue
        add(name, lambda: urm_variant(name, about, x, y, xc, xr, v_cfg, g_cfg, names))
    return candidates, info
