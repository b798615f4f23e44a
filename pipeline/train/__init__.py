"""Training: the two stages' loops on cached features, the losses, and the calibration of what they state.

  losses          reparam / nll / beta-nll (stage 1), Bradley-Terry (stage 2, margin-aware too)
  optimization    seeded splits, AdamW, per-member early stopping
  calibration     sigma refit on held-out rows; pair-probability temperatures
  feature_stream  the trainers' minibatch source: features in memory, or streamed from a cache's parts
  ridge           closed-form ridge from one eigendecomposition, alpha by exact leave-one-out (the math)
  closed_form     stage 1 in closed form (--loss ridge, the default): means, sigma, bootstrap members
  gates           stage 2's gate kinds (equal, global, urm-warm, urm, softmax) and how each is fitted
  gate_selection  --gate auto: the kind cross-validation supports, never one losing to a simpler kind
  fit             ``Fit``: what a stage hands back
  trainers        ``fit_value_head`` (stage 1) and ``fit_gate`` (stage 2)

Imports the cross-cutting modules, ``pipeline.model`` and ``pipeline.cache``.

A config is the caller's: a function here takes the one a recipe hands it (``cfg``: ``ValueHeadConfig`` /
``GatingConfig`` from ``pipeline.configs``) and reads its fields. This stage never imports ``pipeline.configs``, not even for types:
the configs import the stages' lists of allowed values, and that way alone (tests/test_layout.py).
"""

from pipeline.train.calibration import (calibrate_heads, common_direction, fit_pair_temperatures, fit_scale_offset,
                                        fit_temperature, pair_nll, sigma_report)
from pipeline.train.feature_stream import (StreamedRows, TensorRows, as_rows, default_memory_budget, open_streamed,
                                            streams,
                                           part_shuffled, row_chunks)
from pipeline.train.closed_form import fit_ridge_value_head
from pipeline.train.gate_selection import choose, select_gate
from pipeline.train.gates import (GATE_KINDS, calibrate_pairs, equal_weights, fit_gate_kind, frozen_outputs,
                                  frozen_pair_outputs, gate_epoch, global_weights, pair_report, pair_scores,
                                  set_constant_gate, with_gate)
from pipeline.train.losses import GRADIENT_LOSSES, STAGE1_LOSSES, bt_loss, stage1_criterion, stage1_loss
from pipeline.train.optimization import EarlyStopping, adamw, split_rows
from pipeline.train.fit import Fit
from pipeline.train.trainers import NoPreference, fit_gate, fit_value_head

__all__ = [
    "GATE_KINDS", "GRADIENT_LOSSES", "STAGE1_LOSSES", "EarlyStopping", "Fit", "NoPreference", "calibrate_pairs",
    "choose", "equal_weights", "fit_gate_kind", "fit_ridge_value_head", "frozen_pair_outputs", "global_weights",
    "pair_report", "pair_scores", "select_gate", "set_constant_gate", "StreamedRows", "TensorRows", "adamw",
    "as_rows", "bt_loss", "calibrate_heads", "common_direction", "default_memory_budget", "streams", "fit_gate",
    "fit_pair_temperatures", "fit_scale_offset", "fit_temperature", "fit_value_head", "frozen_outputs",
    "gate_epoch", "open_streamed", "pair_nll", "part_shuffled", "row_chunks", "sigma_report", "split_rows",
    "stage1_criterion", "stage1_loss", "with_gate",
]
