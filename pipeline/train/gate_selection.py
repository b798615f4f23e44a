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

What the data can support: the trained kinds (the MLP gates urm-warm, urm, softmax, ``TRAINED_KINDS``) are tried
only when the pairs each of their fits learns from give more feature vectors than the features have dimensions
(2 x fitted pairs > d; ``mlp_supported``). With no more, those 2n vectors are linearly independent (as h's
are), so a gate that reads h through a linear layer can give every training pair whatever weights fit its label:
it interpolates the pairs, and early stopping, not the data, decides what it learns; cross-validation can then
only measure noise. The closed-form kinds (equal, global: K numbers) are always tried. SmolLM2's d = 576 needs
about 400 pairs at 5 folds (the demo's 160 are fewer: it keeps the global gate it chose when the MLPs were
fitted too); Llama-3.1-8B's d = 4096 about 2,850.

Cost: the closed-form kinds take a moment (L-BFGS on K numbers); the trained kinds' fits (folds x kinds) run
in parallel on a CPU with more than one core, each on its own share of the cores, their AdamW steps fused
(``pipeline.train.optimization.adamw``). A line per finished fit says which candidate and fold, and how long
is left.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import os
import time

import torch
import torch.nn.functional as F

from pipeline import unheard
from pipeline.train.calibration import fit_temperature
from pipeline.train.feature_stream import TensorRows
from pipeline.train.gates import GATE_KINDS, TRAINED_KINDS, GatePairs, HeldPairs, fit_gate_kind, pair_scores
from pipeline.train.optimization import split_rows


logger = logging.getLogger(__name__)

CV_MAX_PAIRS = 20_000
FIT_SPEAKERS = ("pipeline.train.gates", "pipeline.train.optimization")  # what a fold's fit says is not heard
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


def mlp_supported(fitted_pairs: int, d: int) -> bool:
    """Whether an MLP gate fitted on ``fitted_pairs`` pairs of width-``d`` features can learn from them rather than
    interpolate them: more feature vectors (two a pair) than dimensions (see the module docstring).

    >>> mlp_supported(115, 576), mlp_supported(1150, 576)
    (False, True)
    """
    return 2 * fitted_pairs > d


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` for the block (each parallel fit then runs on its own cores: small
    matmuls split over threads that other fits also want only wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclasses.dataclass
class Fold:
    """One split of `--gate auto`'s plan: the pairs a candidate is fitted on (``train``, stopping early on
    ``val``, a split of them) and the pairs it is scored on (``scored``, held in memory as ``judged``)."""

    index: int
    train: torch.Tensor
    val: HeldPairs
    scored: torch.Tensor
    judged: HeldPairs


def select_gate(value, pairs: GatePairs, train: torch.Tensor, val: torch.Tensor,
                cfg) -> tuple[str, dict, tuple[torch.Tensor, torch.Tensor]]:
    """The gate kind for these pairs (``train`` and ``val`` their training and validation split), the record of how
    it was chosen (for heads.json), and the chosen kind's out-of-fold (s_c - s_r, Var_c + Var_r) of every scored
    pair: what its pair temperatures are best fitted on.

    The fits of the trained kinds run in parallel over the folds on a CPU with more than one core (each on its
    own share of the cores; their numbers do not depend on how many run at once), and a line per finished fit
    says which candidate and fold, and how long is left."""
    t0 = time.perf_counter()
    rows = pairs.rows
    device = pairs.outputs.mu_chosen.device
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
    quiet = dataclasses.replace(cfg, pair_temperature=False)
    splits = []
    for i, (fit_idx, score_idx) in enumerate(plan):
        # a trained kind stops early on a split of the pairs it is fitted on, never on the pairs it is scored on
        inner_train, inner_val = (fit_idx[j] for j in split_rows(len(fit_idx), cfg.optim.val_fraction, cfg.run.seed,
                                                                "--gate-val-fraction"))
        inner_train, inner_val, score_idx = inner_train.to(device), inner_val.to(device), score_idx.to(device)
        splits.append(Fold(i, inner_train, pairs.held(inner_val), score_idx, pairs.held(score_idx)))
    fitted = min(len(f.train) for f in splits)
    not_tried = {}
    if not mlp_supported(fitted, rows.d) and any(k not in TRAINED_KINDS for k in kinds):
        not_tried = {k: (f"not tried: fitted on {fitted} pairs, 2 x {fitted} feature vectors are no more than the "
                         f"features' width d = {rows.d}, so it would interpolate them") for k in kinds if k in TRAINED_KINDS}
        kinds = [k for k in kinds if k not in not_tried]
        logger.info(f"gate: {', '.join(not_tried)} not tried: each fit would learn from {fitted} pairs, whose "
                    f"{2 * fitted} feature vectors do not outnumber the features' width ({rows.d}); an MLP gate would "
                    "interpolate them")
    oof = {k: torch.empty(rows.n, dtype=torch.float64) for k in kinds}  # s_c - s_r of the gate that did not see it
    oof_var = {k: torch.empty(rows.n, dtype=torch.float64) for k in kinds}  # Var_c + Var_r under its weights
    seconds = dict.fromkeys(kinds, 0.0)
    epochs = {k: [0] * len(splits) for k in kinds if k in TRAINED_KINDS}  # each fold's, in fold order

    def fit(kind: str, fold: Fold) -> tuple[str, Fold, float, int, torch.Tensor, torch.Tensor]:
        """``kind`` fitted on ``fold``: (kind, fold, seconds, epochs, s_c - s_r and Var_c + Var_r of its scored pairs)."""
        t1 = time.perf_counter()
        heads, history, _ = fit_gate_kind(kind, value, pairs, fold.train, fold.val, quiet)
        s_c, s_r, var_c, var_r, _ = pair_scores(heads.gate_weights, fold.judged)
        return kind, fold, time.perf_counter() - t1, len(history), (s_c - s_r).double().cpu(), \
            (var_c + var_r).double().cpu()

    def record(result) -> tuple[str, Fold, float, int]:
        kind, fold, took, ran, d, var = result
        oof[kind][fold.scored.cpu()] = d
        oof_var[kind][fold.scored.cpu()] = var
        seconds[kind] += took
        return kind, fold, took, ran

    trained = [k for k in kinds if k in TRAINED_KINDS]
    for kind in [k for k in kinds if k not in TRAINED_KINDS]:  # closed form / L-BFGS on K numbers: a moment each
        for fold in splits:
            record(fit(kind, fold))
    tasks = [(kind, fold) for kind in sorted(trained, key=TRAINED_KINDS.index, reverse=True) for fold in splits]
    workers = max(1, min(len(tasks), available_cores())) if device.type == "cpu" and isinstance(rows, TensorRows) else 1
    logger.info(f"gate: choosing among {', '.join(kinds)} by {protocol}: {len(tasks)} trained fits"
                + (f", {workers} at a time" if workers > 1 else "") + " ...")
    done, started = 0, time.perf_counter()
    with torch_threads(max(1, available_cores() // workers)) if workers > 1 else contextlib.nullcontext(), \
            concurrent.futures.ThreadPoolExecutor(workers) as pool, unheard(*FIT_SPEAKERS):
        try:
            for future in concurrent.futures.as_completed([pool.submit(fit, kind, fold) for kind, fold in tasks]):
                kind, fold, took, ran = record(future.result())
                epochs[kind][fold.index] = ran
                done += 1
                left = (time.perf_counter() - started) / done * (len(tasks) - done)
                logger.info(f"  {kind} fold {fold.index + 1}/{len(splits)}: {ran} epochs, {took:.1f}s "
                            f"({done}/{len(tasks)} fits; about {left:.0f}s left)")
        except BaseException:  # an error, or Ctrl-C: the fits not started yet are dropped, not waited for
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    scored = torch.cat([s for _, s in plan]).sort().values
    tempered, table = {}, {}
    for kind in kinds:
        d = oof[kind][scored]
        tempered[kind], temperature = tempered_bt_losses(d)
        table[kind] = {"bt_loss": float(-F.logsigmoid(d).mean()), "bt_loss_tempered": float(tempered[kind].mean()),
                       "temperature": temperature, "accuracy": float((d > 0).double().mean()),
                       "seconds": seconds[kind], **({"epochs": epochs[kind]} if kind in epochs else {})}
    chosen, reasons = choose(tempered, kinds)
    for line in reasons:
        logger.info(f"  {line}")
    logger.info(f"gate: {chosen} (chosen by {protocol}, {time.perf_counter() - t0:.1f}s)")
    return chosen, {"chosen": chosen, "protocol": protocol, "scored_pairs": len(scored), "candidates": table,
                    "criterion": "per-pair BT loss at each candidate's own temperature",
                    "rule": "simplest first; a candidate must beat every simpler one, the best of them by more than z "
                            "paired standard errors", "z": {k: Z[k] for k in kinds}, "reasons": reasons,
                    "not_tried": not_tried, "mlp_rule": "trained (MLP) kinds only when 2 x fitted pairs > d",
                    "parallel_fits": workers, "seconds": time.perf_counter() - t0}, \
        (oof[chosen][scored], oof_var[chosen][scored])
