"""Closed-form ridge for the value head's rows: least squares plus an L2 penalty, its alpha per attribute by
exact leave-one-out, from one eigendecomposition of the features' Gram matrix (docs/method.md 2); bootstrap
members solved at the chosen alphas without another one.

Ridge is the minimiser of the mean part of the reparam objective plus an L2 term, so it is what stage 1
would reach if its regularisation were chosen well; here it is solved exactly, for every alpha at once.

The model, for targets t [n, K] and features x [n, d] (rows streamed in chunks: nothing holds X whole):
    t ~ c * coef + Z beta,   c = x . u (or 1),   Z = P X,   P = I - c c^T / c^T c
``c`` is an unpenalised column: with ``u`` the hidden states' common direction (u.h = 1 on average) it
is an intercept that folds exactly into a no-bias row, row = beta + (coef - g.beta) u, so the published
layout (``score.weight`` [2K, d], no bias) is kept; with c = 1 it is a plain bias. beta(alpha) =
V diag(1 / (lam + alpha)) V^T Z^T t from ZᵀZ = V diag(lam) Vᵀ, which is G - cᵀc g gᵀ with G = XᵀX and
g = Xᵀc / cᵀc, so one pass over the rows gives it. Leave-one-out needs each row's leverage
h_ii = c_i^2 / cᵀc + sum_j (v_j . z_i)^2 / (lam_j + alpha) and residual: a second pass, for every alpha
of the grid at once. Everything is float64.

The eigendecomposition (``Spectrum``: the primal eigenpairs V, lam of ZᵀZ, whichever way they were found):
  n >= d   ``spectrum``: eigh of the d x d ZᵀZ, from the moments' Gram.
  n <  d   ``dual_spectrum``: eigh of the n x n Z Zᵀ = U diag(lam) Uᵀ, then V = Zᵀ U diag(lam^-1/2): the same
           nonzero eigenpairs for the cost of an n x n problem (47 rows at d = 4096: 47 x 47, not 4096 x 4096).
Bootstrap members (``member_rows``) solve (Z_mᵀ W_m Z_m + alpha I) beta = Z_mᵀ W_m t at the full fit's alphas,
W_m a member's row multiplicities and Z_m the rows centred with the member's own weights:
  n >= d   conjugate gradients, every member and target at once (one pass over the rows per step),
           preconditioned by the full fit's eigenpairs, (ZᵀZ + alpha I)^-1 = V diag(1/(lam + alpha)) Vᵀ
           + (I - V Vᵀ) / alpha: a resample's Gram is close to the full one, so a few dozen steps reach float64
           round-off (backward error ``CG_TOL``). Steps are capped at what a direct solve would cost; a member not
           converged by then is solved directly, by a Cholesky factor of its own Gram.
  n <  d   the n x n dual, beta = B^T (B B^T + alpha I)^-1 W^1/2 t with B = W^1/2 Z_m, by Cholesky.
Neither computes another eigendecomposition; both give today's eigh-based numbers within float64 round-off
(``tests/test_closed_form.py`` checks them against that solve).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

ALPHA_GRID = torch.logspace(-8, 4, 121, dtype=torch.float64)  # x the Gram's mean eigenvalue: 10 per decade
LOG_CHI2_1_MEAN = -1.2703628454614782  # E[log chi^2_1] = -(Euler's gamma) - log 2: E[log r^2] = 2 log sigma - 1.27
RANK_RTOL = 1e-10  # eigenvalues below this share of the largest are the null space

Chunks = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]]
"""() -> iterator of (x [b, d], t [b, K] float64 without NaN, weight [b] or None), the same rows each call."""


@dataclass
class Moments:
    """Sums over a (weighted) row set: what a ridge fit needs of the rows, from one pass."""

    n: float
    gram: torch.Tensor | None  # [d, d]  sum w x x^T (None when the dual is used: it needs the rows, not their Gram)
    xsum: torch.Tensor  # [d]     sum w x
    xty: torch.Tensor  # [d, K]  sum w x t^T
    tsum: torch.Tensor  # [K]
    tty: torch.Tensor  # [K]     sum w t^2


def moments(chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], gram: bool = True) -> Moments:
    """The sums of ``chunks`` (x, t, weight), in float64 (without the d x d Gram unless ``gram``)."""
    m = None
    for x, t, w in chunks:
        x, t = x.double(), t.double()
        wx = x if w is None else x * w.double()[:, None]
        if m is None:
            d, k = x.shape[1], t.shape[1]
            z = dict(dtype=torch.float64, device=x.device)
            m = Moments(0.0, torch.zeros(d, d, **z) if gram else None, torch.zeros(d, **z), torch.zeros(d, k, **z),
                        torch.zeros(k, **z), torch.zeros(k, **z))
        m.n += float(len(x) if w is None else w.sum())
        if gram:
            m.gram += wx.T @ x
        m.xsum += wx.sum(0)
        m.xty += wx.T @ t
        wt = t if w is None else t * w.double()[:, None]
        m.tsum += wt.sum(0)
        m.tty += (wt * t).sum(0)
    if m is None:
        raise ValueError("no rows to fit")
    return m


def use_dual(n: int, d: int) -> bool:
    """Whether a fit on n rows of width d takes the n x n dual (fewer rows than features): exact, and cheaper.

    >>> use_dual(47, 4096), use_dual(20_000, 4096)
    (True, False)
    """
    return n < d


def common_direction(m: Moments) -> torch.Tensor:
    """u = mean(h) / |mean(h)|^2, so that u.h is 1 on average: the intercept's direction (calibration's rule).

    >>> m = moments([(torch.tensor([[2.0, 0.0], [2.0, 2.0]]), torch.zeros(2, 1), None)])
    >>> common_direction(m).tolist()
    [0.4, 0.2]
    """
    mean = m.xsum / m.n
    return mean / mean.dot(mean)


@dataclass
class Spectrum:
    """ZᵀZ = V diag(lam) Vᵀ on the rows of ``moments``, with the unpenalised column c = x.u (or 1 when ``u`` is
    None): ``ctc`` = cᵀc, ``g`` = Xᵀc / cᵀc (Z = X - c gᵀ), ``scale`` the Gram's mean eigenvalue (alphas are
    relative to it, so the grid fits any backbone's feature scale)."""

    V: torch.Tensor  # [d, r]
    lam: torch.Tensor  # [r]
    u: torch.Tensor | None
    g: torch.Tensor
    ctc: float
    scale: float

    def c(self, x: torch.Tensor) -> torch.Tensor:
        """The unpenalised column for rows x [b, d]."""
        return x.double() @ self.u if self.u is not None else x.new_ones(len(x), dtype=torch.float64)


def spectrum(m: Moments, u: torch.Tensor | None) -> Spectrum:
    """One eigendecomposition for every ridge fit on these rows: any alpha, any target (eigh of the d x d ZᵀZ)."""
    if u is not None:
        xtc, ctc = m.gram @ u, float(u @ m.gram @ u)
    else:
        xtc, ctc = m.xsum, m.n
    g = xtc / ctc
    ztz = m.gram - ctc * torch.outer(g, g)
    lam, V = torch.linalg.eigh((ztz + ztz.T) / 2)
    keep = lam > RANK_RTOL * lam.max().clamp(min=1e-300)
    return Spectrum(V[:, keep], lam[keep], u, g, ctc, float(m.gram.diagonal().mean()))


def dual_spectrum(x: torch.Tensor, u: torch.Tensor | None) -> Spectrum:
    """``spectrum`` of the rows x [n, d] (every row once, unweighted) from the n x n Z Zᵀ = U diag(lam) Uᵀ: the
    primal eigenpairs are lam and V = Zᵀ U diag(lam^-1/2) (the same nonzero ones; for n < d, where eigh of
    n x n costs far less than of d x d)."""
    x = x.double()
    c = x @ u if u is not None else x.new_ones(len(x))
    ctc = float(c @ c)
    g = x.T @ c / ctc
    z = x - c[:, None] * g[None, :]
    zzt = z @ z.T
    lam, U = torch.linalg.eigh((zzt + zzt.T) / 2)
    keep = lam > RANK_RTOL * lam.max().clamp(min=1e-300)
    lam = lam[keep]
    return Spectrum((z.T @ U[:, keep]) / lam.sqrt()[None, :], lam, u, g, ctc, float(x.square().sum() / x.shape[1]))


def targets_side(sp: Spectrum, m: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """(q = Vᵀ Zᵀ t [r, K], coef = cᵀt / cᵀc [K]) of the rows' targets."""
    ctt = (m.xty.T @ sp.u) if sp.u is not None else m.tsum  # [K]
    coef = ctt / sp.ctc
    zty = m.xty - torch.outer(sp.g, ctt)  # Zᵀ t = Xᵀt - g cᵀt
    return sp.V.T @ zty, coef


def ridge_rows(sp: Spectrum, m: Moments, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [K, d], bias [K]) of the fit at ``alpha`` [K] (absolute, one per target): the prediction is
    rows . h + bias. With the direction intercept the bias is folded into the rows (bias 0)."""
    q, coef = targets_side(sp, m)
    beta = sp.V @ (q / (sp.lam[:, None] + alpha.double()[None, :]))  # [d, K]
    intercept = coef - sp.g @ beta  # [K]
    if sp.u is not None:
        return (beta + sp.u[:, None] * intercept[None, :]).T, torch.zeros_like(intercept)
    return beta.T, intercept


def loo_path(sp: Spectrum, m: Moments, chunks: Chunks, alphas: torch.Tensor,
             leverages: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact leave-one-out mean squared error [A, K] of every alpha [A] (absolute) for every target, in one
    pass over the (unweighted) rows: (t_i - yhat_i) / (1 - h_ii), squared and averaged. With ``leverages`` also
    every row's h_ii at every alpha [A, n] (what ``loo_residuals_from`` needs at the chosen one, so the residuals
    need no second pass that projects every row on V)."""
    q, coef = targets_side(sp, m)
    inv = 1.0 / (sp.lam[None, :] + alphas.double()[:, None])  # [A, r]
    qa = inv[:, :, None] * q[None]  # [A, r, K]
    total, n, levs = torch.zeros(len(alphas), q.shape[1], dtype=torch.float64, device=q.device), 0, []
    for x, t, _ in chunks():
        c = sp.c(x)
        p = (x.double() - c[:, None] * sp.g[None, :]) @ sp.V  # [b, r] = V^T z_i
        pred = torch.matmul(p, qa) + (c[:, None] * coef[None, :])[None]  # [A, b, K]
        lev = (p.square() @ inv.T).T + (c.square() / sp.ctc)[None, :]  # [A, b]
        total += ((t.double()[None] - pred) / (1 - lev)[..., None]).square().sum(1)
        n += len(x)
        if leverages:
            levs.append(lev)
    return (total / n, torch.cat(levs, 1)) if leverages else total / n


def loo_residuals_from(t: torch.Tensor, pred: torch.Tensor, lev: torch.Tensor) -> torch.Tensor:
    """Leave-one-out residuals [n, K] from the fit's predictions ``pred`` [n, K] and leverages ``lev`` [n, K]
    (``loo_path``'s at the chosen alphas): (t - yhat) / (1 - h_ii)."""
    return (t.double() - pred) / (1 - lev)


def posterior_factor(sp: Spectrum, alpha: torch.Tensor, noise: torch.Tensor) -> dict:
    """The ridge posterior of this fit (docs/method.md 10) as the tensors ``heads.RidgePosterior`` keeps, float64:
    with prior beta ~ N(0, s^2 / alpha I), a flat prior on the unpenalised column's coefficient and noise s^2, the
    epistemic variance of the fitted mean at h is
        s^2 [ c(h)^2 / cᵀc + sum_j (v_jᵀz)^2 / (lam_j + alpha) + |z - V Vᵀz|^2 / alpha ],   z = h - c(h) g,
    exactly (Zᵀc = 0, so the two coefficients' posteriors are independent; directions with an eigenvalue below
    ``RANK_RTOL`` of the largest count as outside the span). ``alpha`` [K] absolute, ``noise`` [K] each attribute's
    s^2. Returns basis V [d, r], shrink [K, r] = 1 / (lam + alpha_k), outside [K] = 1 / alpha_k, noise [K],
    center g [d], direction u [d] (None with a plain bias: c = 1), column [1] = 1 / cᵀc.

    When the span misses fewer directions than it holds (more rows than features: with the direction intercept at
    least u, as Z u = 0), the basis is completed to all d directions (an orthonormal complement, at shrink
    1 / alpha: seeded random directions with V projected out twice, then a thin QR factor; O(d r (d - r))), so
    inference is one [B, d] x [d, d] product and the part outside the span needs no second one; otherwise (fewer
    rows than features) the heads compute that part as |z - V Vᵀz|^2."""
    alpha = alpha.double()
    basis, shrink = sp.V, 1.0 / (sp.lam[None, :] + alpha[:, None])
    d, r = basis.shape
    if 0 < d - r < r:
        rest = torch.randn(d, d - r, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(basis.device)
        for _ in range(2):  # twice: one pass leaves round-off along V
            rest = rest - basis @ (basis.T @ rest)
        basis = torch.cat([basis, torch.linalg.qr(rest)[0]], 1)
        shrink = torch.cat([shrink, (1.0 / alpha)[:, None].expand(-1, d - r)], 1)
    return {"basis": basis, "shrink": shrink, "outside": 1.0 / alpha,
            "noise": noise.double(), "center": sp.g, "direction": sp.u,
            "column": torch.tensor([1.0 / sp.ctc], dtype=torch.float64, device=sp.g.device)}


def gcv_path(sp: Spectrum, m: Moments, alphas: torch.Tensor) -> torch.Tensor:
    """Generalised cross-validation n |t - H t|^2 / (n - tr H)^2 [A, K] from the sums alone (no pass), with
    s_j = alpha / (lam_j + alpha) = 1 - f_j:
        |P t - H P t|^2 = (|P t|^2 - sum_j q_j^2 / lam_j) + sum_j s_j^2 q_j^2 / lam_j,
        n - tr H = (n - 1 - r) + sum_j s_j.
    Written so (rather than |P t|^2 - sum_j (2 f_j - f_j^2) q_j^2 / lam_j) because with fewer rows than features
    both vanish as alpha -> 0 (the fit interpolates) and the difference would be rounding alone: the alpha-free
    first term is exactly 0 there (rank n - 1), and the rest is computed without cancellation."""
    q, coef = targets_side(sp, m)
    shrink = alphas.double()[:, None] / (sp.lam[None, :] + alphas.double()[:, None])  # [A, r]
    inside = q.square() / sp.lam[:, None]  # [r, K]
    if len(sp.lam) >= round(m.n) - 1:  # rank n - 1, all the centred rows allow: t lies in their span exactly
        outside = torch.zeros_like(coef)
    else:  # |P t|^2 outside the rows' span
        outside = (m.tty - sp.ctc * coef.square() - inside.sum(0)).clamp(min=0)
    rss = outside[None, :] + shrink.square() @ inside
    left = (m.n - 1.0 - len(sp.lam)) + shrink.sum(1)  # n - tr H
    return m.n * rss / left.clamp(min=1e-12)[:, None].square()


def pick(path: torch.Tensor, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """(best alpha [K], its criterion [K], whether it lies on the grid's edge) from a criterion path [A, K]."""
    best = path.argmin(0)
    edge = [bool(i == 0 or i == len(alphas) - 1) for i in best.tolist()]
    return alphas[best], path[best, torch.arange(path.shape[1])], edge


def log_sigma_targets(resid: torch.Tensor, floor: float) -> torch.Tensor:
    """z = log max(r^2, floor): regressed on h, 0.5 zhat + 0.635 is log sigma (E[log chi^2_1] = -1.27)."""
    return resid.double().square().clamp(min=floor).log()


def log_sigma_from(rows: torch.Tensor, bias: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-sigma rows (and bias) of a ridge fit of log r^2: 0.5 * fit - 0.5 E[log chi^2_1] (times u.h, the
    constant, in the no-bias layout)."""
    shift = -0.5 * LOG_CHI2_1_MEAN
    if u is not None:
        return 0.5 * rows + shift * u[None, :], torch.zeros_like(bias)
    return 0.5 * rows, 0.5 * bias + shift


def bootstrap_weights(n: int, members: int, seed: int) -> Iterator[torch.Tensor]:
    """Each member's row multiplicities [n]: n rows drawn with replacement from a generator seeded seed + m.

    >>> [int(w.sum()) for w in bootstrap_weights(10, 3, 0)]
    [10, 10, 10]
    """
    for m in range(members):
        g = torch.Generator().manual_seed(seed + m)
        yield torch.bincount(torch.randint(n, (n,), generator=g), minlength=n).double()


CG_TOL = 1e-14  # a member's conjugate gradients stop at this normwise backward error: |r| <= tol (|A| |beta| + |b|)


@dataclass
class Resamples:
    """The members' weighted sums for (Z_mᵀ W_m Z_m + alpha I) beta = Z_mᵀ W_m t, Z_m = X - c g_mᵀ: ``weights``
    [M, n] the row multiplicities, ``g`` [M, d] = Xᵀ W c / s, ``s`` [M] = cᵀ W c, ``zty`` [M, d, K] = Z_mᵀ W t and
    ``coef`` [M, K] = cᵀ W t / s (the unpenalised column's coefficient)."""

    weights: torch.Tensor
    u: torch.Tensor | None
    g: torch.Tensor
    s: torch.Tensor
    zty: torch.Tensor
    coef: torch.Tensor

    def rows(self, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [M, K, d], bias [M, K]) from each member's beta [M, d, K], as ``ridge_rows`` folds its intercept."""
        intercept = self.coef - (self.g[:, :, None] * beta).sum(1)  # [M, K]
        if self.u is not None:
            return (beta + self.u[None, :, None] * intercept[:, None, :]).transpose(1, 2), torch.zeros_like(intercept)
        return beta.transpose(1, 2), intercept


def weighted_chunks(chunks: Chunks, weights: torch.Tensor):
    """(x float64 [b, d], t float64 [b, K], the members' weights of these rows [M, b]) of every chunk, in order."""
    start = 0
    for x, t, _ in chunks():
        yield x.double(), t.double(), weights[:, start:start + len(x)]
        start += len(x)


def resample_sides(chunks: Chunks, weights: torch.Tensor, u: torch.Tensor | None) -> Resamples:
    """Every member's weighted sums but the Gram (``Resamples``), in one pass over the rows."""
    xtc = xty = s = ctt = None
    for x, t, w in weighted_chunks(chunks, weights):
        (b, d), m, k = x.shape, w.shape[0], t.shape[1]
        c = x @ u if u is not None else x.new_ones(b)
        wc = w * c  # [M, b]
        wt = w[:, :, None] * t[None]  # [M, b, K]
        if xtc is None:
            xtc, xty = x.new_zeros(d, m), x.new_zeros(d, m * k)
            s, ctt = x.new_zeros(m), x.new_zeros(m, k)
        xtc += x.T @ wc.T
        xty += x.T @ wt.transpose(0, 1).reshape(b, m * k)
        s += wc @ c
        ctt += (wt * c[None, :, None]).sum(1)
    if xtc is None:
        raise ValueError("no rows to fit")
    m, k = ctt.shape
    g = (xtc / s[None, :]).T  # [M, d]
    zty = xty.reshape(-1, m, k).transpose(0, 1) - g[:, :, None] * ctt[:, None, :]
    return Resamples(weights, u, g, s, zty, ctt / s[:, None])


def resample_gram_times(chunks: Chunks, res: Resamples, v: torch.Tensor) -> torch.Tensor:
    """Z_mᵀ W_m Z_m v_m for every member at once: v [M, d, K] -> [M, d, K], one pass over the rows
    (Z_mᵀ W_m Z_m = Xᵀ W_m X - s_m g_m g_mᵀ, so the centred rows are never formed)."""
    m, d, k = v.shape
    flat = v.transpose(0, 1).reshape(d, m * k)
    out = v.new_zeros(d, m * k)
    for x, _, w in weighted_chunks(chunks, res.weights):
        y = (x @ flat).reshape(len(x), m, k) * w.T[:, :, None]
        out += x.T @ y.reshape(len(x), m * k)
    out = out.reshape(d, m, k).transpose(0, 1)
    return out - res.s[:, None, None] * res.g[:, :, None] * (res.g[:, :, None] * v).sum(1, keepdim=True)


def preconditioned(sp: Spectrum, alpha: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(ZᵀZ + alpha I)^-1 r of the full fit, per target column: r [M, d, K] -> [M, d, K] (the null space of its
    eigenpairs at 1 / alpha)."""
    p = torch.einsum("dr,mdk->mrk", sp.V, r)
    inside = torch.einsum("dr,mrk->mdk", sp.V, p)
    return torch.einsum("dr,mrk->mdk", sp.V, p / (sp.lam[None, :, None] + alpha[None, None, :])) + \
        (r - inside) / alpha[None, None, :]


def direct_steps(n: int, d: int, k: int) -> int:
    """Conjugate-gradient steps that cost what a member's direct solve would (its Gram, 2 n d^2 flops, and a Cholesky
    factor, d^3 / 3, against 4 n d k a step): past this many the direct solve is cheaper.

    >>> direct_steps(20_000, 4096, 5), direct_steps(2000, 576, 5)
    (432, 65)
    """
    return math.ceil((2 * n * d * d + d ** 3 / 3) / (4 * n * d * k))


def member_rows(sp: Spectrum, chunks: Chunks, weights: torch.Tensor, alpha: torch.Tensor,
                max_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Bootstrap members at the full fit's ``alpha`` [K] (absolute), ``weights`` [M, n] each member's row
    multiplicities over the rows of ``chunks``: (rows [M, K, d], bias [M, K], how they were solved). Conjugate
    gradients preconditioned by the full fit's ``sp`` (see the module docstring), at most ``max_steps`` passes
    (default ``direct_steps``); members not converged by then are solved by a Cholesky factor of their Gram."""
    alpha = alpha.double()
    res = resample_sides(chunks, weights, sp.u)
    b = res.zty
    m, d, k = b.shape
    n = weights.shape[1]
    max_steps = direct_steps(n, d, k) if max_steps is None else max_steps
    norm_a = sp.lam.max() + alpha  # |A| of the full fit: a resample's is about the same
    beta, r = torch.zeros_like(b), b.clone()
    z = preconditioned(sp, alpha, r)
    p, rz = z.clone(), (r * z).sum(1)  # [M, K]
    done = r.norm(dim=1) <= CG_TOL * b.norm(dim=1)
    steps = 0
    while not bool(done.all()) and steps < max_steps:
        ap = resample_gram_times(chunks, res, p) + alpha[None, None, :] * p
        step = torch.where(done, 0.0, rz / (p * ap).sum(1).clamp(min=1e-300))
        beta += step[:, None, :] * p
        r -= step[:, None, :] * ap
        steps += 1
        done |= r.norm(dim=1) <= CG_TOL * (norm_a[None, :] * beta.norm(dim=1) + b.norm(dim=1))
        z = preconditioned(sp, alpha, r)
        rz_new = (r * z).sum(1)
        p = z + torch.where(done, 0.0, rz_new / rz.clamp(min=1e-300))[:, None, :] * p
        rz = rz_new
    direct = [i for i in range(m) if not bool(done[i].all())]
    for i in direct:
        beta[i] = cholesky_beta(chunks, res, i, alpha)
    rows, bias = res.rows(beta)
    return rows, bias, {"solver": "conjugate gradients preconditioned by the full fit's eigenpairs",
                        "passes": steps + 1, "members_solved_directly": len(direct)}


def cholesky_beta(chunks: Chunks, res: Resamples, i: int, alpha: torch.Tensor) -> torch.Tensor:
    """Member ``i``'s beta [d, K] by a Cholesky factor of its own Z_iᵀ W_i Z_i + alpha I (one pass for its Gram)."""
    gram = None
    for x, _, w in weighted_chunks(chunks, res.weights[i:i + 1]):
        gram = (x * w[0][:, None]).T @ x if gram is None else gram + (x * w[0][:, None]).T @ x
    a = gram - res.s[i] * torch.outer(res.g[i], res.g[i])
    beta = torch.empty_like(res.zty[i])
    for value in alpha.unique():
        cols = torch.nonzero(alpha == value).flatten()
        factor = torch.linalg.cholesky((a + a.T) / 2 + value * torch.eye(len(a), dtype=a.dtype, device=a.device))
        beta[:, cols] = torch.cholesky_solve(res.zty[i][:, cols], factor)
    return beta


def member_rows_dual(x: torch.Tensor, t: torch.Tensor, weights: torch.Tensor, u: torch.Tensor | None,
                     alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``member_rows`` for fewer rows than features, in the n x n dual: with B = W^1/2 Z_m (the rows a member drew),
    beta = Bᵀ (B Bᵀ + alpha I)^-1 W^1/2 t by a Cholesky factor per distinct alpha. x [n, d], t [n, K] the rows."""
    x, t, alpha = x.double(), t.double(), alpha.double()
    res = resample_sides(lambda: iter([(x, t, None)]), weights, u)
    c = x @ u if u is not None else x.new_ones(len(x))
    beta = torch.empty_like(res.zty)
    for i, w in enumerate(weights.double()):
        drawn = torch.nonzero(w > 0).flatten()
        root = w[drawn].sqrt()[:, None]
        bz = root * (x[drawn] - c[drawn, None] * res.g[i][None, :])  # B [|drawn|, d]
        kernel = bz @ bz.T
        target = root * (t[drawn] - (c[drawn, None] * res.coef[i][None, :]))  # the unpenalised column taken out
        for value in alpha.unique():
            cols = torch.nonzero(alpha == value).flatten()
            eye = torch.eye(len(drawn), dtype=x.dtype, device=x.device)
            factor = torch.linalg.cholesky((kernel + kernel.T) / 2 + value * eye)
            beta[i][:, cols] = bz.T @ torch.cholesky_solve(target[:, cols], factor)
    rows, bias = res.rows(beta)
    return rows, bias, {"solver": "the n x n dual, by Cholesky", "passes": 1, "members_solved_directly": len(weights)}


def interleave(mu_rows: torch.Tensor, log_sigma_rows: torch.Tensor) -> torch.Tensor:
    """[2K, d] rows mu_1, s_1, mu_2, s_2, ... (the published layout of ``score.weight``).

    >>> interleave(torch.zeros(2, 1), torch.ones(2, 1)).flatten().tolist()
    [0.0, 1.0, 0.0, 1.0]
    """
    return torch.stack([mu_rows, log_sigma_rows], 1).flatten(0, 1)


def grid_for(sp: Spectrum) -> torch.Tensor:
    """The alpha grid in this feature scale: ``ALPHA_GRID`` times the Gram's mean eigenvalue."""
    return ALPHA_GRID.to(sp.lam.device) * max(sp.scale, 1e-300)
