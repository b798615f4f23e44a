"""Curating preference data with the model's uncertainty (`urm curate`): per pair, how sure the model is that the
label is right, which pairs it confidently reverses (suspects), which are kept, and which unlabelled pairs it is
least sure of (what to label next). Pure functions on ``Scores``; no I/O.

Per labelled pair (s = the scores of chosen c and rejected r, d = s_c - s_r; docs/method.md 1, 4):
  p_chosen              sigmoid(d / T_bt), Bradley-Terry at the temperature fitted on validation pairs
  p_chosen_gaussian     Phi(d / (T_g sqrt(Var_c + Var_r))): the stated std included
  ensemble_disagreement std over the members m of d_m (with an ensemble)
  ensemble_z            mean_m d_m / std_m d_m: the gap in units of the members' disagreement (signed)
  p_chosen_epistemic    Phi(d / sqrt(e_c^2 + e_r^2)), e the ridge posterior's epistemic_std (docs/method.md 10): how
                        sure the model is of the sign of its mean gap, given what its training rows left open
A pair is **suspect** when p_chosen < the threshold: the model confidently prefers the rejected side. The
**certainty** that the label is right (``certainty``, larger = surer) under each signal: bt = p_chosen, gaussian =
p_chosen_gaussian, ensemble = ensemble_z, epistemic = p_chosen_epistemic. URME's rule keeps the most certain share
and drops the suspects.

Unlabelled pairs (A, B): the same numbers with A as "chosen"; the **uncertainty** of the preference
(``uncertainty``, larger = less sure) is 1/2 - |P - 1/2| under bt, gaussian or epistemic, -|ensemble_z| under
ensemble.
"""

from __future__ import annotations

import torch

from pipeline.errors import UserError
from pipeline.eval.evaluation import Scores, chosen_probabilities, signed_ensemble_z

SIGNALS = ("bt", "gaussian", "ensemble", "epistemic")
SIGNAL_ABOUT = {
    "bt": "P(chosen better) under Bradley-Terry, at the fitted temperature",
    "gaussian": "P(chosen better) under the Gaussian scores (the stated std included), at the fitted temperature",
    "ensemble": "the members' mean score gap over their spread (ensemble_z)",
    "epistemic": "P(chosen better) under the ridge posterior of the two scores (epistemic_std, closed form)",
}


def judge_pairs(chosen: Scores, rejected: Scores, temperature_bt: float = 1.0,
                temperature_gaussian: float = 1.0) -> dict[str, torch.Tensor]:
    """Per pair (float64): ``gap``, ``p_chosen``, ``p_chosen_gaussian`` (with stds) and, with an ensemble,
    ``ensemble_disagreement`` and ``ensemble_z`` (module docstring)."""
    p_bt, p_g = chosen_probabilities(chosen, rejected, temperature_bt, temperature_gaussian)
    out = {"gap": chosen.score.double() - rejected.score.double(), "p_chosen": p_bt}
    if p_g is not None:
        out["p_chosen_gaussian"] = p_g
    if chosen.ensemble_scores is not None and chosen.ensemble_scores.shape[-1] > 1:
        member_d = chosen.ensemble_scores.double() - rejected.ensemble_scores.double()  # [N, M]
        out["ensemble_disagreement"] = member_d.std(-1)
        out["ensemble_z"] = signed_ensemble_z(member_d)
    if chosen.epistemic_std is not None:
        spread = (chosen.epistemic_std.double().square() + rejected.epistemic_std.double().square()).sqrt()
        out["p_chosen_epistemic"] = torch.special.ndtr(out["gap"] / spread.clamp(min=1e-12))
    return out


def check_signal(judged: dict[str, torch.Tensor], signal: str) -> None:
    """UserError when the model cannot give ``signal`` (an ensemble signal without an ensemble)."""
    if signal not in SIGNALS:
        raise UserError(f"unknown signal {signal!r}: use one of {', '.join(SIGNALS)} (--signal)")
    need = {"bt": "p_chosen", "gaussian": "p_chosen_gaussian", "ensemble": "ensemble_z",
            "epistemic": "p_chosen_epistemic"}[signal]
    if need not in judged:
        what = {"ensemble": "an ensemble (train the value head with --ensemble 2 or more)",
                "epistemic": "a ridge posterior (epistemic_std: train the value head with --loss ridge)"}.get(signal,
                                                                                                         "stds")
        raise UserError(f"--signal {signal} needs {what}; this model has none: use --signal bt or gaussian")


def certainty(judged: dict[str, torch.Tensor], signal: str) -> torch.Tensor:
    """How sure the model is that each pair's label is right (larger = surer), under ``signal``."""
    check_signal(judged, signal)
    return {"bt": judged["p_chosen"], "gaussian": judged.get("p_chosen_gaussian"),
            "ensemble": judged.get("ensemble_z"), "epistemic": judged.get("p_chosen_epistemic")}[signal]


def uncertainty(judged: dict[str, torch.Tensor], signal: str) -> torch.Tensor:
    """How unsure the model is which side of each (unlabelled) pair is better (larger = less sure)."""
    c = certainty(judged, signal)
    return -c.abs() if signal == "ensemble" else 0.5 - (c - 0.5).abs()


def suspects(p_chosen: torch.Tensor, threshold: float) -> torch.Tensor:
    """The pairs whose P(chosen better) is below ``threshold``: the model confidently prefers the rejected side."""
    return p_chosen < threshold


def kept_pairs(certain: torch.Tensor, suspect: torch.Tensor, keep_fraction: float,
               drop_suspect_only: bool = False) -> torch.Tensor:
    """The pairs that pass: every non-suspect (``drop_suspect_only``), or the round(keep_fraction x N) most certain
    (ties in input order) less the suspects among them."""
    if drop_suspect_only:
        return ~suspect
    n_keep = min(len(certain), max(1, round(keep_fraction * len(certain))))
    order = torch.sort(-certain, stable=True).indices
    keep = torch.zeros(len(certain), dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep & ~suspect


def least_certain(unsure: torch.Tensor, n: int) -> torch.Tensor:
    """The indices of the ``n`` pairs with the largest uncertainty, least certain first (ties in input order)."""
    return torch.sort(-unsure, stable=True).indices[:min(n, len(unsure))]


def keep_cut(certain: torch.Tensor, keep: torch.Tensor) -> float | None:
    """The lowest certainty among the kept pairs (where the keep rule cut), None when none is kept."""
    return float(certain[keep].min()) if keep.any() else None
