"""Closed-form ridge for the value head's rows: least squares plus an L2 penalty, its alpha per attribute by
exact leave-one-out, from one eigendecomposition of the features' Gram matrix (METHOD.md 2).

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
"""

from __future__ import annotations

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
    gram: torch.Tensor  # [d, d]  sum w x x^T
    xsum: torch.Tensor  # [d]     sum w x
    xty: torch.Tensor  # [d, K]  sum w x t^T
    tsum: torch.Tensor  # [K]
    tty: torch.Tensor  # [K]     sum w t^2


def moments(chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> Moments:
    """The sums of ``chunks`` (x, t, weight), in float64."""
    m = None
    for x, t, w in chunks:
        x, t = x.double(), t.double()
        wx = x if w is None else x * w.double()[:, None]
        if m is None:
            d, k = x.shape[1], t.shape[1]
            z = dict(dtype=torch.float64, device=x.device)
            m = Moments(0.0, torch.zeros(d, d, **z), torch.zeros(d, **z), torch.zeros(d, k, **z), torch.zeros(k, **z),
                        torch.zeros(k, **z))
        m.n += float(len(x) if w is None else w.sum())
        m.gram += wx.T @ x
        m.xsum += wx.sum(0)
        m.xty += wx.T @ t
        wt = t if w is None else t * w.double()[:, None]
        m.tsum += wt.sum(0)
        m.tty += (wt * t).sum(0)
    if m is None:
        raise ValueError("no rows to fit")
    return m


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
    """One eigendecomposition for every ridge fit on these rows: any alpha, any target."""
    if u is not None:
        xtc, ctc = m.gram @ u, float(u @ m.gram @ u)
    else:
        xtc, ctc = m.xsum, m.n
    g = xtc / ctc
    ztz = m.gram - ctc * torch.outer(g, g)
    lam, V = torch.linalg.eigh((ztz + ztz.T) / 2)
    keep = lam > RANK_RTOL * lam.max().clamp(min=1e-300)
    return Spectrum(V[:, keep], lam[keep], u, g, ctc, float(m.gram.diagonal().mean()))


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


def loo_path(sp: Spectrum, m: Moments, chunks: Chunks, alphas: torch.Tensor) -> torch.Tensor:
    """Exact leave-one-out mean squared error [A, K] of every alpha [A] (absolute) for every target, in one
    pass over the (unweighted) rows: (t_i - yhat_i) / (1 - h_ii), squared and averaged."""
    q, coef = targets_side(sp, m)
    inv = 1.0 / (sp.lam[None, :] + alphas.double()[:, None])  # [A, r]
    qa = inv[:, :, None] * q[None]  # [A, r, K]
    total, n = torch.zeros(len(alphas), q.shape[1], dtype=torch.float64, device=q.device), 0
    for x, t, _ in chunks():
        c = sp.c(x)
        p = (x.double() - c[:, None] * sp.g[None, :]) @ sp.V  # [b, r] = V^T z_i
        pred = torch.matmul(p, qa) + (c[:, None] * coef[None, :])[None]  # [A, b, K]
        lev = (p.square() @ inv.T).T + (c.square() / sp.ctc)[None, :]  # [A, b]
        total += ((t.double()[None] - pred) / (1 - lev)[..., None]).square().sum(1)
        n += len(x)
    return total / n


def loo_residuals(sp: Spectrum, m: Moments, x: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Each row's leave-one-out residual [b, K] at ``alpha`` [K] (rows x [b, d] must be rows of the fit)."""
    q, coef = targets_side(sp, m)
    c = sp.c(x)
    p = (x.double() - c[:, None] * sp.g[None, :]) @ sp.V  # [b, r]
    inv = 1.0 / (sp.lam[:, None] + alpha.double()[None, :])  # [r, K]
    pred = p @ (inv * q) + c[:, None] * coef[None, :]
    lev = p.square() @ inv + (c.square() / sp.ctc)[:, None]  # [b, K]
    return (t.double() - pred) / (1 - lev)


def gcv_path(sp: Spectrum, m: Moments, alphas: torch.Tensor) -> torch.Tensor:
    """Generalised cross-validation n |t - H t|^2 / (n - tr H)^2 [A, K] from the sums alone (no pass):
    |P t - H P t|^2 = |P t|^2 - sum_j (2 f_j - f_j^2) (q_j^2 / lam_j), f_j = lam_j / (lam_j + alpha)."""
    q, coef = targets_side(sp, m)
    f = sp.lam[None, :] / (sp.lam[None, :] + alphas.double()[:, None])  # [A, r]
    ptp = m.tty - sp.ctc * coef.square()  # |P t|^2
    rss = ptp[None, :] - (2 * f - f.square()) @ (q.square() / sp.lam[:, None])
    trace = f.sum(1) + 1.0
    return m.n * rss.clamp(min=0) / (m.n - trace).clamp(min=1e-12)[:, None].square()


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


def interleave(mu_rows: torch.Tensor, log_sigma_rows: torch.Tensor) -> torch.Tensor:
    """[2K, d] rows mu_1, s_1, mu_2, s_2, ... (the published layout of ``score.weight``).

    >>> interleave(torch.zeros(2, 1), torch.ones(2, 1)).flatten().tolist()
    [0.0, 1.0, 0.0, 1.0]
    """
    return torch.stack([mu_rows, log_sigma_rows], 1).flatten(0, 1)


def grid_for(sp: Spectrum) -> torch.Tensor:
    """The alpha grid in this feature scale: ``ALPHA_GRID`` times the Gram's mean eigenvalue."""
    return ALPHA_GRID.to(sp.lam.device) * max(sp.scale, 1e-300)
