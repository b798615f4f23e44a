"""The evaluation metrics (pipeline.metrics, docs/method.md 6) against scikit-learn, SciPy and hand-computed
values, with the edge cases: every pair right, ties, a constant uncertainty, one subset only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, mean_squared_error, roc_auc_score

from pipeline import metrics as M

RNG = np.random.default_rng(0)


def regression_data(n=300, k=3):
    mu = torch.tensor(RNG.normal(size=(n, k)))
    y = (mu + torch.tensor(RNG.normal(size=(n, k)))).round().clamp(0, 4)  # integer labels: many ties
    y[RNG.random((n, k)) < 0.2] = float("nan")
    return mu, y


def test_regression_metrics_equal_scikit_learn_and_scipy_per_attribute():
    mu, y = regression_data()
    log_sigma = torch.tensor(RNG.normal(size=mu.shape)) * 0.3
    for k in range(y.shape[1]):
        rows = ~torch.isnan(y[:, k])
        a, b = mu[rows, k].numpy(), y[rows, k].numpy()
        assert M.mse(mu, y)[k].item() == pytest.approx(mean_squared_error(b, a))
        assert M.pearson(mu, y)[k].item() == pytest.approx(pearsonr(a, b).statistic)
        assert M.spearman(mu, y)[k].item() == pytest.approx(spearmanr(a, b).statistic)
        nll = torch.nn.GaussianNLLLoss(full=True)(mu[rows, k], y[rows, k], log_sigma[rows, k].exp().square())
        assert M.gaussian_nll(mu, log_sigma, y)[k].item() == pytest.approx(nll.item())


def test_rank_correlation_of_a_constant_is_nan_not_an_error():
    mu, y = torch.ones(10, 1), torch.arange(10.0)[:, None]
    assert math.isnan(M.spearman(mu, y)[0].item())


def test_ece_and_brier_equal_scikit_learns_calibration_curve_over_both_orders():
    p = torch.tensor(RNG.random(500))
    p[:20] = 0.5  # on a bin edge
    p[20:40] = 0.95
    q, outcome = np.concatenate([p.numpy(), 1 - p.numpy()]), np.r_[np.ones(500), np.zeros(500)]
    true, pred = calibration_curve(outcome, q, n_bins=20, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 21)[1:-1], q), minlength=20)
    by_hand = np.sum(counts[counts > 0] / len(q) * np.abs(true - pred))
    assert M.ece(p) == pytest.approx(by_hand)
    assert M.brier(p) == pytest.approx(brier_score_loss(np.ones(500), p.numpy()))
    assert M.brier(p) == pytest.approx(brier_score_loss(outcome, q))  # the same over both orders
    # the reliability diagram plots scikit-learn's curve, and its points weighted by their counts give the ECE
    from pipeline.eval import reliability_points

    predicted, observed, n = reliability_points(p.numpy())
    np.testing.assert_allclose(predicted, pred)
    np.testing.assert_allclose(observed, true)
    assert np.sum(n / n.sum() * np.abs(predicted - observed)) == pytest.approx(M.ece(p))


def test_auroc_equals_scikit_learn_and_is_nan_when_every_pair_is_right():
    wrong = torch.tensor(RNG.random(200) < 0.3)
    signal = torch.tensor(RNG.normal(size=200)) + wrong.double()
    assert M.auroc(signal, wrong) == pytest.approx(roc_auc_score(wrong.numpy(), signal.numpy()))
    assert math.isnan(M.auroc(signal, torch.zeros(200, dtype=torch.bool)))  # all right: undefined
    assert M.auroc(torch.ones(200), wrong) == pytest.approx(0.5)  # a constant signal knows nothing


def test_accuracy_at_coverage_and_aurc_by_hand():
    correct = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    u = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    # most certain first: 1, 1, 0, 1, 0, 1 -> risks 0, 0, 1/3, 1/4, 2/5, 2/6
    assert M.risk_curve(correct, u).tolist() == pytest.approx([0, 0, 1 / 3, 1 / 4, 2 / 5, 2 / 6])
    assert M.accuracy_at_coverage(correct, u, 0.5) == pytest.approx(2 / 3)
    assert M.accuracy_at_coverage(correct, u, 1.0) == pytest.approx(4 / 6)
    assert M.aurc(correct, u) == pytest.approx((0 + 0 + 1 / 3 + 1 / 4 + 2 / 5 + 2 / 6) / 6)
    # every wrong pair the least certain: the lowest AURC for this accuracy
    assert M.aurc(correct, (~correct).double()) < M.aurc(correct, u)


def test_ties_in_the_signal_count_at_the_groups_rate():
    correct = torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    flat = torch.zeros(4)  # a constant uncertainty: every coverage has the overall accuracy
    assert M.accuracy_at_coverage(correct, flat, 0.5) == pytest.approx(0.75)
    assert M.risk_curve(correct, flat).tolist() == pytest.approx([0.25] * 4)
    assert M.risk_curve(correct, flat.flip(0)).tolist() == M.risk_curve(correct, flat).tolist()  # no order effect
    tied = torch.tensor([0.0, 1.0, 1.0, 2.0])  # the middle two tie: 1 and 0 -> rate 1/2 each
    assert M.risk_curve(correct, tied).tolist() == pytest.approx([0, 0.25, 1 / 3, 0.25])


def test_all_right_pairs():
    correct = torch.ones(5, dtype=torch.bool)
    assert M.accuracy_at_coverage(correct, torch.arange(5.0), 0.5) == 1.0 and M.aurc(correct, torch.arange(5.0)) == 0.0
    assert M.pairwise_accuracy(torch.ones(5), torch.zeros(5)) == 1.0


def test_subsets_and_rewardbench_sections():
    s_c, s_r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    subsets = ["math-prm", "math-prm", "hep-cpp", "alpacaeval-easy", None]
    per = M.subset_accuracy(s_c, s_r, subsets)
    assert per == {"alpacaeval-easy": 1.0, "hep-cpp": 1.0, "math-prm": 0.5}  # the tie (row 5) is wrong, and unnamed
    sections = {"Chat": ["alpacaeval-easy", "mt-bench-easy"], "Reasoning": ["math-prm", "hep-cpp"], "Safety": ["xs"]}
    counts = {"alpacaeval-easy": 100, "mt-bench-easy": 28, "math-prm": 984, "hep-cpp": 164, "xs": 1}
    got = M.section_scores(per, sections, counts)
    assert got == {"Chat": 1.0, "Reasoning": pytest.approx((0.5 * 984 + 1.0 * 164) / (984 + 164))}
    assert M.subset_accuracy(s_c[:2], s_r[:2], ["only", "only"]) == {"only": 0.5}  # one subset only


def test_ece_if_calibrated_is_the_noise_floor_of_a_calibrated_model():
    """Outcomes drawn from P itself: the observed ECE scatters around ece_if_calibrated, which shrinks
    as the number of pairs grows; a confident wrong model sits far above it."""
    g = torch.Generator().manual_seed(3)
    for n in (100, 3000):
        p = torch.rand(n, generator=g, dtype=torch.float64)
        floor = M.ece_if_calibrated(p)
        observed = [M.ece(torch.where(torch.rand(n, generator=g, dtype=torch.float64) < p, p, 1 - p)) for _ in range(50)]
        assert np.mean(observed) == pytest.approx(floor, rel=0.15)
    assert M.ece_if_calibrated(torch.rand(3000, generator=g, dtype=torch.float64)) < 0.3 * M.ece_if_calibrated(
        torch.rand(100, generator=g, dtype=torch.float64))
    assert M.ece(torch.full((500,), 0.02, dtype=torch.float64)) > 10 * M.ece_if_calibrated(torch.full((500,), 0.02))


def test_the_sign_test_is_the_binomial_tail_summed_by_hand():
    for wins, n in ((0, 0), (3, 3), (8, 10), (5, 10), (0, 7), (61, 100)):
        by_hand = sum(math.comb(n, i) for i in range(wins, n + 1)) / 2 ** n if n else 1.0
        assert M.sign_test_p(wins, n) == pytest.approx(by_hand, rel=1e-9)
