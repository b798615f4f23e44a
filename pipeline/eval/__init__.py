"""Evaluation: a model's outputs on held-out caches -> accuracy, calibration and uncertainty, beside baselines.

  evaluation  ``Scores`` and ``Candidate``; pair, attribute and uncertainty-signal metrics (docs/method.md 6)
  baselines   the models `urm evaluate` fits beside the heads on the same training caches
  comparison  every model on every held-out cache: the metrics per model, the main model's curves
  report      report.md, report.json and the plots
  curation    `urm curate`'s math: per-pair judgements, suspects, the keep rule, the pairs to label next
  curation_report  its report.md and plot

Imports the cross-cutting modules, ``pipeline.model`` and ``pipeline.train`` (baselines are trained).

A config is the caller's: a function here takes the one a recipe hands it (``ValueHeadConfig`` / ``GatingConfig`` from ``pipeline.configs``, for
the baselines) and reads its fields. This stage never imports ``pipeline.configs``, not even for types:
the configs import the stages' lists of allowed values, and that way alone (tests/test_layout.py).
"""

from pipeline.eval.baselines import (HeadsRecipe, TrainingCaches, armorm, base_score, equal_weights, fit_baselines,
                                     heads_candidate, heads_scores, linear_probe, ridge_value_head, urm_variant,
                                     variants, with_temperatures)
from pipeline.eval.comparison import compare
from pipeline.eval.curation import (SIGNALS, certainty, check_signal, judge_pairs, keep_cut, kept_pairs, least_certain,
                                    suspects, uncertainty)
from pipeline.eval.curation_report import curation_markdown, curation_plot, write_curation_report
from pipeline.eval.evaluation import (Candidate, Scores, attribute_metrics, chosen_probabilities, pair_metrics,
                                      rewardbench_sections, row_signals, shift_metrics, uncertainty_signals)
from pipeline.eval.report import (attributes_plot, attributes_table, chosen_lines, is_report_file, pairs_table,
                                  reliability_plot,
                                  reliability_points, shift_caches, shift_table, write_report)

__all__ = [
    "SIGNALS", "certainty", "check_signal", "curation_markdown", "curation_plot", "judge_pairs", "keep_cut",
    "kept_pairs", "least_certain", "suspects", "uncertainty", "write_curation_report",
    "Candidate", "HeadsRecipe", "Scores", "TrainingCaches", "armorm", "compare", "fit_baselines", "variants", "attribute_metrics", "attributes_plot", "attributes_table", "base_score",
    "chosen_lines", "chosen_probabilities", "equal_weights", "heads_candidate", "heads_scores", "is_report_file",
    "linear_probe", "pair_metrics",
    "pairs_table", "reliability_plot", "reliability_points", "rewardbench_sections", "shift_caches", "shift_table", "ridge_value_head", "row_signals", "shift_metrics",
    "uncertainty_signals", "urm_variant", "with_temperatures", "write_report",
]
