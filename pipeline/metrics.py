"""Evaluation metrics as pure functions (docs/method.md 6): regression, intervals, pairs, calibration, and
whether an uncertainty signal predicts errors.

Per-attribute metrics take [N, K] tensors with labels NaN where missing and return [K] tensors
(NaN for an attribute with no label); pairwise metrics take [N] scores, probabilities or signals.
Where scikit-learn or SciPy has the metric (ROC AUC, rank correlation) it is used; the others are
tested against them (tests/test_metrics.py). "Uncertainty" is any signal where larger means less
sure; pairs tied on it are ranked as a tie (an expected value over the orders), never by index.
"""

from __future__ import annotations

import math

import numpy as np
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


def spearman(mu: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per attribute [K] over each attribute's labelled rows (ties: average ranks)."""
    from scipy.stats import spearmanr

    out = []
    for k in range(y.shape[1]):
        rows = ~torch.isnan(y[:, k])
        a, b = mu[rows, k].double().cpu().numpy(), y[rows, k].double().cpu().numpy()
        ok = rows.sum() > 1 and np.ptp(a) > 0 and np.ptp(b) > 0
        out.append(float(spearmanr(a, b).statistic) if ok else math.nan)
    return torch.tensor(out, dtype=mu.dtype)


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


def sign_test_p(wins: int, n: int) -> float:
    """One-sided exact sign test: P(X >= wins) for X ~ Binomial(n, 1/2), the chance that a coin does as well on
    ``n`` untied pairs as a model that got ``wins`` of them right (1.0 for n = 0).

    >>> round(sign_test_p(8, 10), 4), sign_test_p(0, 0)
    (0.0547, 1.0)
    """
    from scipy.stats import binom

    return float(binom.sf(wins - 1, n, 0.5)) if n else 1.0


def brier(p_chosen: torch.Tensor) -> float:
    """Brier score of P(chosen > rejected): mean (1 - p)^2 (the chosen side always won)."""
    return (1 - p_chosen.double()).square().mean().item()


def ece(p_chosen: torch.Tensor, n_bins: int = 20) -> float:
    """Expected calibration error of P(chosen > rejected), order-invariant.

    Every pair is counted in both orders: prediction p with outcome 1 and 1 - p with outcome 0
    (otherwise the outcome is always 1 and ECE degenerates to 1 - mean p). Equal-width bins on
    [0, 1], bin edges as scikit-learn's ``calibration_curve`` sets them (a value on an edge goes to
    the lower bin); ECE = sum_b (n_b / N) |mean prediction_b - mean outcome_b|.
    """
    q, outcome, bins = reliability_bins(p_chosen, n_bins)
    n = torch.bincount(bins, minlength=n_bins)
    gap = torch.bincount(bins, q - outcome, minlength=n_bins).abs()  # n_b * |mean q_b - mean o_b|
    return (gap.sum() / n.sum()).item()


def reliability_bins(p_chosen: torch.Tensor, n_bins: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every pair in both orders, binned as ``ece`` bins them: predictions q = (p, 1 - p), outcomes (1, 0),
    and each one's bin among ``n_bins`` equal-width bins on [0, 1] (a value on an edge goes to the lower
    bin); the reliability diagram plots the bins' mean q against their mean outcome."""
    p = p_chosen.double().flatten()
    q = torch.cat([p, 1 - p])
    outcome = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    inner_edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1]
    return q, outcome, torch.bucketize(q, inner_edges)  # like numpy.searchsorted(inner_edges, q, side="left")


def ece_if_calibrated(p_chosen: torch.Tensor, n_bins: int = 20, draws: int = 200, seed: int = 0) -> float:
    """The ECE that these predictions would still show were they perfectly calibrated: each pair's
    outcome drawn from its own P, averaged over ``draws`` seeded draws. On a few hundred pairs ECE
    has a noise floor; an observed ECE near this one is within sampling noise."""
    p = p_chosen.double().flatten().cpu()
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        chosen_won = torch.rand(len(p), generator=g, dtype=torch.float64) < p
        total += ece(torch.where(chosen_won, p, 1 - p), n_bins)  # P of the side that won
    return total / draws


def auroc(uncertainty: torch.Tensor, wrong: torch.Tensor) -> float:
    """How well an uncertainty signal tells wrong pairs from right ones: ROC AUC (scikit-learn), 0.5 = no
    better than chance; NaN when every pair is right (or every pair wrong)."""
    from sklearn.metrics import roc_auc_score

    wrong = wrong.bool().cpu().numpy()
    if wrong.all() or not wrong.any():
        return math.nan
    return float(roc_auc_score(wrong, uncertainty.double().cpu().numpy()))


def risk_curve(correct: torch.Tensor, uncertainty: torch.Tensor) -> np.ndarray:
    """Expected error rate among the k most certain pairs, for k = 1..N (risk at coverage k / N).

    Sorted by uncertainty, lowest first; within a group of equal uncertainty, each pair is counted at
    the group's error rate (the expected value over the group's orders).
    """
    u = uncertainty.double().cpu().numpy()
    wrong = 1.0 - correct.double().cpu().numpy()
    order = np.argsort(u, kind="stable")
    u, wrong = u[order], wrong[order]
    _, start, count = np.unique(u, return_index=True, return_counts=True)
    group_rate = np.add.reduceat(wrong, start) / count if len(u) else np.empty(0)
    expected = np.repeat(group_rate, count)  # each pair at its group's rate
    return np.cumsum(expected) / np.arange(1, len(u) + 1)


def accuracy_at_coverage(correct: torch.Tensor, uncertainty: torch.Tensor, coverage: float) -> float:
    """Accuracy over the ``coverage`` share of pairs with the lowest uncertainty (at least one pair)."""
    risk = risk_curve(correct, uncertainty)
    if not len(risk):
        return math.nan
    k = max(1, int(round(coverage * len(risk))))
    return float(1.0 - risk[k - 1])


def aurc(correct: torch.Tensor, uncertainty: torch.Tensor) -> float:
    """Area under the risk-coverage curve: the mean of the risk over coverages 1/N..1 (lower is better;
    a signal that ranks every wrong pair last reaches the minimum for the accuracy)."""
    risk = risk_curve(correct, uncertainty)
    return float(risk.mean()) if len(risk) else math.nan


def subset_accuracy(s_chosen: torch.Tensor, s_rejected: torch.Tensor, subsets) -> dict[str, float]:
    """Pairwise accuracy per subset name (pairs without one are left out), sorted by name."""
    right = (s_chosen > s_rejected).cpu().numpy()
    names = np.asarray([str(x) if x is not None else "" for x in subsets], dtype=object)
    return {name: float(right[names == name].mean()) for name in sorted(set(names) - {""})}


def section_scores(per_subset: dict[str, float], sections: dict[str, list[str]],
                   counts: dict[str, int]) -> dict[str, float]:
    """RewardBench's section scores: each section the example-count-weighted mean of its subsets'
    accuracies (``rewardbench.utils.calculate_scores_per_section``), over the subsets present; the
    sections none of whose subsets are present are left out."""
    out = {}
    for section, names in sections.items():
        present = [n for n in names if n in per_subset]
        if present:
            out[section] = sum(per_subset[n] * counts[n] for n in present) / sum(counts[n] for n in present)
    return out


def regression_report(mu, log_sigma, y, names) -> dict:
    """Stage-1 validation metrics, overall (mean over attributes) and per attribute name."""
    sigma = log_sigma.exp()
    per = {"mse": mse(mu, y), "pearson": pearson(mu, y), "spearman": spearman(mu, y),
           "nll": gaussian_nll(mu, log_sigma, y),
           "mean_sigma": mean_sigma(log_sigma), "coverage50": coverage(mu, sigma, y, 0.5),
           "coverage90": coverage(mu, sigma, y, 0.9)}
    report = {key: value.nanmean().item() for key, value in per.items()}
    report["per_attribute"] = {name: {key: value[i].item() for key, value in per.items()}
                               for i, name in enumerate(names)}
    return report
