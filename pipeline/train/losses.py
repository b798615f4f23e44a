"""Training losses: stage-1 attribute regression (docs/method.md 2) and the stage-2 Bradley-Terry loss (3).

Regression losses take mu, log_sigma, y of shape [..., B, K] (y NaN where a rating is missing) and
average over the labelled cells of the last two axes: a scalar for [B, K], one value per member
for an ensemble's [M, B, K]. Working in log sigma keeps the NLL finite for any parameter value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRADIENT_LOSSES = ("reparam", "nll", "beta-nll")  # the losses AdamW trains stage 1 with
STAGE1_LOSSES = ("ridge", *GRADIENT_LOSSES)  # `--loss` (pipeline.configs.train); ridge: closed form


def masked_mean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean of x over the cells where y is labelled (not NaN), over the last two axes."""
    mask = ~torch.isnan(y)
    total = torch.where(mask, x, torch.zeros_like(x)).sum((-2, -1))
    return total / mask.sum((-2, -1)).clamp(min=1)


def _filled(y: torch.Tensor) -> torch.Tensor:
    """y with NaN replaced by 0, so masked cells carry no NaN into the gradients."""
    return torch.nan_to_num(y, nan=0.0)


def reparam_loss(mu, log_sigma, y, generator: torch.Generator | None) -> torch.Tensor:
    """The seed's loss: r = mu + eps * sigma, eps ~ N(0, 1), minimise (r - y)^2.

    Its expectation is (mu - y)^2 + sigma^2 (see ``reparam_expected_loss``): it drives sigma to 0.
    """
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    r = mu + eps * log_sigma.exp()
    return masked_mean((r - _filled(y)).square(), y)


def reparam_expected_loss(mu, log_sigma, y) -> torch.Tensor:
    """E_eps[reparam_loss] = (mu - y)^2 + sigma^2, in closed form (the validation criterion)."""
    return masked_mean((mu - _filled(y)).square() + (2 * log_sigma).exp(), y)


def nll_loss(mu, log_sigma, y) -> torch.Tensor:
    """Gaussian negative log-likelihood without its constant: (y - mu)^2 / (2 sigma^2) + log sigma."""
    return masked_mean(_nll_cells(mu, log_sigma, y), y)


def beta_nll_loss(mu, log_sigma, y, beta: float = 0.5) -> torch.Tensor:
    """beta-NLL (Seitzer et al. 2022): NLL per cell weighted by stop-grad sigma^(2 beta)."""
    weight = (2 * beta * log_sigma).exp().detach()
    return masked_mean(weight * _nll_cells(mu, log_sigma, y), y)


def _nll_cells(mu, log_sigma, y) -> torch.Tensor:
    return 0.5 * (_filled(y) - mu).square() * (-2 * log_sigma).exp() + log_sigma


def stage1_loss(name: str, mu, log_sigma, y, *, beta: float = 0.5,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The stage-1 training loss called ``name`` (one of STAGE1_LOSSES)."""
    if name == "reparam":
        return reparam_loss(mu, log_sigma, y, generator)
    if name == "nll":
        return nll_loss(mu, log_sigma, y)
    if name == "beta-nll":
        return beta_nll_loss(mu, log_sigma, y, beta)
    if name == "ridge":
        raise ValueError("ridge is solved in closed form (pipeline.train.closed_form), not trained with a loss")
    raise ValueError(f"unknown stage-1 loss {name!r}: use one of {STAGE1_LOSSES}")


def stage1_criterion(name: str, mu, log_sigma, y) -> torch.Tensor:
    """What early stopping watches: reparam's expected loss, or the NLL (nll and beta-nll)."""
    return reparam_expected_loss(mu, log_sigma, y) if name == "reparam" else nll_loss(mu, log_sigma, y)


def bt_loss(s_chosen: torch.Tensor, s_rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry loss: mean over pairs of -log sigmoid(s_chosen - s_rejected), or with ``margin``
    TRL's margin-aware form -log sigmoid(s_chosen - s_rejected - margin) (docs/method.md 3)."""
    diff = s_chosen - s_rejected
    return -F.logsigmoid(diff if margin is None else diff - margin).mean()
