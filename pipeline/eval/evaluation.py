"""What a reward model's outputs say on held-out data (docs/method.md 6): pair accuracy (overall, per subset,
RewardBench's sections), whether P(chosen) is calibrated, whether each uncertainty signal predicts the
wrong pairs, and the attribute regression with its intervals.

A model is anything that gives ``Scores`` for a feature matrix: the URM heads, or a baseline
(pipeline.eval.baselines). The functions here take those outputs and return plain dicts of numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pipeline import metrics as M
from pipeline.model import p_chosen_bt, p_chosen_gaussian

COVERAGES = (0.5, 0.8, 1.0)
REWARDBENCH = Path(__file__).resolve().parent / "rewardbench_sections.json"


@dataclass
class Scores:
    """What a model says about each row (None where it says nothing of the kind)."""

    score: torch.Tensor  # [N]
    score_std: torch.Tensor | None = None  # [N]
    ensemble_scores: torch.Tensor | None = None  # [N, M]
    attribute_means: torch.Tensor | None = None  # [N, K]
    attribute_stds: torch.Tensor | None = None  # [N, K]
    epistemic_std: torch.Tensor | None = None  # [N]: the ridge posterior's std of the score (docs/method.md 10)


@dataclass
class Candidate:
    """One model under evaluation: its name, what it is, how it scores cache rows (``cache_reader.Features``:
    its embedding, or its base_score), and its pair temperatures."""

    name: str
    about: str
    scores: Callable[[object], Scores]
    temperature_bt: float = 1.0
    temperature_gaussian: float = 1.0


def rewardbench_sections() -> tuple[dict[str, list[str]], dict[str, int]]:
    """RewardBench's sections and per-subset example counts (its own weighting, kept as data)."""
    data = json.loads(REWARDBENCH.read_text())
    return data["sections"], data["example_counts"]


def uncertainty_signals(chosen: Scores, rejected: Scores) -> dict[str, torch.Tensor]:
    """Per pair, every uncertainty the model gives (larger = less sure):
    score_gap    -|s_c - s_r| (any reward model: how close the two scores are)
    score_std    sqrt(Var_c + Var_r), the Gaussian std of s_c - s_r (docs/method.md 1)
    gaussian_p   1 - max(P, 1 - P) of the Gaussian P(chosen): the gap in units of that std
    ensemble_std the members' std of s_c - s_r (docs/method.md 4)
    ensemble_range  the members' max - min of s_c - s_r (URME's signal)
    ensemble_z   -|mean d| / std(d) over the members: the gap in units of the members' disagreement
    epistemic_std  sqrt(e_c^2 + e_r^2) of the two sides' ridge-posterior stds (docs/method.md 10; the sides taken
                 as independent, as for score_std)"""
    d = chosen.score - rejected.score
    out = {"score_gap": -d.abs()}
    if chosen.score_std is not None:
        spread = (chosen.score_std.square() + rejected.score_std.square()).sqrt()
        out["score_std"] = spread
        p = torch.special.ndtr(d / spread)
        out["gaussian_p"] = 1 - torch.maximum(p, 1 - p)
    if chosen.ensemble_scores is not None:
        member_d = chosen.ensemble_scores - rejected.ensemble_scores  # [N, M]
        out["ensemble_std"] = member_d.std(-1)
        out["ensemble_range"] = member_d.max(-1).values - member_d.min(-1).values
        out["ensemble_z"] = -signed_ensemble_z(member_d).abs()
    if chosen.epistemic_std is not None:
        out["epistemic_std"] = (chosen.epistemic_std.double().square() + rejected.epistemic_std.double().square()).sqrt()
    return out


def signed_ensemble_z(member_d: torch.Tensor) -> torch.Tensor:
    """mean_m d_m / std_m d_m over the members' score gaps d [N, M]: the gap in units of their disagreement."""
    return member_d.mean(-1) / member_d.std(-1).clamp(min=1e-12)


def row_signals(scores: Scores) -> dict[str, torch.Tensor]:
    """Per row, the model's stated uncertainty (larger = less sure), by kind:
    score_std      sqrt(sum_k w_k^2 sigma_k^2): aleatoric, the noise the ratings carry
    mean_sigma     the mean over attributes of sigma_k: aleatoric
    ensemble_std   the members' std of the score: epistemic, what the data did not pin down
    epistemic_std  the ridge posterior's std of the score: epistemic, in closed form (docs/method.md 10)"""
    out = {}
    if scores.score_std is not None:
        out["score_std"] = scores.score_std.double()
    if scores.attribute_stds is not None:
        out["mean_sigma"] = scores.attribute_stds.double().mean(-1)
    if scores.ensemble_scores is not None:
        out["ensemble_std"] = scores.ensemble_scores.double().std(-1)
    if scores.epistemic_std is not None:
        out["epistemic_std"] = scores.epistemic_std.double()
    return out


def shift_metrics(reference: Scores, other: Scores, other_labels: torch.Tensor | None = None, names=()) -> dict:
    """Does the model know when it is off its data? For each row signal (``row_signals``): the AUROC with which it
    separates ``other``'s rows (another source) from ``reference``'s (held-out rows of the training source; 0.5 =
    it cannot tell them apart); with ``other_labels`` also the intervals' coverage and the errors on the other
    source (``attribute_metrics``)."""
    ref, oth = row_signals(reference), row_signals(other)
    out = {"rows": len(other.score), "reference_rows": len(reference.score),
           "auroc": {name: M.auroc(torch.cat([ref[name], oth[name]]),
                                   torch.cat([torch.zeros(len(ref[name]), dtype=torch.bool),
                                              torch.ones(len(oth[name]), dtype=torch.bool)]))
                     for name in ref if name in oth}}
    if other_labels is not None:
        out["attributes"] = attribute_metrics(other, other_labels, names)
    return out


def chosen_probabilities(chosen: Scores, rejected: Scores, temperature_bt: float = 1.0,
                         temperature_gaussian: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per pair, P(chosen better) under Bradley-Terry and under the Gaussian scores (None without stds),
    at the model's temperatures, in float64."""
    s_c, s_r = chosen.score.double(), rejected.score.double()
    p_bt = p_chosen_bt(s_c, s_r, temperature_bt)
    if chosen.score_std is None:
        return p_bt, None
    return p_bt, p_chosen_gaussian(s_c, s_r, chosen.score_std.double().square(), rejected.score_std.double().square(),
                                   temperature_gaussian)


def pair_metrics(chosen: Scores, rejected: Scores, subsets, temperature_bt: float = 1.0,
                 temperature_gaussian: float = 1.0) -> dict:
    """Accuracy (overall, per subset, RewardBench sections), calibration of P(chosen) at the model's
    temperatures (ECE with 20 bins beside the ECE a calibrated model would show on these pairs, Brier),
    and per uncertainty signal: AUROC for the wrong pairs,
    accuracy over the 50 / 80 / 100% most certain pairs, and the area under the risk-coverage curve."""
    s_c, s_r = chosen.score.double(), rejected.score.double()
    correct = s_c > s_r  # a tie is wrong, as in RewardBench
    per_subset = M.subset_accuracy(s_c, s_r, subsets)
    sections, counts = rewardbench_sections()
    out = {"pairs": len(s_c), "accuracy": M.pairwise_accuracy(s_c, s_r), "per_subset": per_subset}
    rb = M.section_scores(per_subset, sections, counts)
    if rb:
        out["rewardbench_sections"] = rb
        if len(rb) == len(sections):
            out["rewardbench_mean"] = sum(rb.values()) / len(rb)
    p_bt, p_g = chosen_probabilities(chosen, rejected, temperature_bt, temperature_gaussian)
    out["calibration"] = {"temperature_bt": temperature_bt, "ece": M.ece(p_bt), "brier": M.brier(p_bt),
                          "ece_if_calibrated": M.ece_if_calibrated(p_bt)}
    if p_g is not None:
        out["calibration"].update(temperature_gaussian=temperature_gaussian, ece_gaussian=M.ece(p_g),
                                  brier_gaussian=M.brier(p_g), ece_gaussian_if_calibrated=M.ece_if_calibrated(p_g))
    out["signals"] = {name: {"auroc": M.auroc(u, ~correct),
                             **{f"accuracy_at_{int(c * 100)}": M.accuracy_at_coverage(correct, u, c) for c in COVERAGES},
                             "aurc": M.aurc(correct, u)}
                      for name, u in uncertainty_signals(chosen, rejected).items()}
    return out


def attribute_metrics(scores: Scores, y: torch.Tensor, names) -> dict | None:
    """MSE, Pearson and Spearman r, Gaussian NLL and central 50 / 90% interval coverage per attribute
    (and their means), for a model with attribute means; NLL and coverage only where it has stds."""
    if scores.attribute_means is None:
        return None
    mu = scores.attribute_means.double()
    stds = scores.attribute_stds.double() if scores.attribute_stds is not None else torch.ones_like(mu)
    report = M.regression_report(mu, stds.log(), y.double(), names)
    if scores.attribute_stds is None:  # no interval to judge
        for entry in (report, *report["per_attribute"].values()):
            for key in ("nll", "mean_sigma", "coverage50", "coverage90"):
                entry.pop(key)
    outside = ((mu < 0) | (mu > 4)).double().mean().item()
    return {**report, "means_outside_label_range": outside}
