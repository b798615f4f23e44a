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

import dataclasses
import logging
import math
import time

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


logger = logging.getLogger(__name__)

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


def decomposed(rows, idx: torch.Tensor, t: torch.Tensor, u,
               gram: torch.Tensor | None = None) -> tuple[R.Moments, R.Spectrum, torch.Tensor | None]:
    """(moments, spectrum, u) of the ridge fit of targets ``t`` on the samples ``idx``: the n x n dual when they are
    fewer than the features (their rows held, float64), else the d x d Gram (``gram``, when the caller has it:
    then the pass over the rows sums only the rest). ``u``: the intercept's direction, "common direction" to take
    the rows' own (``R.common_direction``), or None for a plain bias."""
    dual = R.use_dual(len(idx), rows.d)
    m = R.moments(chunks_of(rows, idx, t)(), gram=not dual and gram is None)
    if not dual and gram is not None:
        m.gram = gram
    if isinstance(u, str):
        u = R.common_direction(m)
    if dual:
        x = torch.cat([x.double() for x, _, _ in chunks_of(rows, idx, t)()])
        return m, R.dual_spectrum(x, u), u
    return m, R.spectrum(m, u), u


def gram_of(rows, idx: torch.Tensor) -> torch.Tensor:
    """sum x xᵀ [d, d] over the samples ``idx``, in float64."""
    return R.moments(chunks_of(rows, idx, torch.zeros(len(idx), 1, dtype=torch.float64))()).gram


@dataclasses.dataclass
class GroupFit:
    """One label group's closed-form fit (``fit_label_group``): the means by ridge with alpha by exact leave-one-out,
    sigma by ridge of the log squared leave-one-out residuals with alpha by GCV. Rows of weights are one per
    attribute of the group, in ``columns`` order."""

    columns: list[int]  # the attributes (indices into the labels) sharing this label pattern
    rows: torch.Tensor  # [n] the samples labelled for them
    targets: torch.Tensor  # [n, len(columns)] their labels, float64
    direction: torch.Tensor | None  # u: the intercept's direction (None: a plain bias)
    spectrum: R.Spectrum  # of the means' fit (the bootstrap members are solved with it)
    alpha: torch.Tensor  # the means' ridge alpha per attribute
    loo_mse: torch.Tensor  # each attribute's leave-one-out MSE at its own alpha
    at_edge: list[bool]  # whether its alpha lies at the edge of the grid
    mean_weight: torch.Tensor  # [len(columns), d] the mean rows
    mean_bias: torch.Tensor  # [len(columns)]
    residuals: torch.Tensor  # [n, len(columns)] the leave-one-out residuals of the means
    sigma_alpha: torch.Tensor  # the log r^2 ridge's alpha per attribute (by GCV)
    log_sigma_weight: torch.Tensor  # [len(columns), d] the log-sigma rows, before calibration
    log_sigma_bias: torch.Tensor  # [len(columns)]
    posterior: dict  # ``R.posterior_factor``: the ridge posterior (epistemic; s_k^2 the leave-one-out MSE)


@dataclasses.dataclass
class SigmaFit:
    """The calibration of the log-sigma rows on the calibration rows' own leave-one-out residuals
    (``calibrate_sigma``): the rows after it, the interval metrics before and after, and the fitted (a, b)."""

    log_sigma_weight: torch.Tensor
    log_sigma_bias: torch.Tensor
    before: dict
    after: dict
    fitted: dict


def bootstrap_members(rows, groups: list[GroupFit], members: int, seed: int, names, mu_w, mu_b):
    """The ``members`` bootstrap refits at the full fit's alphas: (one (rows [K, d], bias [K]) per member, how each
    label group's were solved). A group of fewer rows than features is solved in the n x n dual, else by conjugate
    gradients preconditioned by its full fit's eigenpairs (``pipeline.train.ridge``): no eigendecomposition."""
    device = mu_w.device
    weights = torch.stack(list(R.bootstrap_weights(rows.n, members, seed))).to(device)  # [M, N]
    out = [(mu_w.clone(), mu_b.clone()) for _ in range(members)]
    solved = []
    for g in groups:
        cols, idx, t = g.columns, g.rows, g.targets
        alpha = torch.tensor([float(a) for a in g.alpha], dtype=torch.float64, device=device)
        w = weights[:, idx]
        if R.use_dual(len(idx), rows.d):
            x = torch.cat([x.double() for x, _, _ in chunks_of(rows, idx, t)()])
            w_rows, w_bias, how = R.member_rows_dual(x, t, w, g.direction, alpha)
        else:
            w_rows, w_bias, how = R.member_rows(g.spectrum, chunks_of(rows, idx, t), w, alpha)
        for i, (rows_m, bias_m) in enumerate(out):
            rows_m[cols], bias_m[cols] = w_rows[i], w_bias[i]
        solved.append({"attributes": [names[c] for c in cols], **how})
    return out, solved


def calibration_split(n: int, cfg, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rows sigma's ridge is fitted on, the calibration rows sigma's (a, b) are fitted on), each sorted; every row
    and none without ``cfg.calibrate``. The means use every row either way."""
    every = torch.arange(n, device=device)
    if not cfg.calibrate:
        return every, every[:0]
    rest, cal = split_off(every, round(n * cfg.calibration_fraction), cfg.run.seed)
    return rest.sort().values, cal.sort().values


def fit_label_group(rows, y: torch.Tensor, columns: list[int], labelled: torch.Tensor, sigma_rows: torch.Tensor,
                    cfg) -> GroupFit:
    """The means and the (uncalibrated) log-sigma rows of the attributes ``columns``, on their ``labelled`` rows;
    sigma's ridge sees only those of them in ``sigma_rows`` (the calibration rows are kept for its (a, b))."""
    t = y[labelled][:, columns]
    m, sp, u = decomposed(rows, labelled, t, None if cfg.bias else "common direction")
    grid = R.grid_for(sp)
    raw, leverages = R.loo_path(sp, m, chunks_of(rows, labelled, t), grid, leverages=True)
    path = raw if cfg.ridge_alpha == "per-attribute" else raw.mean(1, keepdim=True).expand(-1, len(columns))
    alpha, _, at_edge = R.pick(path, grid)  # shared: one alpha for this fit's attributes, by their summed error
    at = path.argmin(0)
    loo_mse = raw[at, torch.arange(len(columns), device=raw.device)]  # each attribute's own at its alpha
    w, b = R.ridge_rows(sp, m, alpha)
    residuals = R.loo_residuals_from(t, predict_rows(rows, labelled, w, b), leverages[at].T)
    # sigma: ridge of log r^2 on the rows outside the calibration split, alpha by GCV (the same features; their
    # Gram is the full one less the calibration rows', a pass over those few rather than over the rest)
    own = torch.isin(labelled, sigma_rows)
    log_r2 = R.log_sigma_targets(residuals[own], LOG_R2_FLOOR)
    gram = None if m.gram is None or own.all() else m.gram - gram_of(rows, labelled[~own])
    sigma_moments, sigma_spectrum, _ = decomposed(rows, labelled[own], log_r2, u, gram)
    sigma_grid = R.grid_for(sigma_spectrum)
    sigma_alpha, _, _ = R.pick(R.gcv_path(sigma_spectrum, sigma_moments, sigma_grid), sigma_grid)
    lw, lb = R.log_sigma_from(*R.ridge_rows(sigma_spectrum, sigma_moments, sigma_alpha), u)
    return GroupFit(columns, labelled, t, u, sp, alpha, loo_mse, at_edge, w, b, residuals, sigma_alpha, lw, lb,
                    R.posterior_factor(sp, alpha, loo_mse))


def calibrate_sigma(rows, y: torch.Tensor, residuals: torch.Tensor, cal: torch.Tensor, ls_w: torch.Tensor,
                    ls_b: torch.Tensor, direction: torch.Tensor | None, names) -> SigmaFit:
    """log sigma <- a log sigma + b u.h (``pipeline.train.calibration``) fitted on the calibration rows ``cal``,
    against the leave-one-out predictions of their means (``residuals`` [N, K] of every row)."""
    device = y.device
    y_cal = y[cal]  # leave-one-out predictions below: means fitted without these rows (0 where unlabelled)
    mu_cal = torch.where(torch.isnan(y_cal), torch.zeros_like(y_cal), y_cal - residuals[cal])
    ls_before = predict_rows(rows, cal, ls_w, ls_b)
    const = predict_rows(rows, cal, direction[None], torch.zeros(1, dtype=torch.float64, device=device))[:, 0] \
        if direction is not None else torch.ones(len(cal), dtype=torch.float64, device=device)
    scale, offset = fit_scale_offset(mu_cal[None].float(), ls_before[None].float(), const.float(), y_cal.float())
    scale, offset = scale[0].double().to(device), offset[0].double().to(device)
    before = interval_metrics(mu_cal, ls_before, y_cal, names)
    ls_w, ls_b = scale_offset(ls_w, ls_b, scale, offset, direction)
    after = interval_metrics(mu_cal, scale * ls_before + offset * const[:, None], y_cal, names)
    return SigmaFit(ls_w, ls_b, before, after, {"score": {"a": [scale.tolist()], "b": [offset.tolist()]}})


def leave_one_out_report(rows, y: torch.Tensor, residuals: torch.Tensor, ls_w: torch.Tensor, ls_b: torch.Tensor,
                         names) -> dict:
    """The validation metrics: each rated row's leave-one-out mean against its label, with sigma as calibrated."""
    labelled = ~torch.isnan(y)
    mu_loo = torch.where(labelled, y - residuals, torch.zeros_like(y))
    ls_all = predict_rows(rows, torch.arange(rows.n, device=y.device), ls_w, ls_b)
    return {**M.regression_report(mu_loo, ls_all, torch.where(labelled, y, torch.nan), names),
            "estimate": "leave-one-out over every rated row (sigma as calibrated)"}


def fit_ridge_value_head(features, labels: torch.Tensor, cfg, names=ATTRIBUTES) -> Fit:
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
    sigma_rows, cal = calibration_split(n, cfg, device)
    if cfg.standardize_labels:
        logger.info("note: --standardize-labels does nothing for ridge: its fit (an intercept, alpha by leave-one-out) "
                    "does not depend on the labels' scale")
    groups = []
    for columns, labelled in label_groups(y):
        if len(labelled) < 3:
            raise UserError(f"{', '.join(names[c] for c in columns)}: {len(labelled)} rated rows; ridge needs at least 3")
        groups.append(fit_label_group(rows, y, columns, labelled, sigma_rows, cfg))
    mu_w, mu_b = torch.zeros(k, d, dtype=torch.float64, device=device), torch.zeros(k, dtype=torch.float64, device=device)
    ls_w, ls_b = torch.zeros_like(mu_w), torch.zeros_like(mu_b)
    residuals = torch.full((n, k), float("nan"), dtype=torch.float64, device=device)
    for g in groups:
        residuals[g.rows[:, None], torch.tensor(g.columns, device=device)[None, :]] = g.residuals
        mu_w[g.columns], mu_b[g.columns] = g.mean_weight, g.mean_bias
        ls_w[g.columns], ls_b[g.columns] = g.log_sigma_weight, g.log_sigma_bias
    by_attribute = {names[c]: (g, i) for g in groups for i, c in enumerate(g.columns)}
    order = [a for a in names if a in by_attribute]  # the attributes' own order, whatever the label groups were
    alpha, sigma_alpha, loo_mse = ({a: float(getattr(by_attribute[a][0], field)[by_attribute[a][1]]) for a in order}
                                   for field in ("alpha", "sigma_alpha", "loo_mse"))
    edges = [names[c] for g in groups for i, c in enumerate(g.columns) if g.at_edge[i]]
    if edges:
        logger.info(f"note: the ridge alpha of {', '.join(edges)} lies at the edge of its grid (relative "
                    f"{R.ALPHA_GRID[0]:.0e}..{R.ALPHA_GRID[-1]:.0e} of the Gram's mean eigenvalue): the features "
                    "hardly predict it, or the grid is too narrow")
    sigma = None
    if cfg.calibrate:
        sigma = calibrate_sigma(rows, y, residuals, cal, ls_w, ls_b, groups[0].direction, names)
        ls_w, ls_b = sigma.log_sigma_weight, sigma.log_sigma_bias
        logger.info(f"sigma calibrated on the leave-one-out residuals of {len(cal)} held-out rows: 90% coverage "
                    f"{sigma.before['coverage90']:.3f} -> {sigma.after['coverage90']:.3f}, NLL "
                    f"{sigma.before['nll']:.3f} -> {sigma.after['nll']:.3f}")
    members = cfg.ensemble
    member_mu, solved = bootstrap_members(rows, groups, members, cfg.run.seed, names, mu_w, mu_b) \
        if members > 1 else ([], [])
    posterior = [(g.columns, g.posterior) for g in groups]
    heads = build_ridge_heads(d, k, mu_w, mu_b, ls_w, ls_b, member_mu, cfg.bias, posterior).to(device)
    if not all(bool(torch.isfinite(t).all()) for t in heads.state_dict().values()):
        raise UserError("the closed-form value head came out with non-finite weights (features that are constant, or "
                        "labels that are?): nothing was saved; check the ratings cache with `urm cache info`")
    val = leave_one_out_report(rows, y, residuals, ls_w, ls_b, names)
    if untrustworthy := sigma_warning(val, n, d):
        val["sigma_warning"] = untrustworthy
        logger.warning(f"warning: {untrustworthy}")
    seconds = time.perf_counter() - t0
    selection = {"solver": "ridge (closed form)", "criterion": "exact leave-one-out MSE",
                 "alpha_is": ("one alpha shared by the attributes (their summed leave-one-out error)"
                              if cfg.ridge_alpha == "shared" else "one alpha per attribute"),
                 "alpha": alpha, "loo_mse": loo_mse, "sigma_alpha (GCV of log r^2)": sigma_alpha,
                 "alpha_grid": [float(R.ALPHA_GRID[0]), float(R.ALPHA_GRID[-1]), len(R.ALPHA_GRID),
                                "x the Gram's mean eigenvalue"],
                 "at_grid_edge": edges, "intercept": "exact bias" if cfg.bias else "along the common direction u",
                 "rows": n, "calibration_rows": len(cal), "members": members,
                 "members_are": "bootstrap resamples of the rows" if members > 1 else None,
                 "decomposition": sorted({"dual (n x n)" if R.use_dual(len(g.rows), d) else "primal (d x d)"
                                          for g in groups}),
                 "members_solved_by": solved, "seconds": seconds}
    shown = (f"alpha {next(iter(alpha.values())):.3g} (shared)" if len(set(alpha.values())) == 1 and len(alpha) > 1
             else "alpha " + ", ".join(f"{a} {v:.3g}" for a, v in alpha.items()))
    logger.info(f"value head (ridge): {shown}; leave-one-out MSE {val['mse']:.4f}, Pearson r {val['pearson']:.3f}"
                + (f"; {members} bootstrap members" if members > 1 else "") + f"  {seconds:.1f}s")
    scaling = LabelScaling(False, [0.0] * k, [1.0] * k)
    calibration = (SigmaCalibration("calibrated", "ridge", len(cal), sigma.before, sigma.after, sigma.fitted)
                   if sigma else SigmaCalibration("as trained", "ridge", 0, {}, {}))
    history = [{"epoch": 0, "seconds": seconds, "examples_per_s": n / seconds if seconds else None}]
    return Fit(heads, history, val, [], scaling, calibration, selection)


def sigma_warning(val: dict, n: int, d: int) -> str | None:
    """What is wrong with the fitted sigma, judged on the leave-one-out errors of every rated row, or None: a NLL that
    is not finite, or a mean sigma over 10x the errors' RMS. It happens with few rated rows (a sigma that varies
    with h then follows each row's own residual, and its calibration has a handful of rows to go on).

    >>> sigma_warning({"nll": 1.2, "mean_sigma": 0.7, "mse": 0.5}, 400, 576) is None
    True
    >>> sigma_warning({"nll": 7e77, "mean_sigma": 6.2e18, "mse": 0.41}, 24, 4096)[:46]
    'sigma is not to be trusted: mean sigma 6.2e+18'
    """
    rms = math.sqrt(val["mse"]) if val.get("mse") is not None else math.nan
    nll, sigma = val.get("nll"), val.get("mean_sigma")
    if nll is None or sigma is None or (math.isfinite(nll) and math.isfinite(sigma) and sigma <= 10 * rms):
        return None
    return (f"sigma is not to be trusted: mean sigma {sigma:.2g} against a leave-one-out error RMS of {rms:.3g}, NLL "
            f"{nll:.3g}, on {n} rated rows of {d} features (too few for a sigma that varies with h): score_std and "
            "every P(A better) from these heads are meaningless; rate more rows")


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
