"""The two stages' trainers: plain loops, no framework.

``fit_value_head`` fits the Gaussian value head(s) on features and labels (docs/method.md 2, 4): in closed form
for ``--loss ridge`` (the default, ``pipeline.train.closed_form``), else by AdamW (reparam, nll, beta-nll);
``fit_gate`` fits the gate with the Bradley-Terry loss on pairs, value head frozen (docs/method.md 3): the kind
given, or with ``--gate auto`` the one cross-validation picks (``pipeline.train.gate_selection``).
Features come from a minibatch source (``pipeline.train.feature_stream``): held on the device in their
stored dtype (float16 halves the memory), or streamed from the cache's parts when they exceed the
memory budget; the epoch order is the same either way (parts shuffled, then rows within a part), so
both give the same heads. Each minibatch is gathered with a shuffled index tensor and cast to
float32: no DataLoader, no per-row Python. Every
random draw comes from a seeded generator, so two runs on CPU give bit-identical weights. Reading
caches and writing the heads folder is the recipe's (pipeline.recipes.train).
"""

from __future__ import annotations

import logging
import time

import torch

from pipeline import ATTRIBUTES
from pipeline import metrics as M
from pipeline.device import resolve_device
from pipeline.errors import UserError
from pipeline.model import (Heads, HeadsError, LabelScaling, SigmaCalibration, ValueEnsemble, split_mean_logstd,
                            unstandardize)
from pipeline.train import losses
from pipeline.train.calibration import calibrate_heads, sigma_report
from pipeline.train.feature_stream import as_rows, part_shuffled, row_chunks
from pipeline.train.fit import Fit
from pipeline.train.optimization import EarlyStopping, adamw, split_off, split_rows, stop_if_diverged, warn_few_steps


logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Stage 1: value head(s) on ratings (docs/method.md 2, 4)


def label_scaling(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-attribute mean and std of the labelled cells (std 1 where it would be 0)."""
    mean = y.nanmean(0)
    std = (y - mean).square().nanmean(0).sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


@torch.no_grad()
def predict_members(model: ValueEnsemble, x: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's (mu, log_sigma) [M, N, K] on the label scale (standardisation undone)."""
    out = torch.cat([model(x[rows].float()) for rows in row_chunks(len(x))], dim=1)
    mu, log_sigma = split_mean_logstd(out)
    return mu * std + mean, log_sigma + std.log()


def stage1_epoch(model, opt, rows, y, order, cfg, noise) -> float:
    """One pass over ``order`` [M, n] (each member's own shuffle) of the features ``rows`` (a minibatch
    source); returns the mean member loss."""
    total = torch.zeros((), device=y.device)
    for idx, (x,) in rows.batches(order, cfg.optim.batch_size):
        idx = idx.to(y.device)  # [M, b]
        mu, log_sigma = split_mean_logstd(model(x.float()))  # [M, b, K]
        # Sum over members: each member's gradient is that of its own mean loss.
        loss = losses.stage1_loss(cfg.loss, mu, log_sigma, y[idx], beta=cfg.beta, generator=noise).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * idx.shape[1]
    return (total / order.numel()).item()


def value_heads(model: ValueEnsemble, mean, std, bias: bool) -> Heads:
    """The trained members as ``Heads`` on the label scale: score = member mean, ensemble = all."""
    members, rows, d = model.weight.shape
    b = model.bias.detach() if model.bias is not None else model.weight.new_zeros(members, rows)
    weight, b = unstandardize(model.weight.detach(), b, mean, std)
    heads = Heads(d, rows // 2, members, bias=bias).to(weight.device)
    with torch.no_grad():
        heads.score.weight.copy_(weight.mean(0))
        if bias:
            heads.score.bias.copy_(b.mean(0))
        if members > 1:
            heads.ensemble.weight.copy_(weight)
            if bias:
                heads.ensemble.bias.copy_(b)
    return heads


def fit_value_head(features, labels: torch.Tensor, cfg, names=ATTRIBUTES) -> Fit:
    """Stage 1: fit ``cfg.ensemble`` Gaussian value heads on features [N, d] (a tensor, or a minibatch
    source of ``pipeline.train.feature_stream``) and labels [N, K] (NaN = missing). ``--loss ridge`` (the
    default) solves it in closed form (``pipeline.train.closed_form``); the other losses train by AdamW."""
    if cfg.loss == "ridge":
        from pipeline.train.closed_form import fit_ridge_value_head

        return fit_ridge_value_head(features, labels, cfg, names)
    if cfg.loss not in losses.STAGE1_LOSSES:
        raise UserError(f"unknown loss {cfg.loss!r}: use one of {losses.STAGE1_LOSSES} (--loss)")
    device = resolve_device(cfg.run.device)
    rows, y = as_rows(features, device), labels.to(device, torch.float32)
    train, val = split_rows(rows.n, cfg.optim.val_fraction, cfg.run.seed)
    cal = train[:0]
    if cfg.calibrate:  # the means never see the calibration rows (the validation rows stay as without)
        train, cal = split_off(train, round(rows.n * cfg.calibration_fraction), cfg.run.seed)
    train, val, cal = train.to(device), val.to(device), cal.to(device)
    if torch.isnan(y[train]).all():
        raise UserError("the ratings have no labels at all: is this a preference cache? "
                        "Point --ratings-cache at a cache extracted from a ratings dataset")
    k, members = y.shape[1], cfg.ensemble
    mean, std = label_scaling(y[train]) if cfg.standardize_labels else (y.new_zeros(k), y.new_ones(k))
    y_train = (y - mean) / std  # NaN stays NaN
    gens = [torch.Generator().manual_seed(cfg.run.seed + m) for m in range(members)]  # docs/method.md 4
    model = ValueEnsemble(rows.d, k, members, cfg.bias, gens).to(device)
    opt = adamw(model.parameters(), cfg.optim)
    noise = torch.Generator(device=device).manual_seed(cfg.run.seed)
    stopper = EarlyStopping(list(model.parameters()), cfg.optim.patience, members)
    (x_val,), y_val = rows.take(val), y[val]  # validation and calibration rows are held in memory
    part_gen = torch.Generator().manual_seed(cfg.run.seed)  # the parts' order, shared by the members
    warn_few_steps(len(train), cfg.optim.batch_size, "--batch-size")
    history = []
    for epoch in range(1, cfg.optim.epochs + 1):
        t0 = time.perf_counter()
        order = part_shuffled(train, rows.part, gens, part_gen)
        train_loss = stage1_epoch(model, opt, rows, y_train, order, cfg, noise)
        seconds = time.perf_counter() - t0
        mu, log_sigma = predict_members(model, x_val, mean, std)
        criterion = losses.stage1_criterion(cfg.loss, mu, log_sigma, y_val)  # [M]
        stop_if_diverged(epoch, train_loss, criterion, "value head", "--lr", cfg.optim.lr)
        better = stopper.update(criterion, epoch)
        # The saved score head averages the members' weights = their mean outputs (linear head).
        report = M.regression_report(mu.mean(0), log_sigma.mean(0), y_val, names)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_criterion": criterion.mean().item(),
                        "seconds": seconds, "examples_per_s": order.numel() / seconds, **report})
        logger.info(f"value head epoch {epoch:3d}  train {train_loss:.4f}  val {cfg.loss} {criterion.mean():.4f}  "
                    f"mse {report['mse']:.4f}  r {report['pearson']:.3f}  nll {report['nll']:.3f}  "
                    f"sigma {report['mean_sigma']:.3f}  {seconds:.1f}s{'  *' if better.any() else ''}")
        if stopper.done:
            break
    stopper.restore()
    heads = value_heads(model, mean, std, bias=cfg.bias or cfg.standardize_labels)
    scaling = LabelScaling(cfg.standardize_labels, mean.tolist(), std.tolist())
    before = sigma_report(heads, x_val, y_val, names)
    calibration = SigmaCalibration("as trained", cfg.loss, 0, before, before)
    if cfg.calibrate:
        fitted = calibrate_heads(heads, rows.take(cal)[0], y[cal])
        calibration = SigmaCalibration("calibrated", cfg.loss, len(cal), before,
                                       sigma_report(heads, x_val, y_val, names), fitted)
        logger.info(f"sigma calibrated on {len(cal)} held-out rows: validation 90% coverage "
                    f"{before['coverage90']:.3f} -> {calibration.after['coverage90']:.3f}, NLL {before['nll']:.3f} -> "
                    f"{calibration.after['nll']:.3f}")
    return Fit(heads, history, evaluate_value_head(heads, x_val, y_val, names),
               stopper.best_epoch.tolist(), scaling, calibration)


@torch.no_grad()
def evaluate_value_head(heads: Heads, x: torch.Tensor, y: torch.Tensor, names=ATTRIBUTES) -> dict:
    """Stage-1 metrics of the saved heads (score head = ensemble mean) on features x, labels y."""
    mu, log_sigma = split_mean_logstd(torch.cat([heads.score(x[rows].float()) for rows in row_chunks(len(x))]))
    return M.regression_report(mu, log_sigma, y, names)


# ----------------------------------------------------------------------------------------------
# Stage 2: gate on preference pairs, value head frozen (docs/method.md 3; the gates: pipeline.train.gates)


class NoPreference(UserError):
    """The pairs carry no preference: every gate ties on every one of them, so none can be trained."""


CHANCE_LEVEL = 0.05  # a gate not better than a coin at this one-sided level is flagged (see ``against_chance``)


@torch.no_grad()
def check_preference(rows, mu_c: torch.Tensor, mu_r: torch.Tensor) -> int:
    """How many pairs have the same features on both sides (checked where the frozen value head already ties:
    identical features give identical outputs). Such a pair carries no preference: every gate scores its
    two sides the same. Some are a warning; all of them ``NoPreference``, before any gate is fitted."""
    tied = torch.nonzero((mu_c == mu_r).all(1)).flatten()
    same = 0
    for rows_ in row_chunks(len(tied)):
        xc, xr = rows.take(tied[rows_])
        same += int((xc == xr).all(1).sum())
    if same == rows.n:
        raise NoPreference(f"all {rows.n} pairs have identical chosen and rejected features: they carry no "
                           "preference, so no gate can be trained on them (every gate ties on every pair); extract "
                           "pairs whose two sides differ (`urm extract` drops identical ones)")
    if same:
        logger.warning(f"warning: {same} of {rows.n} pairs have identical chosen and rejected features: they carry no "
                       "preference (every gate ties on them; counted as wrong)")
    return same


def against_chance(d: torch.Tensor, where: str, level: float = CHANCE_LEVEL) -> dict:
    """Whether held-out pairs show the gate better than a coin, from its score differences d = s_c - s_r on them
    (``where``: "out-of-fold" when --gate auto cross-validated, each pair judged by a gate that did not see it;
    else "validation"): a one-sided exact sign test of its wins among the untied pairs against 1/2
    (``metrics.sign_test_p``). Not shown better (p >= ``level``) is a loud warning and a record in heads.json,
    not a refusal: on a few pairs a good gate often fails the test (at 60% right on 20 pairs p = 0.25), and
    refusing would refuse small honest datasets. Every held-out pair tied (no pair told apart at all: no
    preference reaches the gate) is ``NoPreference``: nothing is saved."""
    wins, n = int((d > 0).sum()), int((d != 0).sum())
    if n == 0:
        raise NoPreference(f"every one of the {len(d)} {where} pairs ties (s_chosen == s_rejected): the pairs carry "
                           "no preference the gate can see, so it is not saved as if trained")
    p = M.sign_test_p(wins, n)
    better = p < level
    if not better:
        logger.warning(f"warning: the gate is not shown better than chance: {wins} of {n} untied {where} pairs right, "
                       f"one-sided sign test against 1/2 p = {p:.3g} (>= {level}); it is saved, and heads.json records "
                       "it (gating.val.chance). With few pairs that may be noise; with many, the pairs may carry no "
                       "preference the value head's attributes see")
    return {"pairs": len(d), "where": where, "untied": n, "wins": wins, "p_value": p, "level": level,
            "better_than_chance": better}


def fit_gate(chosen, rejected: torch.Tensor | None, value: Heads, cfg,
             names=ATTRIBUTES, margin: torch.Tensor | None = None) -> Fit:
    """Stage 2: fit a gate with the BT loss on pairs (chosen, rejected [N, d]; or ``chosen`` a minibatch
    source of both sides from ``pipeline.train.feature_stream`` and ``rejected`` None); ``value`` stays frozen.

    ``--gate auto`` (the default) first chooses the kind (``pipeline.train.gate_selection``); the kind is then
    fitted on the training split (early stopping, and the pair temperatures, on the validation split). With
    ``cfg.use_margin`` the loss is TRL's margin-aware -log sigmoid(s_c - s_r - margin) over each pair's
    ``margin`` [N] (docs/method.md 3), and early stopping watches that loss on validation.
    """
    from pipeline.train.gate_selection import select_gate
    from pipeline.train.gates import (GatePairs, calibrate_pairs, equal_weights, fit_gate_kind, frozen_pair_outputs,
                                      pair_report, pair_scores)

    device = resolve_device(cfg.run.device)
    rows = as_rows(chosen if rejected is None else (chosen, rejected), device)
    if rows.d != value.d:
        raise HeadsError(f"the pairs have hidden size {rows.d} but the value head expects "
                         f"{value.d}: extract the preferences with the value head's backbone")
    if cfg.use_margin and margin is None:
        raise UserError("--use-margin needs each pair's margin; these pairs have none")
    value = value.to(device)
    outputs = frozen_pair_outputs(value, rows)
    check_preference(rows, outputs.mu_chosen, outputs.mu_rejected)
    pairs = GatePairs(rows, outputs, margin.to(device, torch.float32) if cfg.use_margin else None, names)
    train, val = (i.to(device) for i in split_rows(rows.n, cfg.optim.val_fraction, cfg.run.seed,
                                                   "--gate-val-fraction"))
    held = pairs.held(val)  # the validation pairs are held in memory
    equal = pair_report(lambda h: equal_weights(h, value.k), held, names)
    logger.info(f"equal weights (w_k = 1/K): val accuracy {equal['accuracy']:.4f}  bt {equal['bt_loss']:.4f}")
    kind, selection, oof = cfg.gate, {}, None
    if kind == "auto":
        kind, selection, oof = select_gate(value, pairs, train, val, cfg)
    heads, history, best_epoch = fit_gate_kind(kind, value, pairs, train, held, cfg)
    val_report = pair_report(heads.gate_weights, held, names)
    logger.info(f"gate {kind}: val accuracy {val_report['accuracy']:.4f} (equal weights {equal['accuracy']:.4f}), "
                f"BT loss {val_report['bt_loss']:.4f}")
    if oof is not None and len(oof[0]) > len(val):  # cross-validated: every pair judged by a gate that did not see it
        d, var_sum = (t.to(device).float() for t in oof)
        calibration = calibrate_pairs(d, torch.zeros_like(d), var_sum, torch.zeros_like(var_sum), cfg.pair_temperature)
        where = "out-of-fold"
    else:
        s_c, s_r, var_c, var_r, _ = pair_scores(heads.gate_weights, held)
        calibration = calibrate_pairs(s_c, s_r, var_c, var_r, cfg.pair_temperature)
        d, where = s_c - s_r, "validation"
    val_report["chance"] = against_chance(d, where)
    if cfg.pair_temperature:
        logger.info(f"pair temperatures on {calibration.validation_pairs} {where} pairs: BT "
                    f"{calibration.temperature_bt:.3g} (ECE {calibration.before['ece']:.3f} -> "
                    f"{calibration.after['ece']:.3f}), Gaussian {calibration.temperature_gaussian:.3g} "
                    f"(ECE {calibration.before['ece_gaussian']:.3f} -> {calibration.after['ece_gaussian']:.3f})")
    return Fit(heads, history, {**val_report, "equal_weights": equal, "gate": kind}, best_epoch, calibration=calibration,
               selection=selection)
