"""Reward transforms: the number an RL loop (or a best-of-n pick) optimises, made from a row's scores and
their uncertainty (docs/method.md 9).

  mean  s                                   the score (the default); subtracts no uncertainty
  lcb   s - k * score_std                   a lower bound under the model's own sigma of the score: ALEATORIC
                                            (the spread of the ratings, calibrated on held-out rows; about the
                                            same for every response), so it hardly reorders responses
  elcb  s - k * epistemic_std               a lower bound under the ridge posterior's std of the score:
                                            EPISTEMIC (what the training rows left open; it grows for responses
                                            unlike them, where a policy can exploit the reward model: docs/method.md 10)
  min   min_m s_m                           the worst ensemble member (Coste et al. 2023's WCO)
  uwo   mean_m s_m - lambda * var_m s_m     the members' mean less lambda times their variance (Coste et
                                            al. 2023's UWO, arXiv 2310.02743); the variance is the one
                                            ``ensemble_std`` states (unbiased, over M), so uwo = mean -
                                            lambda * ensemble_std^2 can be checked from a row by hand

min and uwo subtract the EPISTEMIC spread of the bootstrap members. ``k`` and ``lambda`` are the one ``risk``
parameter (0 to ``MAX_RISK``; mean and min ignore it). min and uwo need an ensemble (M > 1 value heads):
``needs_ensemble``; elcb needs heads with a ridge posterior (the closed-form value head, ``--loss ridge``):
``needs_posterior``. ``lcb`` stays aleatoric, so that it means the same for every model (all heads have a sigma)
and a transform's name says which uncertainty it subtracts (``SUBTRACTS``); no transform subtracts the two
together. Pure functions on arrays (numpy arrays, or
anything ``np.asarray`` takes, CPU tensors included); float64 out. ``reward`` takes the pieces,
``rewards_of`` a dict of the heads' outputs (``score``, ``score_std``, ``ensemble_scores`` [B, M],
``epistemic_std``).
"""

from __future__ import annotations

import math

import numpy as np

TRANSFORMS = ("mean", "lcb", "elcb", "min", "uwo")
ENSEMBLE_TRANSFORMS = ("min", "uwo")  # these read the members' scores
POSTERIOR_TRANSFORMS = ("elcb",)  # this reads epistemic_std (heads with a ridge posterior)
RISK_TRANSFORMS = ("lcb", "elcb", "uwo")  # these read the risk parameter
# Which uncertainty each subtracts (--help, /score's "uncertainty", the docs)
SUBTRACTS = {"mean": "nothing", "lcb": "aleatoric (score_std)", "elcb": "epistemic (epistemic_std)",
             "min": "epistemic (the ensemble's spread)", "uwo": "epistemic (the ensemble's variance)"}
# The largest risk: a million standard deviations (or variances) is beyond any use, and far below the risks whose
# reward overflows float32 (what RL loops keep it in) for any sigma a trained head states.
MAX_RISK = 1e6
RISK_RANGE = "a number from 0 to 1e6"


def needs_ensemble(transform: str) -> bool:
    return transform in ENSEMBLE_TRANSFORMS


def needs_posterior(transform: str) -> bool:
    return transform in POSTERIOR_TRANSFORMS


def risk_ok(risk) -> bool:
    """A risk parameter is a finite number from 0 to ``MAX_RISK`` (not a bool)."""
    return (isinstance(risk, (int, float)) and not isinstance(risk, bool) and math.isfinite(risk)
            and 0 <= risk <= MAX_RISK)


def lower_bound(score, score_std, k: float) -> np.ndarray:
    """lcb and elcb: s - k * std (score_std, or epistemic_std)."""
    return np.asarray(score, dtype=np.float64) - k * np.asarray(score_std, dtype=np.float64)


def worst_member(ensemble_scores) -> np.ndarray:
    """min: the lowest member score per row, ensemble_scores [B, M] -> [B]."""
    return np.asarray(ensemble_scores, dtype=np.float64).min(-1)


def uncertainty_weighted(ensemble_scores, lam: float) -> np.ndarray:
    """uwo: mean_m s_m - lambda * var_m s_m per row (unbiased variance, as ``ensemble_std``), [B, M] -> [B]."""
    s = np.asarray(ensemble_scores, dtype=np.float64)
    return s.mean(-1) - lam * s.var(-1, ddof=1)


def reward(transform: str, risk: float, score, score_std=None, ensemble_scores=None, epistemic_std=None) -> np.ndarray:
    """The transform's reward per row. ValueError for an unknown transform, a bad risk, or a missing input."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown reward transform {transform!r}; one of {', '.join(TRANSFORMS)}")
    if not risk_ok(risk):
        raise ValueError(f"the risk parameter must be {RISK_RANGE}, got {risk!r}")
    if transform == "mean":
        return np.asarray(score, dtype=np.float64)
    if transform == "lcb":
        if score_std is None:
            raise ValueError("lcb needs score_std")
        return lower_bound(score, score_std, risk)
    if transform == "elcb":
        if epistemic_std is None:
            raise ValueError("elcb needs epistemic_std (heads with a ridge posterior: the closed-form value head)")
        return lower_bound(score, epistemic_std, risk)
    if ensemble_scores is None or np.ndim(ensemble_scores) != 2 or np.shape(ensemble_scores)[-1] < 2:
        raise ValueError(f"{transform} needs ensemble_scores [rows, members] of 2 or more members")
    return worst_member(ensemble_scores) if transform == "min" else uncertainty_weighted(ensemble_scores, risk)


def rewards_of(outputs: dict, transform: str, risk: float) -> np.ndarray:
    """``reward`` on a dict of the heads' outputs (what `urm score` and `urm serve` compute per batch)."""
    return reward(transform, risk, outputs["score"], outputs.get("score_std"), outputs.get("ensemble_scores"),
                  outputs.get("epistemic_std"))
