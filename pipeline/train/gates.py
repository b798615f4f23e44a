"""Stage 2's gates and how each is fitted on pairs, the value head frozen (docs/method.md 3).

A gate gives each row its attribute weights w(h) [K]; the score is sum_k w_k mu_k(h). The kinds
(``GATE_KINDS``, simplest first; `--gate auto` chooses among them, ``pipeline.train.gate_selection``):

  equal     w_k = 1/K for every row (SteerLM-style)
  global    one weight vector for every row, K numbers fitted by the BT loss (convex, L-BFGS)
  urm-warm  the URM MLP gate (Linear d->h, SELU, Linear h->h, SELU, Linear h->K) started AT the global vector
            (last layer weight 0, bias = the global weights), trained by AdamW with early stopping that counts
            the starting point: it moves from the global gate only where validation says so
  urm       the URM MLP gate from a random start (the seed's and the published URM's)
  softmax   ArmoRM's gate: ReLU MLP, softmax(x / T) over the attributes, times a learned scale

equal, global and urm-warm are all stored as the URM gate module (a constant gate is its last layer's bias),
so every choice exports in the published layout (``weights.*``) or as ArmoRM's (``softmax_gate.*``).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import ATTRIBUTES
from pipeline import metrics as M
from pipeline.errors import UserError
from pipeline.model import (GATES, VALUE_PREFIXES, Heads, PairCalibration, init_linear_, p_chosen_bt, p_chosen_gaussian, score,
                            score_variance, split_mean_logstd)
from pipeline.train import losses
from pipeline.train.calibration import fit_pair_temperatures
from pipeline.train.feature_stream import part_shuffled, row_chunks
from pipeline.train.optimization import EarlyStopping, adamw, stop_if_diverged, warn_few_steps


logger = logging.getLogger(__name__)

GATE_KINDS = ("equal", "global", "urm-warm", "urm", "softmax")  # simplest first
TRAINED_KINDS = ("urm-warm", "urm", "softmax")  # fitted by AdamW with early stopping (the others in closed form)


def with_gate(value: Heads, cfg, gate: str | None = None) -> Heads:
    """A copy of ``value`` with a fresh seeded gate of module type ``gate`` (default ``cfg.gate``: urm or
    softmax); the value-head parameters are frozen."""
    gate = gate or cfg.gate
    if gate not in GATES:
        raise UserError(f"unknown gate {gate!r}: use one of {GATES} (--gate)")
    heads = Heads(value.d, value.k, value.members, bias=value.score.bias is not None, gate=gate,
                  gate_hidden=cfg.gate_hidden, temperature=cfg.temperature,
                  posterior=value.architecture.get("posterior"))
    frozen = {n: t for n, t in value.state_dict().items() if n.startswith(VALUE_PREFIXES)}
    heads.load_state_dict(frozen, strict=False)
    g = torch.Generator().manual_seed(cfg.run.seed)
    gate = heads.weights if heads.weights is not None else heads.softmax_gate
    for layer in gate.modules():
        if isinstance(layer, nn.Linear):
            init_linear_(layer, g)
    for name, p in heads.named_parameters():
        p.requires_grad_(not name.startswith(VALUE_PREFIXES))
    return heads


@torch.no_grad()
def frozen_outputs(heads: Heads, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen value head's (mu, log_sigma) [N, K] for every row, computed once."""
    return split_mean_logstd(torch.cat([heads.score(x[rows].float()) for rows in row_chunks(len(x))]))


@dataclasses.dataclass(frozen=True)
class PairOutputs:
    """The frozen value head's outputs on pairs, computed once: each side's means and log-sigmas [N, K]."""

    mu_chosen: torch.Tensor
    log_sigma_chosen: torch.Tensor
    mu_rejected: torch.Tensor
    log_sigma_rejected: torch.Tensor

    def take(self, idx: torch.Tensor) -> PairOutputs:
        """The outputs of the pairs ``idx``."""
        return PairOutputs(self.mu_chosen[idx], self.log_sigma_chosen[idx], self.mu_rejected[idx],
                           self.log_sigma_rejected[idx])


@dataclasses.dataclass(frozen=True)
class HeldPairs:
    """Pairs held in memory to judge a gate on: both sides' features [n, d], the frozen value head's outputs on
    them, and each pair's margin [n] (None: the plain BT loss)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    outputs: PairOutputs
    margin: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class GatePairs:
    """What a gate is fitted on: the pairs (``rows``, a minibatch source of (chosen, rejected) features,
    ``pipeline.train.feature_stream``), the frozen value head's outputs on every pair, each pair's margin [N]
    (None: the plain BT loss) and the attributes' names."""

    rows: object
    outputs: PairOutputs
    margin: torch.Tensor | None = None
    names: tuple = ATTRIBUTES

    def held(self, idx: torch.Tensor) -> HeldPairs:
        """The pairs ``idx``, their features read into memory."""
        xc, xr = self.rows.take(idx)
        return HeldPairs(xc, xr, self.outputs.take(idx), None if self.margin is None else self.margin[idx])


@torch.no_grad()
def frozen_pair_outputs(heads: Heads, rows) -> PairOutputs:
    """The frozen value head's outputs on every pair of ``rows``, computed once."""
    out = [[], [], [], []]
    for _, (xc, xr) in rows.chunks():
        for i, x in enumerate((xc, xr)):
            mu, log_sigma = split_mean_logstd(heads.score(x.float()))
            out[2 * i].append(mu)
            out[2 * i + 1].append(log_sigma)
    return PairOutputs(*(torch.cat(o) for o in out))


def gate_epoch(heads: Heads, opt, pairs: GatePairs, order, batch_size: int) -> float:
    """One pass over the pairs in ``order`` of ``pairs``; returns the mean BT loss (margin-aware when the pairs have
    a margin)."""
    mu_c, mu_r, margin = pairs.outputs.mu_chosen, pairs.outputs.mu_rejected, pairs.margin
    total = torch.zeros((), device=mu_c.device)
    for idx, (xc, xr) in pairs.rows.batches(order, batch_size):
        idx = idx.to(mu_c.device)
        w = heads.gate_weights(torch.cat([xc, xr]).float())  # one pass for both sides
        s_chosen, s_rejected = score(w, torch.cat([mu_c[idx], mu_r[idx]])).chunk(2)
        loss = losses.bt_loss(s_chosen, s_rejected, None if margin is None else margin[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(idx)
    return (total / len(order)).item()


@torch.no_grad()
def pair_scores(weights_fn, pairs: HeldPairs):
    """(s_c, s_r, Var_c, Var_r, w_c) of gate ``weights_fn`` (h -> w [B, K]) over pairs."""
    xc, xr, out = pairs.chosen, pairs.rejected, pairs.outputs
    w_c = torch.cat([weights_fn(xc[rows].float()) for rows in row_chunks(len(xc))])
    w_r = torch.cat([weights_fn(xr[rows].float()) for rows in row_chunks(len(xr))])
    return (score(w_c, out.mu_chosen), score(w_r, out.mu_rejected), score_variance(w_c, out.log_sigma_chosen.exp()),
            score_variance(w_r, out.log_sigma_rejected.exp()), w_c)


def probability_report(s_c, s_r, var_c, var_r, temperature_bt: float = 1.0, temperature_gaussian: float = 1.0) -> dict:
    """ECE and Brier of P(chosen) under BT and under the Gaussians, at these temperatures."""
    p_bt = p_chosen_bt(s_c, s_r, temperature_bt)
    p_gauss = p_chosen_gaussian(s_c, s_r, var_c, var_r, temperature_gaussian)
    return {"ece": M.ece(p_bt), "brier": M.brier(p_bt), "ece_gaussian": M.ece(p_gauss),
            "brier_gaussian": M.brier(p_gauss)}


@torch.no_grad()
def pair_report(weights_fn, pairs: HeldPairs, names=ATTRIBUTES) -> dict:
    """Stage-2 metrics of gate ``weights_fn`` (h -> w [B, K]) on pairs, and its weights' spread;
    with the pairs' margin also the margin-aware BT loss (``bt_margin_loss``)."""
    margin = pairs.margin
    s_c, s_r, var_c, var_r, w_c = pair_scores(weights_fn, pairs)
    spread = w_c.std(0) if len(w_c) > 1 else torch.zeros_like(w_c[0])  # across prompts (chosen side)
    return {"accuracy": M.pairwise_accuracy(s_c, s_r), "bt_loss": losses.bt_loss(s_c, s_r).item(),
            **probability_report(s_c, s_r, var_c, var_r),
            "weights_mean": dict(zip(names, w_c.mean(0).tolist())),
            "weights_std": dict(zip(names, spread.tolist())),
            **({} if margin is None else {"bt_margin_loss": losses.bt_loss(s_c, s_r, margin).item()})}


def calibrate_pairs(s_c, s_r, var_c, var_r, fit: bool) -> PairCalibration:
    """The temperatures of the two pair probabilities, fitted by NLL on these (validation) pairs."""
    d = s_c - s_r
    t_bt, t_gauss = fit_pair_temperatures(d, var_c + var_r) if fit else (1.0, 1.0)
    return PairCalibration(t_bt, t_gauss, len(d), probability_report(s_c, s_r, var_c, var_r),
                           probability_report(s_c, s_r, var_c, var_r, t_bt, t_gauss))


def equal_weights(x: torch.Tensor, k: int) -> torch.Tensor:
    """w_k = 1/K for every row (SteerLM-style fixed combination, the comparison baseline)."""
    return x.new_full((len(x), k), 1.0 / k)


def global_weights(mu_c: torch.Tensor, mu_r: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """The K weights w minimising the mean BT loss -log sigmoid(w.(mu_c - mu_r) [- margin]) over pairs (mu [n, K]):
    a convex problem, solved by L-BFGS from equal weights, in float64.

    >>> mu_c, mu_r = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    >>> bool((global_weights(mu_c, mu_r) > 1).all())
    True
    """
    dmu = (mu_c - mu_r).detach().double()
    m = None if margin is None else margin.detach().double()
    w = torch.full((dmu.shape[1],), 1.0 / dmu.shape[1], dtype=torch.float64, device=dmu.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        d = dmu @ w
        # a whisker of L2 keeps w finite when the pairs are separable
        loss = -F.logsigmoid(d if m is None else d - m).mean() + 1e-8 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float()


def set_constant_gate(heads: Heads, w: torch.Tensor) -> Heads:
    """The URM gate of ``heads`` giving ``w`` [K] for every row: its last layer's weight 0 and bias w (the layout of
    a trained gate, so a constant gate exports and scores like any other; as a start, it is the warm start)."""
    last = heads.weights[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(w.to(last.bias.dtype))
    return heads


def train_gate(heads: Heads, pairs: GatePairs, train: torch.Tensor, val: HeldPairs, cfg,
               count_start: bool = False) -> tuple[list[dict], list[int]]:
    """AdamW on the gate of ``heads`` over the ``train`` pairs of ``pairs``, early stopping on ``val`` (the BT loss,
    margin-aware when the pairs have a margin); the best epoch's weights are kept. With ``count_start`` the starting
    point is epoch 0 of the early stopping (a warm start then never ends worse on validation than it began).
    Returns (history, best epoch)."""
    criterion = "bt_loss" if pairs.margin is None else "bt_margin_loss"
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = adamw(params, cfg.optim)
    order_gen = torch.Generator().manual_seed(cfg.run.seed)
    stopper = EarlyStopping(params, cfg.optim.patience)
    if count_start:
        stopper.update(torch.tensor([pair_report(heads.gate_weights, val, pairs.names)[criterion]]), 0)
    warn_few_steps(len(train), cfg.optim.batch_size, "--gate-batch-size")
    history = []
    for epoch in range(1, cfg.optim.epochs + 1):
        t0 = time.perf_counter()
        order = part_shuffled(train, pairs.rows.part, [order_gen], order_gen)[0]
        train_loss = gate_epoch(heads, opt, pairs, order, cfg.optim.batch_size)
        seconds = time.perf_counter() - t0
        report = pair_report(heads.gate_weights, val, pairs.names)
        stop_if_diverged(epoch, train_loss, torch.tensor([report[criterion]]), "gate", "--gate-lr", cfg.optim.lr)
        better = stopper.update(torch.tensor([report[criterion]]), epoch)
        history.append({"epoch": epoch, "train_loss": train_loss, "seconds": seconds,
                        "pairs_per_s": len(order) / seconds, **report})
        logger.info(f"gate epoch {epoch:3d}  train bt {train_loss:.4f}  val bt {report[criterion]:.4f}  "
                    f"acc {report['accuracy']:.4f}  w std {sum(report['weights_std'].values()) / heads.k:.3f}  "
                    f"{seconds:.1f}s{'  *' if better.any() else ''}")
        if stopper.done:
            break
    stopper.restore()
    return history, stopper.best_epoch.tolist()


def fit_gate_kind(kind: str, value: Heads, pairs: GatePairs, train: torch.Tensor, val: HeldPairs,
                  cfg) -> tuple[Heads, list[dict], list[int]]:
    """A gate of ``kind`` (``GATE_KINDS``) on ``value``, fitted on the ``train`` pairs of ``pairs`` (``val``: the
    early stopping of the trained kinds); returns (heads, history, best epoch)."""
    out, margin = pairs.outputs, pairs.margin
    device = out.mu_chosen.device
    if kind not in GATE_KINDS:
        raise UserError(f"unknown gate {kind!r}: use one of {', '.join(('auto',) + GATE_KINDS)} (--gate)")
    if kind in ("urm", "softmax"):
        heads = with_gate(value, cfg, kind).to(device)
        return (heads, *train_gate(heads, pairs, train, val, cfg))
    k = value.k
    w = (torch.full((k,), 1.0 / k) if kind == "equal" else
         global_weights(out.mu_chosen[train], out.mu_rejected[train], None if margin is None else margin[train]))
    heads = set_constant_gate(with_gate(value, cfg, "urm"), w.cpu()).to(device)
    if kind != "urm-warm":
        return heads, [], []
    return (heads, *train_gate(heads, pairs, train, val, cfg, count_start=True))
