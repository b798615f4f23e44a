"""Calibration on held-out data: the value head's sigma, and a temperature for pair probabilities.

A stated uncertainty is useful only if it is the size of the error (docs/method.md 2):

- **sigma.** With the mean rows of a value head frozen, each attribute's log-sigma row is fitted
  again by Gaussian NLL on a calibration split that the means never saw (recalibration in the
  sense of Kuleshov et al. 2018, Laves et al. 2020), within a two-parameter family per attribute:
      log sigma_k(h) <- a_k * log sigma_k(h) + b_k * c(h)
  where log sigma_k(h) is the row as trained and c(h) is a constant: 1 through the bias when the
  head has one, else u.h with u = mean(h) / |mean(h)|^2 (the hidden states' common direction, u.h =
  1 +- 0.03 on SmolLM2's). b_k gives sigma the size of the held-out error, a_k keeps (or drops)
  the spread the training loss learnt across inputs; two numbers per attribute cannot overfit a
  few hundred held-out rows, where refitting all d weights of a row could. The new row, a_k w_k +
  b_k u, keeps the published layout (``score.weight`` [2K, d], no bias); the means, and so the
  ranking of pairs, stay exactly as trained. The seed's ``reparam`` loss drives sigma to 0; this
  gives it back. An ensemble's members are calibrated each against its own means.
- **pairs.** One temperature per probability, fitted by NLL on validation pairs (Guo et al. 2017):
  P_BT = sigmoid((s_c - s_r) / T_bt) and P_Gauss = Phi((s_c - s_r) / (T_gauss sqrt(Var_c + Var_r))).
"""

from __future__ import annotations

import math

import torch
from scipy.optimize import minimize_scalar

from pipeline import metrics as M
from pipeline.model import Heads, split_mean_logstd

EVAL_ROWS = 8192
TEMPERATURE_RANGE = (1e-2, 1e2)  # all-right validation pairs would otherwise drive T to 0


# ----------------------------------------------------------------------------------------------
# sigma


def _apply(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """weight [M, R, d] (+ bias [M, R]) applied to every row of x [n, d] -> [M, n, R], in chunks."""
    parts = []
    for i in range(0, len(x), EVAL_ROWS):
        out = torch.matmul(weight, x[i:i + EVAL_ROWS].float().T).transpose(-1, -2)
        parts.append(out if bias is None else out + bias[:, None, :])
    return torch.cat(parts, dim=1)


def common_direction(x: torch.Tensor) -> torch.Tensor:
    """u = mean(h) / |mean(h)|^2, so that u.h is 1 on average (a constant feature when the head has no bias)."""
    mean = torch.stack([x[i:i + EVAL_ROWS].float().sum(0) for i in range(0, len(x), EVAL_ROWS)]).sum(0) / len(x)
    return mean / mean.dot(mean)


def fit_scale_offset(mu, log_sigma, constant, y) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) [M, K] minimising the Gaussian NLL of y under N(mu, exp(a log_sigma + b constant)^2).

    mu, log_sigma [M, n, K], constant [n], y [n, K] (NaN = missing). Convex; L-BFGS from the best
    constant sigma (a = 0, b = log of the root mean squared error over the mean constant).
    """
    labelled = ~torch.isnan(y)
    resid2 = (torch.nan_to_num(y) - mu).square().double()
    c = constant.double()[None, :, None]
    rms = (torch.where(labelled, resid2, 0).sum(1) / labelled.sum(0).clamp(min=1)).clamp(min=1e-12).sqrt()
    a = torch.zeros_like(rms).requires_grad_(True)
    b = (rms.log() / c.mean()).detach().requires_grad_(True)
    s0 = log_sigma.double()
    opt = torch.optim.LBFGS([a, b], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def nll():
        opt.zero_grad()
        s = a[:, None, :] * s0 + b[:, None, :] * c
        cells = 0.5 * resid2 * torch.exp(-2 * s) + s
        loss = torch.where(labelled, cells, 0).sum() / labelled.sum().clamp(min=1)
        loss.backward()
        return loss

    opt.step(nll)
    return a.detach().float(), b.detach().float()


def refit_log_sigma(weight: torch.Tensor, bias: torch.Tensor | None, x_cal, y_cal) -> dict:
    """Refit the log-sigma rows of a value head weight [M, 2K, d] (bias [M, 2K] or None) in place, means
    frozen; returns the fitted (a, b) per member and attribute."""
    with torch.no_grad():
        mu = _apply(weight[:, 0::2], None if bias is None else bias[:, 0::2], x_cal)
        log_sigma = _apply(weight[:, 1::2], None if bias is None else bias[:, 1::2], x_cal)
        u = None if bias is not None else common_direction(x_cal)
        constant = torch.ones(len(x_cal), device=x_cal.device) if u is None else _apply(u[None, None], None, x_cal)[0, :, 0]
    a, b = fit_scale_offset(mu, log_sigma, constant, y_cal.to(mu.device))
    a, b = a.to(weight.device), b.to(weight.device)
    with torch.no_grad():
        rows, shifted = scale_offset(weight[:, 1::2], None if bias is None else bias[:, 1::2], a, b, u)
        weight[:, 1::2] = rows
        if bias is not None:
            bias[:, 1::2] = shifted
    return {"a": a.tolist(), "b": b.tolist()}


def scale_offset(rows: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                 u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-sigma rows [..., K, d] (and their bias [..., K]) after log sigma <- a log sigma + b c(h), a, b [..., K]:
    with the constant c = u.h the rows become a W + b u (no bias needed); with c = 1 (``u`` None) the rows scale
    and the bias becomes a bias + b."""
    if u is None:
        return a[..., None] * rows, a * bias + b
    return a[..., None] * rows + b[..., None] * u, bias


def interval_metrics(mu: torch.Tensor, log_sigma: torch.Tensor, y: torch.Tensor, names) -> dict:
    """coverage50 / coverage90, NLL and mean sigma of predictions (mu, log sigma) [n, K] against y, overall and per
    attribute: what a stated sigma is judged by."""
    report = M.regression_report(mu, log_sigma, y, names)
    keys = ("coverage50", "coverage90", "nll", "mean_sigma")
    return {**{k: report[k] for k in keys},
            "per_attribute": {a: {k: v[k] for k in keys} for a, v in report["per_attribute"].items()}}


@torch.no_grad()
def sigma_report(heads: Heads, x, y, names) -> dict:
    """The interval metrics of the saved head on (x, y): coverage50 / 90, NLL, mean sigma, per attribute too."""
    mu, log_sigma = split_mean_logstd(torch.cat([heads.score(x[i:i + EVAL_ROWS].float())
                                                 for i in range(0, len(x), EVAL_ROWS)]))
    return interval_metrics(mu, log_sigma, y, names)


def calibrate_heads(heads: Heads, x_cal: torch.Tensor, y_cal: torch.Tensor) -> dict:
    """Refit the log-sigma rows of ``heads`` in place on the calibration split: the score head against its
    own means, and each ensemble member against its own; returns the fitted (a, b)."""
    fitted = {"score": refit_log_sigma(heads.score.weight.data[None],
                                       None if heads.score.bias is None else heads.score.bias.data[None], x_cal, y_cal)}
    if heads.ensemble is not None:
        fitted["ensemble"] = refit_log_sigma(heads.ensemble.weight.data,
                                             None if heads.ensemble.bias is None else heads.ensemble.bias.data,
                                             x_cal, y_cal)
    return fitted


# ----------------------------------------------------------------------------------------------
# pairs


def pair_nll(z: torch.Tensor, temperature: float, kind: str) -> float:
    """Mean -log P(chosen) at this temperature; ``z`` = s_c - s_r (bt) or that over sqrt(Var_c + Var_r)."""
    z = z.double() / temperature
    log_p = torch.nn.functional.logsigmoid(z) if kind == "bt" else torch.special.log_ndtr(z)
    return -log_p.mean().item()


def fit_temperature(z: torch.Tensor, kind: str) -> float:
    """The T in TEMPERATURE_RANGE that minimises the NLL of the chosen side over validation pairs."""
    if kind not in ("bt", "gaussian"):
        raise ValueError(f"kind must be 'bt' or 'gaussian', got {kind!r}")
    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    best = minimize_scalar(lambda log_t: pair_nll(z, math.exp(log_t), kind), bounds=(lo, hi), method="bounded",
                           options={"xatol": 1e-6})
    return float(math.exp(best.x))


def fit_pair_temperatures(d: torch.Tensor, var_sum: torch.Tensor | None = None) -> tuple[float, float]:
    """(T_bt, T_gauss) fitted on validation pairs from d = s_c - s_r and Var_c + Var_r (T_gauss = 1 for a
    model that states no variance)."""
    t_gauss = 1.0 if var_sum is None else fit_temperature(d / var_sum.sqrt(), "gaussian")
    return fit_temperature(d, "bt"), t_gauss
