"""The evaluation report as a person reads it: report.md (the tables first), and PNG plots (matplotlib):
the reliability diagram of P(chosen), accuracy against coverage for each uncertainty signal, and
predicted against true ratings per attribute with the 90% intervals. report.json holds every number.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write, write_json, write_text

SIGNAL_ABOUT = {
    "score_gap": "-|s_c - s_r|: how close the two scores are (any reward model has it)",
    "score_std": "sqrt(Var_c + Var_r): the Gaussian std of the score difference",
    "gaussian_p": "1 - max(P, 1 - P) of the Gaussian P(chosen)",
    "ensemble_std": "std over the ensemble members of s_c - s_r",
    "ensemble_range": "max - min over the members of s_c - s_r (URME's signal)",
    "ensemble_z": "-|mean d| / std(d) over the members: the gap in units of the members' disagreement",
    "epistemic_std": "sqrt(e_c^2 + e_r^2) of the ridge posterior's stds of the two scores (epistemic, closed form)",
}
ROW_SIGNAL_ABOUT = {
    "score_std": "sqrt(sum_k w_k^2 sigma_k^2) (aleatoric: the noise of the ratings)",
    "mean_sigma": "the mean of the attributes' sigma (aleatoric)",
    "ensemble_std": "the members' std of the score (epistemic: what the training data did not pin down)",
    "epistemic_std": "the ridge posterior's std of the score (epistemic, closed form: grows off the training rows)",
}


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]


def best_signal(pairs: dict) -> tuple[str, dict]:
    """The signal with the highest AUROC (NaN counts as 0.5: no better than chance)."""
    def key(item):
        a = item[1]["auroc"]
        return 0.5 if a is None or math.isnan(a) else a

    return max(pairs["signals"].items(), key=key)


def pairs_table(models: list[dict], dataset: str) -> list[str]:
    """One row per model on one preference dataset: accuracy, calibration, the best uncertainty signal."""
    sections = sorted({s for m in models for s in m["pairs"][dataset].get("rewardbench_sections", {})})
    header = ["model", "accuracy", *sections, "ECE", "ECE if calibrated", "Brier", "ECE Gauss.", "best signal",
              "AUROC", "acc@50%", "AURC"]
    rows = []
    for m in models:
        p = m["pairs"][dataset]
        name, signal = best_signal(p)
        cal = p["calibration"]
        rows.append([m["name"], p["accuracy"], *[p.get("rewardbench_sections", {}).get(s) for s in sections],
                     cal["ece"], cal["ece_if_calibrated"], cal["brier"], cal.get("ece_gaussian"), name, signal["auroc"],
                     signal["accuracy_at_50"], signal["aurc"]])
    return _table(header, rows)


def signals_table(pairs: dict) -> list[str]:
    rows = [[name, s["auroc"], s["accuracy_at_50"], s["accuracy_at_80"], s["accuracy_at_100"], s["aurc"]]
            for name, s in pairs["signals"].items()]
    return _table(["signal", "AUROC (wrong pairs)", "acc @ 50%", "acc @ 80%", "acc @ 100%", "AURC"], rows)


def attributes_table(models: list[dict]) -> list[str]:
    rows = [[m["name"], a["mse"], a["pearson"], a["spearman"], a.get("nll"), a.get("coverage50"), a.get("coverage90"),
             a["means_outside_label_range"]] for m in models if (a := m.get("attributes"))]
    return _table(["model", "MSE", "Pearson r", "Spearman r", "NLL", "cov 50%", "cov 90%", "means outside 0-4"], rows)


def shift_table(models: list[dict], cache: str) -> list[str]:
    """One row per model that states per-row uncertainty: how each signal separates the other source's rows from the
    held-out rows of the training source (AUROC, 0.5 = it cannot tell), and the intervals on a rated other source."""
    rows = []
    for m in models:
        s = m.get("shift", {}).get(cache)
        if not s:
            continue
        a = s.get("attributes") or {}
        rows.append([m["name"], s["rows"], s["auroc"].get("score_std"), s["auroc"].get("mean_sigma"),
                     s["auroc"].get("ensemble_std"), s["auroc"].get("epistemic_std"), a.get("mse"), a.get("nll"),
                     a.get("coverage90")])
    return _table(["model", "rows", "AUROC score_std", "AUROC mean_sigma", "AUROC ensemble_std", "AUROC epistemic_std",
                   "MSE there", "NLL there", "cov 90% there"], rows)


def shift_caches(models: list[dict]) -> list[str]:
    return sorted({c for m in models for c in m.get("shift", {})})


def chosen_lines(chosen: dict) -> list[str]:
    """What training chose by itself (heads.json), a line each: the value head's alphas, the gate and why."""
    lines = []
    value = chosen.get("value_head") or {}
    if value.get("alpha"):
        alphas = value["alpha"]
        shared = len(set(alphas.values())) == 1 and len(alphas) > 1
        what = (f"alpha {next(iter(alphas.values())):.3g} shared by the attributes" if shared else
                "alpha " + ", ".join(f"{a} {v:.3g}" for a, v in alphas.items()))
        lines.append(f"- value head: {value['solver']}, {what}, by {value['criterion']} (per attribute: " + ", ".join(
            f"{a} {v:.3f}" for a, v in value["loo_mse"].items()) + ")"
            + (f"; at the grid's edge: {', '.join(value['at_grid_edge'])}" if value.get("at_grid_edge") else "")
            + (f"; {value['members']} members ({value['members_are']})" if value.get("members", 1) > 1 else ""))
    gate = chosen.get("gating") or {}
    if gate.get("chosen"):
        cands = ", ".join(f"{k} {v['bt_loss_tempered']:.4f} (acc {v['accuracy']:.3f})" for k, v in gate["candidates"].items())
        lines.append(f"- gate: **{gate['chosen']}**, by {gate['protocol']} ({gate['criterion']}: {cands})")
        lines += [f"  - {r}" for r in gate["reasons"]]
    return lines


def per_attribute_table(attributes: dict) -> list[str]:
    rows = [[name, a["mse"], a["pearson"], a["spearman"], a.get("nll"), a.get("mean_sigma"), a.get("coverage50"),
             a.get("coverage90")] for name, a in attributes["per_attribute"].items()]
    return _table(["attribute", "MSE", "Pearson r", "Spearman r", "NLL", "mean sigma", "cov 50%", "cov 90%"], rows)


def markdown(report: dict) -> str:
    models, main = report["models"], report["models"][0]
    lines = ["# Evaluation", "", f"Heads: `{report['heads']}` (backbone `{report['backbone']}`). "
             f"Generated by `urm evaluate`; every number is in report.json.", ""]
    for dataset, info in report["eval"]["preferences"].items():
        lines += [f"## Pairs: {dataset} ({info['pairs']} pairs, `{info['path']}`)", "", *pairs_table(models, dataset), "",
                  f"Uncertainty signals of {main['name']}:", "", *signals_table(main["pairs"][dataset]), ""]
    if report["eval"].get("ratings"):
        info = report["eval"]["ratings"]
        lines += [f"## Attributes: {info['rows']} rated rows (`{info['path']}`)", "", *attributes_table(models), "",
                  f"Per attribute, {main['name']}:", "", *per_attribute_table(main["attributes"]), ""]
    for cache in shift_caches(models):
        ref = report["eval"]["ratings"]
        lines += [f"## Off its data? {cache} against the held-out ratings ({ref['rows']} rows of the training source)", "",
                  *shift_table(models, cache), ""]
    if chosen_lines(report.get("chosen") or {}):
        lines += ["## Chosen automatically (recorded in heads.json)", "", *chosen_lines(report["chosen"]), ""]
    lines += ["## Models", ""] + [f"- **{m['name']}**: {m['about']} (T_bt {_f(m['temperature_bt'])}, T_gauss "
                                   f"{_f(m['temperature_gaussian'])})" for m in models]
    lines += ["", "## What the columns mean", "",
              "- accuracy: share of pairs whose chosen response scores higher (a tie counts as wrong); RewardBench "
              "sections: the example-weighted mean accuracy of their subsets, as RewardBench computes them.",
              "- ECE: expected calibration error of P(chosen) = sigmoid((s_c - s_r) / T_bt), 20 equal bins, each "
              "pair counted in both orders; ECE if calibrated: the ECE these predictions would still show were "
              "they perfectly calibrated (outcomes drawn from P itself, mean of 200 draws): the noise floor on "
              "this many pairs; Brier: mean (1 - P)^2; Gauss.: the same for Phi((s_c - s_r) / "
              "(T_gauss sqrt(Var_c + Var_r))). T is each model's temperature fitted on its own validation pairs.",
              "- AUROC: how well an uncertainty signal ranks the wrong pairs above the right ones (0.5 = chance); "
              "acc@X%: accuracy over the X% of pairs the signal is most certain about; AURC: area under the "
              "risk-coverage curve (mean error rate over coverages, lower is better).",
              *[f"- signal `{k}`: {v}" for k, v in SIGNAL_ABOUT.items()],
              "- attributes: MSE and Pearson / Spearman r of the predicted means; NLL of the Gaussian N(mu, sigma^2); "
              "cov X%: share of labels inside the central X% interval (nominal 0.5 and 0.9); means outside 0-4: "
              "share of predicted means outside the label range.",
              "- off its data: the AUROC with which a per-row uncertainty separates another source's rows (every side "
              "of a held-out pair, or rated rows of another source) from held-out rows of the value head's own source "
              "(0.5: the model cannot tell it is off its data); on a rated other source also MSE, NLL and coverage.",
              *[f"- row signal `{k}`: {v}" for k, v in ROW_SIGNAL_ABOUT.items()], ""]
    return "\n".join(lines)


def reliability_points(p: np.ndarray, n_bins: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted P, observed frequency, count) per non-empty bin, the bins of ``metrics.ece`` (each pair
    counted in both orders): the points of a reliability diagram."""
    import torch

    from pipeline.metrics import reliability_bins

    q, outcome, bins = reliability_bins(torch.as_tensor(np.asarray(p, dtype=np.float64)), n_bins)
    n = torch.bincount(bins, minlength=n_bins)
    ok = n > 0
    predicted = torch.bincount(bins, q, n_bins)[ok] / n[ok]
    observed = torch.bincount(bins, outcome, n_bins)[ok] / n[ok]
    return predicted.numpy(), observed.numpy(), n[ok].numpy()


def reliability_plot(ax, p_bt: np.ndarray, p_gaussian: np.ndarray | None = None, title: str = "Reliability"):
    """The reliability diagram of P(chosen): predicted against observed, under BT and the Gaussians."""
    for label, p in (("BT", p_bt), ("Gaussian", p_gaussian)):
        if p is not None:
            predicted, observed, _ = reliability_points(np.asarray(p))
            ax.plot(predicted, observed, "o-", label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="predicted P", ylabel="observed frequency", title=title)
    ax.legend()


def attributes_plot(names: list[str], y: np.ndarray, mu: np.ndarray, sigma: np.ndarray):
    """Predicted against true rating per attribute, each prediction with its 90% interval (mu +- 1.645 sigma);
    the true labels (integers) jittered sideways. Returns the figure."""
    import matplotlib.pyplot as plt

    k = len(names)
    fig, axes = plt.subplots(1, k, figsize=(3 * k, 3), squeeze=False)
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, size=y.shape)
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        ok = ~np.isnan(y[:, i])
        ax.errorbar(y[ok, i] + jitter[ok, i], mu[ok, i], yerr=1.645 * sigma[ok, i], fmt=".", alpha=0.4, elinewidth=0.5)
        ax.plot([0, 4], [0, 4], "k--", lw=0.8)
        ax.set(title=name, xlabel="true", ylabel="predicted (90% interval)" if i == 0 else None)
    return fig


def plots(report: dict, curves: dict, folder: Path) -> list[str]:
    """The PNGs, from ``curves`` (raw per-pair values of the main model): returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        atomic_write(folder / name, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        written.append(name)

    for dataset, c in curves["pairs"].items():
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        reliability_plot(ax, c["p_bt"], c.get("p_gaussian"), f"Reliability, {dataset}")
        save(fig, f"reliability-{dataset}.png")
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, risk in c["risk"].items():
            ax.plot(np.arange(1, len(risk) + 1) / len(risk), 1 - np.asarray(risk), label=name)
        ax.set(xlabel="coverage (most certain pairs kept)", ylabel="accuracy", title=f"Accuracy vs coverage, {dataset}")
        ax.legend(fontsize=8)
        save(fig, f"coverage-{dataset}.png")
    if curves.get("attributes"):
        a = curves["attributes"]
        save(attributes_plot(a["names"], a["y"], a["mu"], a["sigma"]), "attributes.png")
    return written


def is_report_file(name: str) -> bool:
    """A file name ``write_report`` writes (report.json, report.md, the PNG plots)."""
    return name in ("report.json", "report.md") or name.endswith(".png")


def write_report(report: dict, curves: dict, folder: str | Path) -> dict[str, Path]:
    """report.json, report.md and the plots into ``folder``; returns the paths."""
    folder = Path(folder)
    pngs = plots(report, curves, folder)
    paths = {"json": write_json(folder / "report.json", report), "md": write_text(folder / "report.md", markdown(report))}
    return {**paths, **{name: folder / name for name in pngs}}
