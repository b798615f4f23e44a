"""`urm curate`'s report as a person reads it: report.md (how many pairs, suspects, kept; or the pairs selected
for labelling) and one PNG plot: the distribution of P(chosen better) with the suspect threshold, and of the
ranking signal with the keep rule's cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write, write_text
from pipeline.eval.curation import SIGNAL_ABOUT

PLOT = "p_chosen.png"


def curation_markdown(summary: dict) -> str:
    """report.md of a curation or a selection (``summary`` from the recipe: counts, the rule, its thresholds)."""
    n, signal = summary["pairs"], summary["signal"]
    why = [f"{summary['dropped']} dropped as too long"] if summary.get("dropped") else []
    why += [f"{summary['identical']} dropped as read: chosen identical to rejected"] if summary.get("identical") else []
    dropped = f" ({'; '.join(why)})" if why else ""
    lines = [f"# urm curate: {summary['input']}", "", f"Model: `{summary['model']}`. Pairs scored: {n}{dropped}.", ""]
    if summary["mode"] == "select":
        low, high = summary["uncertainty_range"]
        lines += [f"Selected for labelling: the {summary['selected']} pairs whose preference the model is least sure "
                  f"of, by `{signal}` ({SIGNAL_ABOUT[signal]}; uncertainty {low:.3f} to {high:.3f} among them).", "",
                  f"![P(A better)]({PLOT})", ""]
        return "\n".join(lines)
    rule, cut = summary["rule"], summary.get("cut")
    where = f"; the keep rule cut at {cut:.4f}" if cut is not None else ""
    lines += ["| | pairs | share |", "|---|---:|---:|", f"| scored | {n} | 1.000 |",
              f"| suspect (P(chosen) < {summary['suspect_threshold']:.3g}) | {summary['suspects']} | "
              f"{summary['suspects'] / n:.3f} |",
              f"| kept ({rule}) | {summary['kept']} | {summary['kept'] / n:.3f} |", "",
              f"Rule: {rule}. Ranking signal: `{signal}`, {SIGNAL_ABOUT[signal]}{where}.",
              f"Mean P(chosen) (Bradley-Terry, T = {summary['temperature_bt']:.3g}): {summary['mean_p_chosen']:.3f}; "
              f"the model agrees with {summary['agreement']:.3f} of the labels as given.", "",
              f"![P(chosen)]({PLOT})", "",
              ("`scored.jsonl` holds every pair's numbers; `curated.jsonl` the kept pairs (TRL's conversational "
               "chosen/rejected format, which `urm extract` reads)."), ""]
    return "\n".join(lines)


def curation_plot(path: Path, p_chosen: np.ndarray, kept: np.ndarray | None, threshold: float | None,
                  signal_values: np.ndarray, signal: str, cut: float | None) -> Path:
    """Two histograms: P(chosen) (kept vs dropped, the suspect threshold marked), and the ranking signal (the keep
    rule's cut marked); for a selection, ``kept`` marks the selected pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    mask = np.ones(len(p_chosen), dtype=bool) if kept is None else kept
    names = ("selected", "not selected") if threshold is None else ("kept", "dropped")
    for ax, values, bins, label in ((axes[0], p_chosen, np.linspace(0, 1, 41), "P(chosen better), Bradley-Terry"),
                                    (axes[1], signal_values, 40, f"signal: {signal}")):
        ax.hist([values[mask], values[~mask]], bins=bins, stacked=True, label=list(names),
                color=["tab:blue", "tab:gray"])
        ax.set_xlabel(label)
        ax.set_ylabel("pairs")
    if threshold is not None:
        axes[0].axvline(threshold, color="tab:red", linestyle="--", label=f"suspect below {threshold}")
    if cut is not None:
        axes[1].axvline(cut, color="tab:orange", linestyle="--", label=f"keep cut {cut:.3g}")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def write_curation_report(folder: Path, summary: dict) -> Path:
    return write_text(folder / "report.md", curation_markdown(summary))
