"""Every model of an evaluation on every held-out cache: the per-model metrics and the main model's curves.

``compare`` runs each ``Candidate`` (the heads, then the baselines) over the held-out preference caches (pair
accuracy and calibration), the held-out ratings (attribute metrics) and the shift check (does its uncertainty
grow off its data?), and keeps the first model's raw per-pair values for the plots (``pipeline.eval.report``).
"""

from __future__ import annotations

import dataclasses

import torch

from pipeline import metrics as M
from pipeline.eval.evaluation import (Candidate, Scores, attribute_metrics, chosen_probabilities, pair_metrics,
                                      row_signals, shift_metrics, uncertainty_signals)


def compare(candidates: list[Candidate], eval_pairs: dict, eval_ratings, shift_ratings: dict,
            names) -> tuple[list[dict], dict]:
    """(one entry per candidate: its temperatures and metrics per cache, the first candidate's curves).
    ``eval_pairs``: name -> (path, pairs); ``eval_ratings``: (path, rated features) or None; ``shift_ratings``:
    name -> (path, rated features) of other sources; ``names``: the attributes."""
    models, curves = [], {"pairs": {}}
    for i, c in enumerate(candidates):
        entry = {"name": c.name, "about": c.about, "temperature_bt": c.temperature_bt,
                 "temperature_gaussian": c.temperature_gaussian, "pairs": {}}
        scored = {}  # each held-out pair cache's (chosen, rejected) scores, for the metrics and the shift check
        for name, (_, p) in eval_pairs.items():
            chosen, rejected = scored[name] = c.scores(p.chosen), c.scores(p.rejected)
            entry["pairs"][name] = pair_metrics(chosen, rejected, p.chosen.subset, c.temperature_bt,
                                                c.temperature_gaussian)
            if i == 0:
                curves["pairs"][name] = pair_curves(chosen, rejected, c)
        if eval_ratings is not None:
            scores = c.scores(eval_ratings[1])
            entry["attributes"] = attribute_metrics(scores, eval_ratings[1].labels.cpu(), names)
            if i == 0 and scores.attribute_means is not None:
                curves["attributes"] = {"names": list(names), "y": eval_ratings[1].labels.cpu().numpy(),
                                        "mu": scores.attribute_means.numpy(), "sigma": scores.attribute_stds.numpy()}
            entry["shift"] = shift_checks(c, scores, scored, shift_ratings, names)
        models.append(entry)
    return models, curves


def shift_checks(c: Candidate, reference: Scores, pair_scores: dict, shift_ratings: dict, names) -> dict:
    """Whether the model knows when it is off its data (``evaluation.shift_metrics``): the held-out ratings of its
    training source against every held-out preference cache (``pair_scores``: name -> its (chosen, rejected)
    scores; each side of a pair a row) and every other rated cache (with coverage there). Empty for a model that
    states no uncertainty per row."""
    if not row_signals(reference):
        return {}
    out = {name: shift_metrics(reference, concat_scores(*sides)) for name, sides in pair_scores.items()}
    for name, (_, f) in shift_ratings.items():
        out[name] = shift_metrics(reference, c.scores(f), f.labels.cpu(), names)
    return out


def concat_scores(a: Scores, b: Scores) -> Scores:
    """The rows of two ``Scores``, one after the other."""
    def cat(x, y):
        return None if x is None else torch.cat([x, y])

    return Scores(*(cat(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(Scores)))


def pair_curves(chosen, rejected, c: Candidate) -> dict:
    """The main model's raw per-pair values the plots need."""
    p_bt, p_g = chosen_probabilities(chosen, rejected, c.temperature_bt, c.temperature_gaussian)
    out = {"p_bt": p_bt.numpy(), "risk": {}}
    if p_g is not None:
        out["p_gaussian"] = p_g.numpy()
    correct = chosen.score.double() > rejected.score.double()
    out["risk"] = {name: M.risk_curve(correct, u) for name, u in uncertainty_signals(chosen, rejected).items()}
    return out
