"""Evaluation: a model's outputs on held-out caches -> accuracy, calibration and uncertainty, beside baselines.

  evaluation  ``Scores`` and ``Candidate``; pair, attribute and uncertainty-signal metrics (docs/method.md 6)
  baselines   the models `urm evaluate` fits beside the heads on the same training caches
  comparison  every model on every held-out cache: the metrics per model, the main model's curves
  report      report.md, report.json and the plots
  curation    `urm curate`'s math: per-pair judgements, suspects, the keep rule, the pairs to label next
  curation_rows    what it writes, as rows: scored.jsonl, curated.jsonl or selected.jsonl, the plot's values
  curation_report  its report.md and plot

Imports the cross-cutting modules, ``pipeline.model`` and ``pipeline.train`` (baselines are trained).

A config is the caller's: a function here takes the one a recipe hands it (``ValueHeadConfig`` / ``GatingConfig``
from ``pipeline.configs``, for the baselines) and reads its fields. This stage never imports ``pipeline.configs``,
not even for types: the configs import the stages' lists of allowed values, and that way alone
(tests/test_layout.py).
"""

from pipeline.eval.baselines import (HeadsRecipe, TrainingCaches, fit_baselines, heads_candidate, heads_scores,
                                     linear_probe)
from pipeline.eval.comparison import compare
from pipeline.eval.curation import (SIGNALS, certainty, check_signal, judge_pairs, keep_cut, kept_pairs, least_certain,
                                    suspects, uncertainty)
from pipeline.eval.curation_rows import Curation, JudgedPairs, curated, selected, side_scores
from pipeline.eval.curation_report import PLOT, curation_plot, write_curation_report
from pipeline.eval.evaluation import (Candidate, Scores, attribute_metrics, chosen_probabilities, pair_metrics,
                                      row_signals, shift_metrics, uncertainty_signals)
from pipeline.eval.report import (attributes_plot, attributes_table, chosen_lines, is_report_file, pairs_table,
                                  reliability_plot, reliability_points, shift_caches, shift_table, write_report)

__all__ = [
    "Curation", "JudgedPairs", "PLOT", "curated", "selected", "side_scores",
    "attribute_metrics", "attributes_plot", "attributes_table", "Candidate", "certainty", "check_signal",
    "chosen_lines", "chosen_probabilities", "compare", "curation_plot", "fit_baselines", "heads_candidate",
    "heads_scores", "HeadsRecipe", "is_report_file", "judge_pairs", "keep_cut", "kept_pairs", "least_certain",
    "linear_probe", "pair_metrics", "pairs_table", "reliability_plot", "reliability_points", "row_signals", "Scores",
    "shift_caches", "shift_metrics", "shift_table", "SIGNALS", "suspects", "TrainingCaches", "uncertainty",
    "uncertainty_signals", "write_curation_report", "write_report",
]
