"""Stage 1 in closed form (docs/method.md 2, 4): ridge from one eigendecomposition against scikit-learn and brute force,
alpha by exact leave-one-out, sigma recovered, bootstrap members that differ where the data is thin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge, RidgeCV

from pipeline import ATTRIBUTES
from pipeline.configs import ValueHeadConfig, build
from pipeline.data.testing import NOISE, linear_ratings
from pipeline.train import fit_value_head
from pipeline.train import ridge as R
from pipeline.train.closed_form import label_groups



def data(n, d, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 3.0  # a large common direction, as hidden states have
    t = x[:, :k] @ torch.randn(k, k, generator=g, dtype=torch.float64) + torch.randn(n, k, generator=g,
                                                                                    dtype=torch.float64)
    return x, t


def chunks(x, t, size=7):
    return lambda: ((x[i:i + size], t[i:i + size], None) for i in range(0, len(x), size))


@pytest.mark.parametrize("n, d", [(40, 12), (15, 30)])  # more rows than features, and fewer
def test_ridge_with_a_bias_is_sklearns_ridge_and_its_leave_one_out(n, d):
    x, t = data(n, d)
    m = R.moments(chunks(x, t)())
    sp = R.spectrum(m, None)  # c = 1: an unpenalised bias, as sklearn's fit_intercept
    alphas = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    loo = R.loo_path(sp, m, chunks(x, t), alphas)
    for a_i, alpha in enumerate(alphas.tolist()):
        rows, bias = R.ridge_rows(sp, m, torch.full((2,), alpha, dtype=torch.float64))
        for k in range(2):
            ref = Ridge(alpha=alpha).fit(x.numpy(), t[:, k].numpy())
            assert np.allclose(rows[k].numpy(), ref.coef_, atol=1e-8) and abs(bias[k].item() - ref.intercept_) < 1e-8
            errors = [(t[i, k].item() - Ridge(alpha=alpha).fit(np.delete(x.numpy(), i, 0), np.delete(t[:, k].numpy(), i))
                       .predict(x[i:i + 1].numpy())[0]) ** 2 for i in range(n)]  # refit without each row
            assert loo[a_i, k].item() == pytest.approx(np.mean(errors), rel=1e-8)


def test_the_alpha_leave_one_out_picks_is_ridgecvs():
    x, t = data(60, 10, k=1, seed=3)
    m = R.moments(chunks(x, t)())
    sp = R.spectrum(m, None)
    grid = torch.logspace(-3, 4, 29, dtype=torch.float64)
    alpha, _, edge = R.pick(R.loo_path(sp, m, chunks(x, t), grid), grid)
    ref = RidgeCV(alphas=grid.numpy()).fit(x.numpy(), t[:, 0].numpy())  # efficient leave-one-out, the same criterion
    assert alpha.item() == pytest.approx(ref.alpha_) and edge == [False]


@pytest.mark.parametrize("n, d", [(40, 12), (15, 30)])
def test_the_common_direction_intercept_folds_exactly_into_a_row_without_bias(n, d):
    """min |t - X w - c b|^2 + alpha |w|^2 with c = X u unpenalised, solved with the augmented normal equations,
    is the row w + b u: the published layout (no bias) with an intercept."""
    x, t = data(n, d, seed=1)
    m = R.moments(chunks(x, t)())
    u = R.common_direction(m)
    assert (x @ u).mean().item() == pytest.approx(1.0)
    sp = R.spectrum(m, u)
    alpha = 2.0
    rows, bias = R.ridge_rows(sp, m, torch.full((2,), alpha, dtype=torch.float64))
    a = torch.cat([x, (x @ u)[:, None]], 1)
    penalty = torch.eye(d + 1, dtype=torch.float64) * alpha
    penalty[-1, -1] = 0
    sol = torch.linalg.solve(a.T @ a + penalty, a.T @ t)
    assert torch.allclose(x @ rows.T, x @ (sol[:d] + u[:, None] * sol[d:]), atol=1e-9) and (bias == 0).all()
    _, lev = R.loo_path(sp, m, chunks(x, t), torch.tensor([alpha], dtype=torch.float64), leverages=True)
    resid = R.loo_residuals_from(t, x @ rows.T + bias, lev[0][:, None])
    i = 3
    keep = torch.arange(n) != i
    sol_i = torch.linalg.solve(a[keep].T @ a[keep] + penalty, a[keep].T @ t[keep])
    assert torch.allclose(resid[i], t[i] - a[i] @ sol_i, atol=1e-9)


def test_gcv_from_the_sums_is_the_hat_matrix_formula():
    x, t = data(30, 8, seed=2)
    m = R.moments(chunks(x, t)())
    sp = R.spectrum(m, None)
    alpha = 3.0
    xc = torch.cat([x, torch.ones(30, 1, dtype=torch.float64)], 1)
    penalty = torch.eye(9, dtype=torch.float64) * alpha
    penalty[-1, -1] = 0
    hat = xc @ torch.linalg.solve(xc.T @ xc + penalty, xc.T)
    expected = 30 * ((t - hat @ t).square().sum(0)) / (30 - hat.trace()) ** 2
    got = R.gcv_path(sp, m, torch.tensor([alpha], dtype=torch.float64))[0]
    assert torch.allclose(got, expected, rtol=1e-9)


def test_label_groups_share_one_fit_per_missing_pattern():
    y = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 4.0, 5.0], [0.0, 1.0, 2.0]])
    groups = label_groups(y)
    assert [cols for cols, _ in groups] == [[0, 1], [2]] and groups[1][1].tolist() == [1, 2]


def test_closed_form_value_head_recovers_sigma_and_beats_the_noise_floor():
    """Known answer (pipeline.data.testing): y = h A + 2 + noise of std NOISE_k, so MSE -> mean NOISE^2 and
    sigma_k -> NOISE_k. The closed form gets both in seconds, with no learning rate or epochs to choose."""
    h, y = linear_ratings(n=2000, d=32)
    fit = fit_value_head(h, y, build(ValueHeadConfig, dict(device="cpu", ensemble=1)))
    assert fit.val["mse"] == pytest.approx(NOISE.square().mean().item(), rel=0.05)
    assert fit.val["estimate"].startswith("leave-one-out")
    sigma = fit.heads(h.float())["attribute_stds"].mean(0).detach()
    assert torch.allclose(sigma, NOISE, rtol=0.1), sigma
    assert fit.heads.score.bias is None and fit.heads.score.weight.shape == (2 * len(NOISE), 32)  # published layout
    assert set(fit.selection["alpha"]) == set(ATTRIBUTES) and not fit.selection["at_grid_edge"]
    assert 0.85 <= fit.calibration.after["coverage90"] <= 0.95


def test_bootstrap_members_differ_and_their_spread_grows_away_from_the_data():
    h, y = linear_ratings(n=400, d=16, seed=1)
    fit = fit_value_head(h, y, build(ValueHeadConfig, dict(device="cpu", ensemble=6)))
    members = fit.heads.ensemble.weight.detach()
    assert members.shape == (6, 2 * len(NOISE), 16)
    assert all(not torch.equal(members[i, 0::2], members[j, 0::2]) for i in range(6) for j in range(i + 1, 6))
    assert torch.equal(members[0, 1::2], fit.heads.score.weight[1::2])  # one calibrated sigma for every member
    near = h.float()[:200]
    far = near * 4  # the same directions, four times as far from where the rows lie
    spread_near = fit.heads(near)["ensemble_std"].mean().item()
    spread_far = fit.heads(far)["ensemble_std"].mean().item()
    assert spread_far > 2 * spread_near
    again = fit_value_head(h, y, build(ValueHeadConfig, dict(device="cpu", ensemble=6)))
    assert torch.equal(again.heads.ensemble.weight, fit.heads.ensemble.weight)  # seeded: the same resamples


def test_a_shared_alpha_is_one_alpha_and_missing_labels_fit_apart():
    h, y = linear_ratings(n=300, d=8, seed=2)
    y[::5, 1] = float("nan")
    fit = fit_value_head(h, y, build(ValueHeadConfig, dict(device="cpu", ensemble=1, ridge_alpha="shared")))
    alphas = fit.selection["alpha"]
    group = [a for i, a in enumerate(ATTRIBUTES) if i != 1]
    assert len({alphas[a] for a in group}) == 1  # shared within the fit of the fully labelled attributes
    assert torch.isfinite(fit.heads.score.weight).all()


# ----------------------------------------------------------------------------------------------
# Members without another eigendecomposition, and the dual (issue 26): the same numbers as the eigh-based solve


def eigh_member_rows(x, t, weights, u, alpha):
    """Each member the way it was solved before: its weighted moments, an eigh of its own Gram, ``ridge_rows``."""
    out = []
    for w in weights:
        mm = R.moments(chunks(x, t)() if w is None else
                       ((x[i:i + 7], t[i:i + 7], w[i:i + 7]) for i in range(0, len(x), 7)))
        rows, bias = R.ridge_rows(R.spectrum(mm, u), mm, alpha)
        out.append((rows, bias))
    return torch.stack([r for r, _ in out]), torch.stack([b for _, b in out])


def direct_loo_residuals(sp, m, x, t, alpha):
    """Each row's leave-one-out residual [b, K] at ``alpha`` [K] (rows x [b, d] must be rows of the fit)."""
    q, coef = R.targets_side(sp, m)
    c = sp.c(x)
    p = (x.double() - c[:, None] * sp.g[None, :]) @ sp.V  # [b, r]
    inv = 1.0 / (sp.lam[:, None] + alpha.double()[None, :])  # [r, K]
    pred = p @ (inv * q) + c[:, None] * coef[None, :]
    lev = p.square() @ inv + (c.square() / sp.ctc)[:, None]  # [b, K]
    return (t.double() - pred) / (1 - lev)


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("alpha", [0.3, 30.0, (0.5, 40.0)])
def test_members_by_conjugate_gradients_are_the_eigh_solve(with_bias, alpha):
    x, t = data(300, 40, seed=4)
    m = R.moments(chunks(x, t)())
    u = None if with_bias else R.common_direction(m)
    sp = R.spectrum(m, u)
    alpha = torch.tensor(alpha if isinstance(alpha, tuple) else (alpha, alpha), dtype=torch.float64)
    weights = torch.stack(list(R.bootstrap_weights(len(x), 4, seed=0)))
    rows, bias, how = R.member_rows(sp, chunks(x, t), weights, alpha, max_steps=200)  # at d = 40 a direct solve
    ref_rows, ref_bias = eigh_member_rows(x, t, weights, u, alpha)  # costs ~10 steps: here the steps are the test
    assert how["members_solved_directly"] == 0 and how["passes"] < 60
    assert relative(rows, ref_rows) < 1e-10 and (bias - ref_bias).abs().max() < 1e-9
    assert relative(torch.einsum("nd,mkd->mnk", x, rows), torch.einsum("nd,mkd->mnk", x, ref_rows)) < 1e-11
    direct_rows, direct_bias, how = R.member_rows(sp, chunks(x, t), weights, alpha, max_steps=0)  # Cholesky
    assert how["members_solved_directly"] == 4
    assert relative(direct_rows, ref_rows) < 1e-10 and (direct_bias - ref_bias).abs().max() < 1e-9


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_dual_is_the_primal_with_fewer_rows_than_features(with_bias):
    x, t = data(25, 60, seed=5)
    m = R.moments(chunks(x, t)())
    u = None if with_bias else R.common_direction(m)
    primal, dual = R.spectrum(m, u), R.dual_spectrum(x, u)
    assert len(dual.lam) == len(primal.lam) == 24  # n - 1: the unpenalised column takes one
    assert torch.allclose(dual.lam, primal.lam, rtol=1e-10) and dual.scale == pytest.approx(primal.scale, rel=1e-12)
    v_p, v_d = primal.V, dual.V  # the same eigenvectors, up to sign
    assert torch.allclose((v_p * v_d).sum(0).abs(), torch.ones(24, dtype=torch.float64), atol=1e-8)
    alpha = torch.tensor([0.5, 20.0], dtype=torch.float64)
    for a, b in zip(R.ridge_rows(dual, m, alpha), R.ridge_rows(primal, m, alpha)):
        assert (a - b).abs().max() < 1e-10 * max(1.0, b.abs().max().item())
    grid = torch.logspace(-4, 3, 15, dtype=torch.float64) * primal.scale
    assert torch.allclose(R.loo_path(dual, m, chunks(x, t), grid), R.loo_path(primal, m, chunks(x, t), grid), rtol=1e-8)
    weights = torch.stack(list(R.bootstrap_weights(len(x), 3, seed=1)))
    rows, bias, _ = R.member_rows_dual(x, t, weights, u, alpha)
    ref_rows, ref_bias = eigh_member_rows(x, t, weights, u, alpha)
    assert relative(rows, ref_rows) < 1e-9 and (bias - ref_bias).abs().max() < 1e-9


def test_gcv_at_the_grids_low_end_is_the_exact_hat_matrix_value_with_fewer_rows_than_features():
    """With n < d the fit interpolates as alpha -> 0 and GCV is 0 / 0 in the limit: computed from the dual's
    eigenpairs without cancellation it is the value of the hat-matrix formula in 60-digit arithmetic."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    x, t = data(12, 20, k=1, seed=6)
    m = R.moments(chunks(x, t)())
    sp = R.dual_spectrum(x, None)
    alphas = torch.tensor([1e-8, 1e-6, 1e-2, 10.0], dtype=torch.float64) * sp.scale
    got = R.gcv_path(sp, m, alphas)[:, 0]
    xc = mpmath.matrix([[1] + [mpmath.mpf(v) for v in row] for row in x.tolist()])  # the bias column first
    tt = mpmath.matrix([[v] for v in t[:, 0].tolist()])
    for a, value in zip(alphas.tolist(), got.tolist()):
        penalty = mpmath.eye(21) * mpmath.mpf(a)
        penalty[0, 0] = 0
        hat = xc * mpmath.inverse(xc.T * xc + penalty) * xc.T
        resid = tt - hat * tt
        exact = 12 * sum(r ** 2 for r in resid) / (12 - sum(hat[i, i] for i in range(12))) ** 2
        assert value == pytest.approx(float(exact), rel=1e-6)


def test_the_value_head_solves_its_members_without_another_eigendecomposition(monkeypatch):
    """Today's fit against the eigh-based members it replaces, end to end: every member's mean rows the same to
    float64 round-off (stored in float32), with one eigendecomposition per label group and sigma fit, no more."""
    h, y = linear_ratings(n=400, d=24, seed=3)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(a.shape) or eigh(a))
    fit = fit_value_head(h, y, build(ValueHeadConfig, dict(device="cpu", ensemble=5)))
    assert calls == [(24, 24), (24, 24)]  # the means' fit and sigma's fit; the members take none
    assert fit.selection["decomposition"] == ["primal (d x d)"]
    alpha = torch.tensor([fit.selection["alpha"][a] for a in ATTRIBUTES], dtype=torch.float64)
    x = h.double()
    m = R.moments(chunks(x, y.double())())
    weights = torch.stack(list(R.bootstrap_weights(len(x), 5, seed=0)))
    ref_rows, _ = eigh_member_rows(x, y.double(), weights, R.common_direction(m), alpha)
    members = fit.heads.ensemble.weight.detach().double()[:, 0::2]
    assert (members - ref_rows).abs().max() < 1e-6 * ref_rows.abs().max()  # float32 storage of the same numbers


def test_fewer_rows_than_features_fit_in_the_dual():
    h, y = linear_ratings(n=40, d=64, seed=1)
    fit = fit_value_head(h, y, build(ValueHeadConfig, dict(device="cpu", ensemble=3)))
    assert fit.selection["decomposition"] == ["dual (n x n)"]
    assert fit.selection["members_solved_by"][0]["solver"].startswith("the n x n dual")
    x = h.double()
    m = R.moments(chunks(x, y.double())())
    u = R.common_direction(m)
    alpha = torch.tensor([fit.selection["alpha"][a] for a in ATTRIBUTES], dtype=torch.float64)
    ref_mu, _ = R.ridge_rows(R.spectrum(m, u), m, alpha)  # the primal eigh solve of the same fit
    assert (fit.heads.score.weight.detach().double()[0::2] - ref_mu).abs().max() < 1e-6 * ref_mu.abs().max()
    weights = torch.stack(list(R.bootstrap_weights(len(x), 3, seed=0)))
    ref_rows, _ = eigh_member_rows(x, y.double(), weights, u, alpha)
    members = fit.heads.ensemble.weight.detach().double()[:, 0::2]
    assert (members - ref_rows).abs().max() < 1e-6 * ref_rows.abs().max()


@pytest.mark.parametrize("with_bias", [True, False])
def test_leave_one_out_residuals_from_the_paths_leverages_are_the_direct_ones(with_bias):
    """The fit takes each row's leave-one-out residual from loo_path's leverages and the fitted rows' predictions
    (no second projection pass): the same numbers as projecting every row on V again at the chosen alphas."""
    x, t = data(60, 9, k=3)
    m = R.moments(chunks(x, t)())
    sp = R.spectrum(m, None if with_bias else R.common_direction(m))
    alphas = R.grid_for(sp)
    path, lev = R.loo_path(sp, m, chunks(x, t), alphas, leverages=True)
    assert torch.equal(path, R.loo_path(sp, m, chunks(x, t), alphas)) and lev.shape == (len(alphas), 60)
    at = torch.tensor([3, 60, 100])  # one alpha per target
    rows, bias = R.ridge_rows(sp, m, alphas[at])
    fast = R.loo_residuals_from(t, x @ rows.T + bias, lev[at].T)
    direct = direct_loo_residuals(sp, m, x, t, alphas[at])
    assert relative(fast, direct) < 1e-10


def test_sigmas_gram_is_the_full_gram_less_the_calibration_rows(monkeypatch):
    """The sigma fit's Gram (the rows outside the calibration split) is the means' Gram less the calibration rows':
    the value head is the one a Gram summed over those rows gives, to float64 round-off (stored in float32)."""
    from pipeline.train import closed_form

    h, y = linear_ratings(n=400, d=24, seed=5)
    cfg = build(ValueHeadConfig, dict(device="cpu", ensemble=1))
    fast = fit_value_head(h, y, cfg).heads.score.weight.detach().double()
    monkeypatch.setattr(closed_form, "gram_of", lambda rows, idx: torch.zeros(()))  # unused below
    real = closed_form.decomposed
    monkeypatch.setattr(closed_form, "decomposed", lambda rows, idx, t, u, gram=None: real(rows, idx, t, u))
    slow = fit_value_head(h, y, cfg).heads.score.weight.detach().double()
    assert relative(fast, slow) < 1e-6 and not torch.equal(fast[1::2], torch.zeros_like(fast[1::2]))


def test_a_sigma_far_off_the_errors_is_flagged_and_a_sound_one_is_not():
    from pipeline.train.closed_form import sigma_warning

    h, y = linear_ratings(n=400, d=24, seed=7)
    fit = fit_value_head(h, y, build(ValueHeadConfig, dict(device="cpu", ensemble=1)))
    assert sigma_warning(fit.val, 400, 24) is None and "sigma_warning" not in fit.val
    assert "not to be trusted" in sigma_warning({**fit.val, "mean_sigma": 11 * fit.val["mse"] ** 0.5}, 24, 4096)
    assert "not to be trusted" in sigma_warning({**fit.val, "nll": float("inf")}, 24, 4096)


def by_hand_epistemic_variance(x: np.ndarray, labelled: np.ndarray, alpha: float, noise: float, h: np.ndarray,
                               bias: bool) -> np.ndarray:
    """s^2 [c(h)^2 / cᵀc + zᵀ (ZᵀZ + alpha I)^-1 z] for rows h, from the labelled rows of x in float64 by a direct
    solve: the intercept column c = x.u (u = mean / |mean|^2, or 1 with a bias) and Z = X - c gᵀ, as the fit
    centres (docs/method.md 10)."""
    xs = x[labelled]
    mean = xs.mean(0)
    u = None if bias else mean / mean.dot(mean)
    c = np.ones(len(xs)) if bias else xs @ u
    g = xs.T @ c / c.dot(c)
    z = xs - np.outer(c, g)
    ch = np.ones(len(h)) if bias else h @ u
    zh = h - np.outer(ch, g)
    inv = np.linalg.solve(z.T @ z + alpha * np.eye(x.shape[1]), zh.T).T
    return noise * (ch ** 2 / c.dot(c) + (zh * inv).sum(1))


@pytest.mark.parametrize("n, d, bias", [(200, 12, False), (30, 40, False), (15, 60, False), (200, 12, True)])
def test_epistemic_std_is_the_ridge_posterior_computed_by_hand_and_grows_off_the_data(n, d, bias):
    """The heads' epistemic_std against a direct float64 solve on the same rows, per label group (one attribute
    with missing labels fits apart), for more rows than features (primal), fewer (dual) and a plain bias; a point off
    the span of the rows (or far along the least-seen direction) is less certain than every training row. The basis is
    completed to d directions where the span misses fewer than it holds (200 x 12, 30 x 40), else the part outside
    the span is a residual (15 x 60)."""
    x, y = linear_ratings(n=n, d=d, seed=4)
    y[::4, 2] = float("nan")
    fit = fit_value_head(x, y, build(ValueHeadConfig, dict(device="cpu", ensemble=1, bias=bias)))
    xn = x.double().numpy()
    g = np.random.default_rng(0)
    low = np.linalg.svd(xn - xn.mean(0), full_matrices=True)[2][-1]  # the direction the rows vary least along
    off = xn[:3] + 40 * low * np.sqrt((xn ** 2).sum(1).mean())  # off the data: far along it
    m = min(20, n)
    probe = np.concatenate([xn[:m], off, g.normal(size=(2, d)) * 5])
    out = fit.heads(torch.tensor(probe, dtype=torch.float32))
    assert set(out) >= {"epistemic_std", "attribute_epistemic_stds"}
    assert all((g.basis.shape[1] == d) == (n > d / 2) for g in fit.heads.posterior)
    got = out["attribute_epistemic_stds"].detach().double().numpy() ** 2
    for k, name in enumerate(ATTRIBUTES):
        labelled = ~np.isnan(y[:, k].numpy())
        want = by_hand_epistemic_variance(xn, labelled, fit.selection["alpha"][name], fit.selection["loo_mse"][name],
                                          probe, bias)
        np.testing.assert_allclose(got[:, k], want, rtol=1e-4, err_msg=name)
    w = out["gating_weights"].detach().double().numpy()
    np.testing.assert_allclose(out["epistemic_std"].detach().numpy(), np.sqrt((w ** 2 * got).sum(1)), rtol=1e-5)
    std = out["epistemic_std"].detach().numpy()
    train = fit.heads(x.float())["epistemic_std"].detach().numpy()
    assert std[m:m + 3].min() > 3 * train.max()  # grows off the data
    assert std[m:m + 3].min() > 3 * std[:m].max()


def test_a_value_head_without_a_posterior_states_no_epistemic_std():
    h, y = linear_ratings(n=200, d=8, seed=5)
    fit = fit_value_head(h, y, build(ValueHeadConfig, dict(device="cpu", ensemble=1, loss="nll", epochs=2)))
    out = fit.heads(h.float())
    assert "epistemic_std" not in out and "attribute_epistemic_stds" not in out and fit.heads.posterior is None
