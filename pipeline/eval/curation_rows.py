"""What `urm curate` writes, as rows: every pair judged (scored.jsonl), the kept pairs as TRL rows (curated.jsonl)
or the pairs to label next (selected.jsonl), the values the plot draws and the numbers report.md states. Built
from the pairs, their scores and ``curation.judge_pairs``' judgements; the recipe writes them (no I/O here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.eval.curation import certainty, keep_cut, kept_pairs, least_certain, suspects, uncertainty
from pipeline.eval.evaluation import Scores


@dataclass
class JudgedPairs:
    """The pairs read, the model's scores for both sides, and what the summary says about where they came from."""

    pairs: list  # PreferencePair, in input order (those scored)
    chosen: Scores
    rejected: Scores
    temperature_bt: float
    temperature_gaussian: float
    dropped: int
    model: str
    identical: int = 0  # pairs dropped as read: their chosen is identical to their rejected


@dataclass
class Curation:
    """What one curation writes: rows per file name, the plot's values (``curation_report.curation_plot``'s
    arguments) and the summary report.md and the CLI state."""

    files: dict[str, list[dict]]
    plot: dict
    summary: dict


def side_scores(out: dict[str, np.ndarray], side: int) -> Scores:
    """The outputs of every pair's chosen (side 0) or rejected (side 1) conversation as ``Scores``."""
    def take(name):
        return torch.from_numpy(np.ascontiguousarray(out[name][side::2])) if name in out else None

    return Scores(take("score"), take("score_std"), take("ensemble_scores"), take("attribute_means"),
                  take("attribute_stds"), take("epistemic_std"))


def trl_row(pair) -> dict:
    """A pair in TRL's conversational format (whole conversations on both sides), as `urm extract` reads it."""
    row = {"id": pair.pair_id, "chosen": pair.chosen, "rejected": pair.rejected}
    if pair.subset is not None:
        row["subset"] = pair.subset
    return row


def scored_rows(data: JudgedPairs, judged: dict, signal: str, name: str, values: torch.Tensor,
                extra: dict) -> list[dict]:
    """One row per pair: its scores, probabilities, the signal's value under ``name``, and the ``extra`` flags."""
    rows = []
    for i, pair in enumerate(data.pairs):
        row = {"id": pair.pair_id, "subset": pair.subset, "score_chosen": float(data.chosen.score[i]),
               "score_rejected": float(data.rejected.score[i]), "p_chosen": float(judged["p_chosen"][i])}
        for key in ("p_chosen_gaussian", "ensemble_disagreement", "p_chosen_epistemic"):
            if key in judged:
                row[key] = float(judged[key][i])
        row.update(signal=signal, **{name: float(values[i])})
        rows.append({**row, **{k: bool(v[i]) for k, v in extra.items()}})
    return rows


def curated(data: JudgedPairs, judged: dict, cfg) -> Curation:
    """Curating labelled pairs under ``cfg`` (``pipeline.configs.CurateConfig``): scored.jsonl's rows (certainty,
    suspect, kept), curated.jsonl's (the kept pairs as TRL rows), the plot's values and the numbers for report.md."""
    certain = certainty(judged, cfg.signal)
    suspect = suspects(judged["p_chosen"], cfg.suspect_threshold)
    keep = kept_pairs(certain, suspect, cfg.keep_certain, cfg.drop_suspect_only)
    files = {"scored.jsonl": scored_rows(data, judged, cfg.signal, "certainty", certain,
                                         {"suspect": suspect, "kept": keep}),
             "curated.jsonl": [trl_row(p) for p, k in zip(data.pairs, keep.tolist()) if k]}
    cut = None if cfg.drop_suspect_only else keep_cut(certain, keep)
    plot = dict(p_chosen=judged["p_chosen"].numpy(), kept=keep.numpy(), threshold=cfg.suspect_threshold,
                signal_values=certain.numpy(), signal=cfg.signal, cut=cut)
    rule = ("every pair but the suspects" if cfg.drop_suspect_only else
            f"the most certain {cfg.keep_certain:.0%} of the pairs, less the suspects")
    return Curation(files, plot, {
        "mode": "curate", "suspects": int(suspect.sum()), "kept": int(keep.sum()), "rule": rule, "cut": cut,
        "suspect_threshold": cfg.suspect_threshold, "mean_p_chosen": float(judged["p_chosen"].mean()),
        "agreement": float((judged["gap"] > 0).double().mean()), "outputs": ["scored.jsonl", "curated.jsonl"]})


def selected(data: JudgedPairs, judged: dict, cfg) -> Curation:
    """Picking the ``cfg.select`` unlabelled pairs the model is least sure of: selected.jsonl's rows (least certain
    first), scored.jsonl's (A and B for chosen and rejected), the plot's values, the numbers for report.md."""
    unsure = uncertainty(judged, cfg.signal)
    picked = least_certain(unsure, cfg.select)
    chosen = torch.zeros(len(unsure), dtype=torch.bool)
    chosen[picked] = True
    rows = scored_rows(data, judged, cfg.signal, "uncertainty", unsure, {"selected": chosen})
    for row in rows:
        row["p_a_better"] = row.pop("p_chosen")
        row["score_a"], row["score_b"] = row.pop("score_chosen"), row.pop("score_rejected")
        if "p_chosen_gaussian" in row:
            row["p_a_better_gaussian"] = row.pop("p_chosen_gaussian")
    picks = [{"id": data.pairs[i].pair_id, "signal": cfg.signal, "uncertainty": float(unsure[i]),
              "p_a_better": float(judged["p_chosen"][i]), "a": data.pairs[i].chosen, "b": data.pairs[i].rejected}
             for i in picked.tolist()]
    plot = dict(p_chosen=judged["p_chosen"].numpy(), kept=chosen.numpy(), threshold=None, signal_values=unsure.numpy(),
                signal=cfg.signal, cut=None)
    values = unsure[picked]
    return Curation({"scored.jsonl": rows, "selected.jsonl": picks}, plot, {
        "mode": "select", "selected": len(picks), "uncertainty_range": (float(values.min()), float(values.max())),
        "outputs": ["scored.jsonl", "selected.jsonl"]})
