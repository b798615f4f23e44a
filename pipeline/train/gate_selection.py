"""`--gate auto`: the gate the pairs support, chosen by cross-validation, never one that loses to a simpler gate.

Every candidate kind (``--gate-candidates``, of ``pipeline.train.gates.GATE_KINDS``) is fitted on the other
folds' pairs of a K-fold split (``--gate-folds``, default 5, over every pair of the cache; a trained kind
stops early on a split of those) and scored on the fold's own pairs, so each pair is judged once by a
gate that never saw it. Above ``CV_MAX_PAIRS`` pairs the validation split alone decides (its standard
error is small there, and K trainings of an MLP gate at the published shapes would cost hours on a CPU).

The score of a candidate is its per-pair Bradley-Terry loss at its own temperature (one number fitted on
its out-of-fold score differences): the export applies a fitted pair temperature anyway, so candidates
are compared on how they rank pairs, not on how over-confident they are. The rule, simplest kind first
(equal, global, urm-warm, urm, softmax): a candidate becomes the choice only if its mean loss is below
every simpler candidate's AND it beats the best simpler one by more than ``Z[kind]`` standard errors of
their paired per-pair difference (0 for the K-number global vector, 1 for the MLP gates). So the choice
never has a higher cross-validated loss than a simpler gate, and extra capacity pays for itself beyond
the noise of these pairs. The choice is then fitted on the training split as ``--gate <kind>`` would be.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pipeline import ATTRIBUTES
from pipeline.train.calibration import fit_temperature
from pipeline.train.gates import GATE_KINDS, fit_gate_kind, pair_scores
from pipeline.train.optimization import split_rows

if TYPE_CHECKING:  # the configs are the caller's (pipeline.configs)
    from pipeline.configs import GatingConfig

CV_MAX_PAIRS = 20_000
Z = {"equal": 0.0, "global": 0.0, "urm-warm": 1.0, "urm": 1.0, "softmax": 1.0}


def folds_of(n: int, k: int, seed: int) -> list[torch.Tensor]:
    """``k`` disjoint seeded-random folds covering range(n).

    >>> sorted(torch.cat(folds_of(10, 3, 0)).tolist()) == list(range(10))
    True
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))
    return [perm[i::k].sort().values for i in range(k)]


def tempered_bt_losses(d: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(per-pair -log sigmoid(d / T) [n], T) at the T minimising their mean (``calibration.fit_temperature``)."""
    t = fit_temperature(d.double(), "bt")
    return -F.logsigmoid(d.double() / t), t


def choose(losses: dict[str, torch.Tensor], order: list[str], z: dict[str, float] = Z) -> tuple[str, list[str]]:
    """The kind to use from per-pair losses on the same pairs (name -> [n]), ``order`` simplest first, and one
    reason per candidate (see the module docstring for the rule).

    >>> same = torch.tensor([0.5, 0.7, 0.6])
    >>> choose({"equal": same, "global": same - 0.1}, ["equal", "global"])[0]
    'global'
    >>> choose({"equal": same, "global": same - 0.1, "urm-warm": same - 0.11}, ["equal", "global", "urm-warm"])[0]
    'global'
    """
    chosen = order[0]
    reasons = [f"{chosen}: CV BT {float(losses[chosen].mean()):.4f} (the fallback)"]
    for i, name in enumerate(order[1:], 1):
        best = min(order[:i], key=lambda o: float(losses[o].mean()))
        diff = (losses[best] - losses[name]).double()
        gain = float(diff.mean())
        se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
        needed = z.get(name, 1.0)
        if gain > 0 and gain > needed * se:
            reasons.append(f"{name}: CV BT {float(losses[name].mean()):.4f} beats the best simpler gate ({best}) by "
                           f"{gain:.4f} > {needed:g} SE ({se:.4f}): chosen")
            chosen = name
        else:
            reasons.append(f"{name}: CV BT {float(losses[name].mean()):.4f}, {gain:+.4f} against {best} (SE {se:.4f}, "
                           f"needs > {needed:g} SE): keeps {chosen}")
    return chosen, reasons


def select_gate(rows, value, frozen: tuple, train: torch.Tensor, val: torch.Tensor, cfg: GatingConfig, margin=None,
                names=ATTRIBUTES, log=print) -> tuple[str, dict, tuple[torch.Tensor, torch.Tensor]]:
    """The gate kind for these pairs (``rows``, a minibatch source; ``frozen`` the value head's (mu_c, ls_c, mu_r,
    ls_r) of every pair), the record of how it was chosen (for heads.json), and the chosen kind's out-of-fold
    (s_c - s_r, Var_c + Var_r) of every scored pair: what its pair temperatures are best fitted on."""
    t0 = time.perf_counter()
    mu_c, ls_c, mu_r, ls_r = frozen
    device = mu_c.device
    kinds = [k for k in GATE_KINDS if k in cfg.gate_candidates]
    cv = cfg.gate_folds > 1 and rows.n <= CV_MAX_PAIRS
    if cv:
        folds = folds_of(rows.n, cfg.gate_folds, cfg.run.seed)
        plan = [(torch.cat([f for j, f in enumerate(folds) if j != i]).sort().values, folds[i]) for i in range(len(folds))]
        protocol = f"{cfg.gate_folds}-fold cross-validation over all {rows.n} pairs"
    else:
        plan = [(train.cpu(), val.cpu())]
        protocol = (f"the validation split ({len(val)} pairs; over {CV_MAX_PAIRS} pairs it decides alone)" if
                    cfg.gate_folds > 1 else f"the validation split ({len(val)} pairs; --gate-folds 1)")
    log(f"gate: choosing among {', '.join(kinds)} by {protocol} ...")
    quiet = dataclasses.replace(cfg, pair_temperature=False)
    oof = {k: torch.empty(rows.n, dtype=torch.float64) for k in kinds}  # s_c - s_r of the gate that did not see it
    oof_var = {k: torch.empty(rows.n, dtype=torch.float64) for k in kinds}  # Var_c + Var_r under its weights
    seconds = dict.fromkeys(kinds, 0.0)
    for fit_idx, score_idx in plan:
        # a trained kind stops early on a split of the pairs it is fitted on, never on the pairs it is scored on
        inner_train, inner_val = (fit_idx[i] for i in split_rows(len(fit_idx), cfg.optim.val_fraction, cfg.run.seed,
                                                                "--gate-val-fraction"))
        inner_train, inner_val, score_idx = inner_train.to(device), inner_val.to(device), score_idx.to(device)
        xv = rows.take(inner_val)
        val_pairs = (*xv, mu_c[inner_val], ls_c[inner_val], mu_r[inner_val], ls_r[inner_val],
                     None if margin is None else margin[inner_val])
        xs = rows.take(score_idx)
        for kind in kinds:
            t1 = time.perf_counter()
            heads, _, _ = fit_gate_kind(kind, rows, value, mu_c, mu_r, inner_train, val_pairs, quiet, margin, names,
                                        log=lambda line: None)
            s_c, s_r, var_c, var_r, _ = pair_scores(heads.gate_weights, *xs, mu_c[score_idx], ls_c[score_idx],
                                                    mu_r[score_idx], ls_r[score_idx])
            oof[kind][score_idx.cpu()] = (s_c - s_r).double().cpu()
            oof_var[kind][score_idx.cpu()] = (var_c + var_r).double().cpu()
            seconds[kind] += time.perf_counter() - t1
    scored = torch.cat([s for _, s in plan]).sort().values
    tempered, table = {}, {}
    for kind in kinds:
        d = oof[kind][scored]
        tempered[kind], temperature = tempered_bt_losses(d)
        table[kind] = {"bt_loss": float(-F.logsigmoid(d).mean()), "bt_loss_tempered": float(tempered[kind].mean()),
                       "temperature": temperature, "accuracy": float((d > 0).double().mean()),
                       "seconds": seconds[kind]}
    chosen, reasons = choose(tempered, kinds)
    for line in reasons:
        log(f"  {line}")
    log(f"gate: {chosen} (chosen by {protocol}, {time.perf_counter() - t0:.1f}s)")
    return chosen, {"chosen": chosen, "protocol": protocol, "scored_pairs": len(scored), "candidates": table,
                    "criterion": "per-pair BT loss at each candidate's own temperature",
                    "rule": "simplest first; a candidate must beat every simpler one, the best of them by more than z "
                            "paired standard errors", "z": {k: Z[k] for k in kinds}, "reasons": reasons,
                    "seconds": time.perf_counter() - t0}, (oof[chosen][scored], oof_var[chosen][scored])
