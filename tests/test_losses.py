"""The stage-1/2 losses and the evaluation metrics, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import metrics as M
from pipeline.train import losses

NAN = math.nan


def test_reparam_expectation_is_mse_plus_variance():
    # docs/method.md 2: E[(mu + eps sigma - y)^2] = (mu - y)^2 + sigma^2, so reparam pushes sigma to 0.
    mu, log_sigma, y = torch.tensor([[0.5, -1.0]]), torch.tensor([[math.log(0.7), math.log(2.0)]]), torch.tensor([[1.5, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([losses.reparam_loss(mu.expand(4000, 2), log_sigma.expand(4000, 2), y.expand(4000, 2), g)
                         for _ in range(25)])
    exact = ((1.0 + 0.49) + (1.0 + 4.0)) / 2  # per cell (mu - y)^2 + sigma^2, averaged
    assert losses.reparam_expected_loss(mu, log_sigma, y).item() == pytest.approx(exact, rel=1e-6)
    assert draws.mean().item() == pytest.approx(exact, rel=0.01)  # 100k draws per cell


def test_nll_and_beta_nll_values():
    mu, log_sigma, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]]), torch.tensor([[3.0, 1.0]])
    cells = [(3 - 1) ** 2 / 2 + 0.0, 1 / (2 * 4) + math.log(2.0)]
    assert losses.nll_loss(mu, log_sigma, y).item() == pytest.approx(sum(cells) / 2, rel=1e-6)
    weighted = [cells[0] * 1.0, cells[1] * 2.0 ** (2 * 0.5)]  # sigma^(2 beta), beta = 0.5
    assert losses.beta_nll_loss(mu, log_sigma, y, beta=0.5).item() == pytest.approx(sum(weighted) / 2, rel=1e-6)
    assert losses.beta_nll_loss(mu, log_sigma, y, beta=0.0).item() == pytest.approx(sum(cells) / 2, rel=1e-6)


def test_beta_nll_weight_is_stop_gradient():
    mu, y = torch.zeros(1, 1), torch.ones(1, 1)
    log_sigma = torch.tensor([[0.3]], requires_grad=True)
    losses.beta_nll_loss(mu, log_sigma, y, beta=1.0).backward()
    sigma2 = math.exp(0.6)
    assert log_sigma.grad.item() == pytest.approx(sigma2 * (-1 / sigma2 + 1), rel=1e-5)  # weight * d nll


@pytest.mark.parametrize("name", losses.GRADIENT_LOSSES)
def test_missing_labels_are_masked(name):
    mu = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    log_sigma = torch.zeros(1, 3, requires_grad=True)
    y = torch.tensor([[0.0, NAN, 3.0]])
    g = torch.Generator().manual_seed(0)
    loss = losses.stage1_loss(name, mu, log_sigma, y, generator=g)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(mu.grad).all() and torch.isfinite(log_sigma.grad).all()
    assert mu.grad[0, 1] == 0 and log_sigma.grad[0, 1] == 0  # the unlabelled cell gets no gradient
    if name == "nll":
        assert loss.item() == pytest.approx((0.5 * 1.0 + 0.0) / 2)  # mean over the 2 labelled cells only


def test_ensemble_shapes_give_one_loss_per_member():
    mu, log_sigma = torch.zeros(3, 4, 2), torch.zeros(3, 4, 2)
    y = torch.ones(3, 4, 2)
    y[1, :, 1] = NAN
    out = losses.nll_loss(mu, log_sigma, y)
    assert out.shape == (3,) and torch.allclose(out, torch.full((3,), 0.5))


def test_bt_loss_values():
    s_c, s_r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = [-math.log(1 / (1 + math.exp(-d))) for d in (2.0, 0.0, -2.0)]
    assert losses.bt_loss(s_c, s_r).item() == pytest.approx(sum(expected) / 3, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Metrics


def test_mse_pearson_nll_mask_missing_labels():
    mu = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 5.0], [4.0, 2.0]])
    y = torch.tensor([[1.5, NAN], [2.0, 2.0], [2.5, 4.0], [5.0, 3.0]])
    assert M.mse(mu, y).tolist() == pytest.approx([(0.25 + 0 + 0.25 + 1) / 4, (1 + 1 + 1) / 3])
    # Pearson by hand on attribute 1's labelled rows: mu (1, 5, 2), y (2, 4, 3)
    a, b = [1.0, 5.0, 2.0], [2.0, 4.0, 3.0]
    ma, mb = sum(a) / 3, sum(b) / 3
    r = sum((p - ma) * (q - mb) for p, q in zip(a, b)) / math.sqrt(
        sum((p - ma) ** 2 for p in a) * sum((q - mb) ** 2 for q in b))
    assert M.pearson(mu, y)[1].item() == pytest.approx(r, rel=1e-6)
    log_sigma = torch.full_like(mu, math.log(2.0))
    expected = math.log(2.0) + 3 / 3 / (2 * 4) + 0.5 * math.log(2 * math.pi)
    assert M.gaussian_nll(mu, log_sigma, y)[1].item() == pytest.approx(expected, rel=1e-6)


def test_coverage_of_central_intervals():
    mu, sigma = torch.zeros(4, 1), torch.ones(4, 1)
    y = torch.tensor([[0.5], [0.7], [1.0], [2.0]])  # z50 = 0.674, z90 = 1.645
    assert M.coverage(mu, sigma, y, 0.5).item() == pytest.approx(0.25)
    assert M.coverage(mu, sigma, y, 0.9).item() == pytest.approx(0.75)
    big = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0))
    assert M.coverage(torch.zeros_like(big), torch.ones_like(big), big, 0.9).item() == pytest.approx(0.9, abs=0.005)


def test_pairwise_accuracy_brier_ece():
    s_c, s_r = torch.tensor([1.0, 2.0, 0.0, 3.0]), torch.tensor([0.0, 3.0, 0.0, 1.0])
    assert M.pairwise_accuracy(s_c, s_r) == 0.5  # the tie counts as wrong
    p = torch.tensor([0.9, 0.9, 0.6, 0.2])
    assert M.brier(p) == pytest.approx((0.01 + 0.01 + 0.16 + 0.64) / 4)
    # Both orders: predictions 0.9, 0.9, 0.6, 0.2 (outcome 1) and 0.1, 0.1, 0.4, 0.8 (outcome 0).
    # 20 bins: {0.9, 0.9} -> |0.9 - 1| * 2; {0.6} -> 0.4; {0.2} -> 0.8; {0.1, 0.1} -> 0.2; {0.4} -> 0.4; {0.8} -> 0.8
    assert M.ece(p) == pytest.approx((0.2 + 0.4 + 0.8 + 0.2 + 0.4 + 0.8) / 8)
    assert M.ece(torch.full((10,), 1.0)) == pytest.approx(0.0)  # certain and right


def test_regression_report_names_each_attribute():
    mu, log_sigma, y = torch.zeros(5, 2), torch.zeros(5, 2), torch.ones(5, 2)
    report = M.regression_report(mu, log_sigma, y, ["a", "b"])
    assert report["mse"] == pytest.approx(1.0) and report["mean_sigma"] == pytest.approx(1.0)
    assert set(report["per_attribute"]) == {"a", "b"}


def test_margin_aware_bt_loss_by_hand():
    """TRL's margin-aware form: -log sigmoid(s_c - s_r - margin); margin 0 is the plain BT loss."""
    s_c, s_r, margin = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0]), torch.tensor([1.5, -0.5])
    by_hand = (math.log1p(math.exp(-(1.0 - 1.5))) + math.log1p(math.exp(-(-0.5 + 0.5)))) / 2
    assert losses.bt_loss(s_c, s_r, margin).item() == pytest.approx(by_hand, rel=1e-6)
    assert losses.bt_loss(s_c, s_r, torch.zeros(2)).item() == pytest.approx(losses.bt_loss(s_c, s_r).item())
    assert losses.bt_loss(s_c, s_r, margin).item() > losses.bt_loss(s_c, s_r).item()  # a wider gap is asked
