"""Stage 1 in closed form (``--loss ridge``, the default): the value head's rows solved exactly, not trained.

  means      ridge per attribute on every rated row, alpha by exact leave-one-out (``pipeline.train.ridge``),
             the intercept along the hidden states' common direction u (so ``score.weight`` [2K, d] has no bias,
             as the published layout). Leave-one-out needs no validation split, and its error is the
             validation number reported.
  sigma      log sigma(h) = 0.5 ridge(log r^2)(h) + 0.635 on the leave-one-out residuals r of the rows outside
             the calibration split (heteroscedastic: it learns where the errors are large), then the
             calibration of ``pipeline.train.calibration`` (log sigma <- a log sigma + b u.h) on the calibration
             rows' own leave-one-out residuals, so the two never share residuals.
  members    ``--ensemble M``: M ridge fits on bootstrap resamples of the rows (at the full fit's alphas), so
             they differ where the data is thin; ``score.weight`` is the fit on every row, the members carry
             the spread (epistemic), all with its calibrated sigma rows (aleatoric). They are solved without
             another eigendecomposition: conjugate gradients preconditioned by the full fit's eigenpairs, or
             the n x n dual when there are fewer rows than features (``pipeline.train.ridge``).
  dual       with fewer rows than features (n < d) every fit decomposes the n x n Z Zᵀ, not the d x d ZᵀZ.

Rows are read in chunks from the trainers' minibatch source (``pipeline.train.feature_stream``), so a cache
streamed from its parts is fitted the same way as one held in memory. Every number is float64 until the
heads are built.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from pipeline import ATTRIBUTES
from pipeline import metrics as M
from pipeline.device import resolve_device
from pipeline.errors import UserError
from pipeline.model import Heads, LabelScaling, SigmaCalibration
from pipeline.train import ridge as R
from pipeline.train.calibration import fit_scale_offset, interval_metrics, scale_offset
from pipeline.train.feature_stream import as_rows
from pipeline.train.fit import Fit
from pipeline.train.optimization import split_off

if TYPE_CHECKING:  # the configs are the caller's (pipeline.configs)
    from pipeline.configs import ValueHeadConfig

CHUNK = 4096  # rows per pass step: bounds the float64 copies
LOG_R2_FLOOR = 1e-4  # r^2 below this (a row predicted almost exactly) is read as this: log 0 is -inf


def label_groups(y: torch.Tensor) -> list[tuple[list[int], torch.Tensor]]:
    """Attributes that share a label pattern, each with the indices of its labelled rows (one group when every
    row carries every label): each group is one ridge fit, one eigendecomposition.

    >>> [cols for cols, _ in label_groups(torch.tensor([[1.0, 2.0, float("nan")], [3.0, 4.0, 5.0]]))]
    [[0, 1], [2]]
    """
    labelled = ~torch.isnan(y)
    groups: dict[bytes, list[int]] = {}
    for k in range(y.shape[1]):
        groups.setdefault(labelled[:, k].cpu().numpy().tobytes(), []).append(k)
    return [(cols, torch.nonzero(labelled[:, cols[0]]).flatten()) for cols in groups.values()]


def chunks_of(rows, idx: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None) -> R.Chunks:
    """The (x, t, weight) chunks of the samples ``idx`` of a minibatch source, ``t`` [len(idx), K] their targets."""
    def gen():
        start = 0
        for ids, (x,) in rows.batches(idx[None].to(rows.device), CHUNK):
            b = ids.shape[1]
            yield x[0], t[start:start + b], None if weight is None else weight[start:start + b]
            start += b
    return gen


def predict_rows(rows, idx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """rows . h + bias for the samples ``idx`` [n] -> [n, R] (weight [R, d]), in float64."""
    out = [x.double() @ weight.T + bias for x, _, _ in chunks_of(rows, idx, torch.zeros(len(idx), 1))()]
    return torch.cat(out) if out else weight.new_zeros(0, weight.shape[0])


def decomposed(rows, idx: torch.Tensor, t: torch.Tensor, u) -> tuple[R.Moments, R.Spectrum, torch.Tensor | None]:
    """(moments, spectrum, u) of the ridge fit of targets ``t`` on the samples ``idx``: the n x n dual when they are
    fewer than the features (their rows held, float64), else the d x d Gram. ``u``: the intercept's direction,
    "common direction" to take the rows' own (``R.common_direction``), or None for a plain bias."""
    dual = R.use_dual(len(idx), rows.d)
    m = R.moments(chunks_of(rows, idx, t)(), gram=not dual)
    if isinstance(u, str):
        u = R.common_direction(m)
    if dual:
        x = torch.cat([x.double() for x, _, _ in chunks_of(rows, idx, t)()])
        return m, R.dual_spectrum(x, u), u
    return m, R.spectrum(m, u), u


def bootstrap_members(rows, fits: list, members: int, seed: int, chosen: dict, names, mu_w, mu_b):
    """The ``members`` bootstrap refits at the full fit's alphas: (one (rows [K, d], bias [K]) per member, how each
    label group's were solved). A group of fewer rows than features is solved in the n x n dual, else by conjugate
    gradients preconditioned by its full fit's eigenpairs (``pipeline.train.ridge``): no eigendecomposition."""
    device = mu_w.device
    weights = torch.stack(list(R.bootstrap_weights(rows.n, members, seed))).to(device)  # [M, N]
    out = [(mu_w.clone(), mu_b.clone()) for _ in range(members)]
    solved = []
    for cols, idx, t, u, sp in fits:
        alpha = torch.tensor([chosen[names[c]] for c in cols], dtype=torch.float64, device=device)
        w = weights[:, idx]
        if R.use_dual(len(idx), rows.d):
            x = torch.cat([x.double() for x, _, _ in chunks_of(rows, idx, t)()])
            w_rows, w_bias, how = R.member_rows_dual(x, t, w, u, alpha)
        else:
            w_rows, w_bias, how = R.member_rows(sp, chunks_of(rows, idx, t), w, alpha)
        for i, (rows_m, bias_m) in enumerate(out):
            rows_m[cols], bias_m[cols] = w_rows[i], w_bias[i]
        solved.append({"attributes": [names[c] for c in cols], **how})
    return out, solved


def fit_ridge_value_head(features, labels: torch.Tensor, cfg: ValueHeadConfig, names=ATTRIBUTES, log=print) -> Fit:
    """Stage 1 in closed form on features [N, d] (a tensor, or a minibatch source) and labels [N, K] (NaN =
    missing): see the module docstring. Returns the heads, their leave-one-out validation metrics and, in
    ``selection``, every alpha chosen and the criterion that chose it."""

    t0 = time.perf_counter()
    device = resolve_device(cfg.run.device)
    rows, y = as_rows(features, device), labels.to(device, torch.float64)
    n, d, k = rows.n, rows.d, y.shape[1]
    if torch.isnan(y).all():
        raise UserError("the ratings have no labels at all: is this a preference cache? "
                        "Point --ratings-cache at a cache extracted from a ratings dataset")
    every = torch.arange(n, device=device)
    rest, cal = every, every[:0]
    if cfg.calibrate:  # sigma's (a, b) are fitted on these rows' residuals; the means use every row
        rest, cal = split_off(every, round(n * cfg.calibration_fraction), cfg.run.seed)
        rest, cal = rest.sort().values, cal.sort().values
    if cfg.standardize_labels:
        log("note: --standardize-labels does nothing for ridge: its fit (an intercept, alpha by leave-one-out) does "
            "not depend on the labels' scale")
    mu_w, mu_b = torch.zeros(k, d, dtype=torch.float64, device=device), torch.zeros(k, dtype=torch.float64, device=device)
    ls_w, ls_b = torch.zeros_like(mu_w), torch.zeros_like(mu_b)
    resid = torch.full((n, k), float("nan"), dtype=torch.float64, device=device)
    chosen, sigma_alpha, loo_mse, edges, fits, posterior = {}, {}, {}, [], [], []
    for cols, idx in label_groups(y):
        if len(idx) < 3:
            raise UserError(f"{', '.join(names[c] for c in cols)}: {len(idx)} rated rows; ridge needs at least 3")
        t = y[idx][:, cols]
        m, sp, u = decomposed(rows, idx, t, None if cfg.bias else "common direction")
        grid = R.grid_for(sp)
        raw = R.loo_path(sp, m, chunks_of(rows, idx, t), grid)
        path = raw if cfg.ridge_alpha == "per-attribute" else raw.mean(1, keepdim=True).expand(-1, len(cols))
        alpha, _, edge = R.pick(path, grid)  # shared: one alpha for this fit's attributes, by their summed error
        best = raw[path.argmin(0), torch.arange(len(cols), device=raw.device)]  # each attribute's own at its alpha
        w, b = R.ridge_rows(sp, m, alpha)
        r = torch.cat([R.loo_residuals(sp, m, x, tt, alpha) for x, tt, _ in chunks_of(rows, idx, t)()])
        resid[idx[:, None], torch.tensor(cols, device=device)[None, :]] = r
        # sigma: ridge of log r^2 on the rows outside the calibration split, alpha by GCV (the same features)
        own = torch.isin(idx, rest)
        z = R.log_sigma_targets(r[own], LOG_R2_FLOOR)
        ms, sps, _ = decomposed(rows, idx[own], z, u)
        grid_s = R.grid_for(sps)
        alpha_s, _, _ = R.pick(R.gcv_path(sps, ms, grid_s), grid_s)
        lw, lb = R.log_sigma_from(*R.ridge_rows(sps, ms, alpha_s), u)
        for i, c in enumerate(cols):
            mu_w[c], mu_b[c], ls_w[c], ls_b[c] = w[i], b[i], lw[i], lb[i]
            chosen[names[c]], sigma_alpha[names[c]], loo_mse[names[c]] = float(alpha[i]), float(alpha_s[i]), float(best[i])
            if edge[i]:
                edges.append(names[c])
        fits.append((cols, idx, t, u, sp))
        posterior.append((cols, R.posterior_factor(sp, alpha, best)))  # epistemic: s_k^2 the leave-one-out MSE
    if edges:
        log(f"note: the ridge alpha of {', '.join(edges)} lies at the edge of its grid (relative "
            f"{R.ALPHA_GRID[0]:.0e}..{R.ALPHA_GRID[-1]:.0e} of the Gram's mean eigenvalue): the features hardly "
            "predict it, or the grid is too narrow")
    u_all = fits[0][3]
    before = after = None
    fitted: dict = {}
    if cfg.calibrate:
        y_cal = y[cal]  # leave-one-out predictions below: means fitted without these rows (0 where unlabelled)
        mu_cal = torch.where(torch.isnan(y_cal), torch.zeros_like(y_cal), y_cal - resid[cal])
        ls0 = predict_rows(rows, cal, ls_w, ls_b)
        const = predict_rows(rows, cal, u_all[None], torch.zeros(1, dtype=torch.float64, device=device))[:, 0] \
            if u_all is not None else torch.ones(len(cal), dtype=torch.float64, device=device)
        a, b_ = fit_scale_offset(mu_cal[None].float(), ls0[None].float(), const.float(), y[cal].float())
        a, b_ = a[0].double().to(device), b_[0].double().to(device)
        before = interval_metrics(mu_cal, ls0, y[cal], names)
        ls_w, ls_b = scale_offset(ls_w, ls_b, a, b_, u_all)
        after = interval_metrics(mu_cal, a * ls0 + b_ * const[:, None], y[cal], names)
        fitted = {"score": {"a": [a.tolist()], "b": [b_.tolist()]}}
        log(f"sigma calibrated on the leave-one-out residuals of {len(cal)} held-out rows: 90% coverage "
            f"{before['coverage90']:.3f} -> {after['coverage90']:.3f}, NLL {before['nll']:.3f} -> {after['nll']:.3f}")
    members = cfg.ensemble
    member_mu, solved = bootstrap_members(rows, fits, members, cfg.run.seed, chosen, names, mu_w, mu_b) \
        if members > 1 else ([], [])
    heads = build_ridge_heads(d, k, mu_w, mu_b, ls_w, ls_b, member_mu, cfg.bias, posterior).to(device)
    if not all(bool(torch.isfinite(t).all()) for t in heads.state_dict().values()):
        raise UserError("the closed-form value head came out with non-finite weights (features that are constant, or "
                        "labels that are?): nothing was saved; check the ratings cache with `urm cache info`")
    order = [a for a in names if a in chosen]  # the attributes' own order, whatever the label groups were
    chosen, sigma_alpha, loo_mse = ({a: dct[a] for a in order} for dct in (chosen, sigma_alpha, loo_mse))
    labelled = ~torch.isnan(y)
    mu_loo = torch.where(labelled, y - resid, torch.zeros_like(y))
    ls_all = predict_rows(rows, every, ls_w, ls_b)
    val = {**M.regression_report(mu_loo, ls_all, torch.where(labelled, y, torch.nan), names),
           "estimate": "leave-one-out over every rated row (sigma as calibrated)"}
    seconds = time.perf_counter() - t0
    selection = {"solver": "ridge (closed form)", "criterion": "exact leave-one-out MSE",
                 "alpha_is": ("one alpha shared by the attributes (their summed leave-one-out error)"
                              if cfg.ridge_alpha == "shared" else "one alpha per attribute"),
                 "alpha": chosen, "loo_mse": loo_mse, "sigma_alpha (GCV of log r^2)": sigma_alpha,
                 "alpha_grid": [float(R.ALPHA_GRID[0]), float(R.ALPHA_GRID[-1]), len(R.ALPHA_GRID),
                                "x the Gram's mean eigenvalue"],
                 "at_grid_edge": edges, "intercept": "exact bias" if cfg.bias else "along the common direction u",
                 "rows": n, "calibration_rows": len(cal), "members": members,
                 "members_are": "bootstrap resamples of the rows" if members > 1 else None,
                 "decomposition": sorted({"dual (n x n)" if R.use_dual(len(idx), d) else "primal (d x d)"
                                          for _, idx, _, _, _ in fits}),
                 "members_solved_by": solved, "seconds": seconds}
    shown = (f"alpha {next(iter(chosen.values())):.3g} (shared)" if len(set(chosen.values())) == 1 and len(chosen) > 1
             else "alpha " + ", ".join(f"{a} {v:.3g}" for a, v in chosen.items()))
    log(f"value head (ridge): {shown}; leave-one-out MSE "
        f"{val['mse']:.4f}, Pearson r {val['pearson']:.3f}" + (f"; {members} bootstrap members" if members > 1 else "")
        + f"  {seconds:.1f}s")
    scaling = LabelScaling(False, [0.0] * k, [1.0] * k)
    calibration = (SigmaCalibration("calibrated", "ridge", len(cal), before, after, fitted) if cfg.calibrate else
                   SigmaCalibration("as trained", "ridge", 0, {}, {}))
    history = [{"epoch": 0, "seconds": seconds, "examples_per_s": n / seconds if seconds else None}]
    return Fit(heads, history, val, [], scaling, calibration, selection)


def build_ridge_heads(d: int, k: int, mu_w, mu_b, ls_w, ls_b, member_mu: list, bias: bool,
                      posterior: list | None = None) -> Heads:
    """``Heads`` with the closed-form rows: ``score`` the full fit, ``ensemble`` the bootstrap members' means (each
    with the full fit's calibrated sigma rows: the members differ in what they know, not in the noise), and
    ``posterior`` each label group's (attribute columns, ``R.posterior_factor``) as its ridge posterior."""
    members = max(1, len(member_mu))
    groups = [{"attributes": cols, "rank": f["basis"].shape[1], "direction": f["direction"] is not None}
              for cols, f in posterior or []]
    heads = Heads(d, k, members, bias=bias, posterior=groups or None)
    with torch.no_grad():
        for module, (_, factor) in zip(heads.posterior or [], posterior or []):
            for name, value in factor.items():
                if value is not None:
                    getattr(module, name).copy_(value.float())
        heads.score.weight.copy_(R.interleave(mu_w, ls_w).float())
        if bias:
            heads.score.bias.copy_(R.interleave(mu_b[:, None], ls_b[:, None]).flatten().float())
        if members > 1:
            heads.ensemble.weight.copy_(torch.stack([R.interleave(w, ls_w) for w, _ in member_mu]).float())
            if bias:
                heads.ensemble.bias.copy_(torch.stack([R.interleave(b[:, None], ls_b[:, None]).flatten()
                                                       for _, b in member_mu]).float())
    return heads
