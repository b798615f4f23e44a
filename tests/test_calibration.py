"""Calibration on held-out data (pipeline.train.calibration, docs/method.md 2): sigma refit with the means frozen, and
the temperatures of pair probabilities, on data whose right answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.model import Heads
from pipeline.train import calibrate_heads, common_direction, fit_scale_offset, fit_temperature, pair_nll


def test_scale_and_offset_recover_a_known_log_sigma():
    """Labels drawn with log sigma = 0.5 * s(h) + 0.3: the fit finds a = 0.5, b = 0.3 (constant feature 1)."""
    g = torch.Generator().manual_seed(0)
    n = 20_000
    s = torch.randn(1, n, 2, generator=g)  # the log-sigma the head states
    mu = torch.randn(1, n, 2, generator=g)
    y = mu[0] + torch.randn(n, 2, generator=g) * torch.exp(0.5 * s[0] + 0.3)
    y[::7, 1] = float("nan")  # missing labels are left out
    a, b = fit_scale_offset(mu, s, torch.ones(n), y)
    assert a[0].tolist() == pytest.approx([0.5, 0.5], abs=0.03)
    assert b[0].tolist() == pytest.approx([0.3, 0.3], abs=0.03)


def test_calibrated_heads_keep_their_means_and_the_layout():
    torch.manual_seed(0)
    d, k, n = 16, 5, 4000
    x = torch.randn(n, d)
    x[:, 0] += 8.0  # a common direction, as in real hidden states
    heads = Heads(d, k, members=3)
    with torch.no_grad():
        heads.score.weight.normal_(0, 0.3)
        heads.ensemble.weight.normal_(0, 0.3)
    mu = heads(x)["attribute_means"].detach()
    y = mu + 0.7 * torch.randn(n, k)  # every attribute's error has std 0.7 around the score head's means
    before = {name: p.detach().clone() for name, p in heads.state_dict().items()}
    calibrate_heads(heads, x, y)
    after = heads.state_dict()
    assert set(after) == set(before) and heads.score.bias is None  # no bias added: the published layout
    for name in ("score.weight", "ensemble.weight"):
        assert torch.equal(after[name][..., 0::2, :], before[name][..., 0::2, :])  # means untouched
        assert not torch.equal(after[name][..., 1::2, :], before[name][..., 1::2, :])
    sigma = heads(x)["attribute_stds"]
    assert sigma.mean().item() == pytest.approx(0.7, rel=0.05)
    assert (common_direction(x) @ x.T).mean().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("kind", ["bt", "gaussian"])
def test_temperature_recovers_the_one_that_made_the_outcomes(kind):
    """Pairs whose winner was drawn with P = sigmoid(d / 3) (or Phi(d / 3)): the fitted T is 3."""
    g = torch.Generator().manual_seed(1)
    d = torch.randn(40_000, generator=g, dtype=torch.float64) * 4
    p = torch.sigmoid(d / 3) if kind == "bt" else torch.special.ndtr(d / 3)
    won = torch.rand(len(d), generator=g, dtype=torch.float64) < p
    z = torch.where(won, d, -d)  # from the side that was chosen
    t = fit_temperature(z, kind)
    assert t == pytest.approx(3.0, rel=0.05)
    assert pair_nll(z, t, kind) <= min(pair_nll(z, 2.5, kind), pair_nll(z, 3.5, kind))


def test_temperature_stays_in_its_range_when_every_pair_is_right():
    z = torch.linspace(0.1, 5, 100)
    assert fit_temperature(z, "bt") == pytest.approx(0.01, rel=1e-3)  # the bound, not 0
    with pytest.raises(ValueError, match="kind must be"):
        fit_temperature(z, "platt")
    assert math.isfinite(pair_nll(z, 0.01, "gaussian"))
