"""Evaluation metrics as pure tensor functions (METHOD.md 6): regression, intervals, pairs, calibration.

Per-attribute metrics take [N, K] tensors with labels NaN where missing and return [K] tensors
(NaN for an attribute with no label); pairwise metrics take [N] scores or probabilities.
"""

from __future__ import annotations

import math

import torch


def _mask(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask, y with NaN -> 0, labelled count per attribute)."""
    mask = ~torch.isnan(y)
    return mask, torch.nan_to_num(y, nan=0.0), mask.sum(0)


def _mean_over_labelled(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mask, _, n = _mask(y)
    return torch.where(mask, x, torch.zeros_like(x)).sum(0) / n


def mse(mu: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per attribute [K]."""
    return _mean_over_labelled((mu - torch.nan_to_num(y)).square(), y)


def pearson(mu: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per attribute [K], over each attribute's labelled rows."""
    mask, y0, n = _mask(y)
    mu0 = torch.where(mask, mu, torch.zeros_like(mu))
    dm = torch.where(mask, mu0 - mu0.sum(0) / n, torch.zeros_like(mu))
    dy = torch.where(mask, y0 - y0.sum(0) / n, torch.zeros_like(y0))
    return (dm * dy).sum(0) / ((dm.square().sum(0) * dy.square().sum(0)).sqrt())


def gaussian_nll(mu: torch.Tensor, log_sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Full Gaussian NLL per attribute [K]: log sigma + (y - mu)^2 / (2 sigma^2) + log(2 pi) / 2."""
    cells = log_sigma + 0.5 * (torch.nan_to_num(y) - mu).square() * (-2 * log_sigma).exp()
    return _mean_over_labelled(cells, y) + 0.5 * math.log(2 * math.pi)


def mean_sigma(log_sigma: torch.Tensor) -> torch.Tensor:
    """Mean predicted sigma per attribute [K], over all rows."""
    return log_sigma.exp().mean(0)


def coverage(mu: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, level: float) -> torch.Tensor:
    """Share of labels inside the central ``level`` Gaussian interval mu +- z sigma, per attribute [K]."""
    z = torch.special.ndtri(torch.tensor(0.5 + level / 2, dtype=mu.dtype))
    inside = ((torch.nan_to_num(y) - mu).abs() <= z * sigma).to(mu.dtype)
    return _mean_over_labelled(inside, y)


def pairwise_accuracy(s_chosen: torch.Tensor, s_rejected: torch.Tensor) -> float:
    """Share of pairs with s_chosen > s_rejected (a tie counts as wrong, as in RewardBench)."""
    return (s_chosen > s_rejected).double().mean().item()


def brier(p_chosen: torch.Tensor) -> float:
    """Brier score of P(chosen > rejected): mean (1 - p)^2 (the chosen side always won)."""
    return (1 - p_chosen.double()).square().mean().item()


def ece(p_chosen: torch.Tensor, n_bins: int = 20) -> float:
    """Expected calibration error of P(chosen > rejected), order-invariant.

    Every pair is counted in both orders: prediction p with outcome 1 and 1 - p with outcome 0
    (otherwise the outcome is always 1 and ECE degenerates to 1 - mean p). Equal-width bins on
    [0, 1]; ECE = sum_b (n_b / N) |mean prediction_b - mean outcome_b|.
    """
    p = p_chosen.double().flatten()
    q = torch.cat([p, 1 - p])
    outcome = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    bins = (q * n_bins).long().clamp(max=n_bins - 1)
    n = torch.bincount(bins, minlength=n_bins)
    gap = torch.bincount(bins, q - outcome, minlength=n_bins).abs()  # n_b * |mean q_b - mean o_b|
    return (gap.sum() / n.sum()).item()


def regression_report(mu, log_sigma, y, names) -> dict:
    """Stage-1 validation metrics, overall (mean over attributes) and per attribute name."""
    sigma = log_sigma.exp()
    per = {"mse": mse(mu, y), "pearson": pearson(mu, y), "nll": gaussian_nll(mu, log_sigma, y),
           "mean_sigma": mean_sigma(log_sigma), "coverage50": coverage(mu, sigma, y, 0.5),
           "coverage90": coverage(mu, sigma, y, 0.9)}
    report = {key: value.nanmean().item() for key, value in per.items()}
    report["per_attribute"] = {name: {key: value[i].item() for key, value in per.items()}
                               for i, name in enumerate(names)}
    return report
