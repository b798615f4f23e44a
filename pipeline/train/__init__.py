"""Training: the two stages' loops on cached features, the losses, and the calibration of what they state.

  losses          reparam / nll / beta-nll (stage 1), Bradley-Terry (stage 2, margin-aware too)
  optimization    seeded splits, AdamW, per-member early stopping
  calibration     sigma refit on held-out rows; pair-probability temperatures
  feature_stream  the trainers' minibatch source: features in memory, or streamed from a cache's parts
  trainers        ``fit_value_head`` (stage 1) and ``fit_gate`` (stage 2)

Imports the cross-cutting modules, ``pipeline.model`` and ``pipeline.cache``.
"""

from pipeline.train.calibration import (calibrate_heads, common_direction, fit_pair_temperatures, fit_scale_offset,
                                        fit_temperature, pair_nll, sigma_report)
from pipeline.train.feature_stream import (StreamedRows, TensorRows, as_rows, default_memory_budget, open_streamed,
                                           part_shuffled)
from pipeline.train.losses import STAGE1_LOSSES, bt_loss, stage1_criterion, stage1_loss
from pipeline.train.optimization import EarlyStopping, adamw, split_rows
from pipeline.train.trainers import Fit, fit_gate, fit_value_head, frozen_outputs, gate_epoch, with_gate

__all__ = [
    "STAGE1_LOSSES", "EarlyStopping", "Fit", "StreamedRows", "TensorRows", "adamw", "as_rows", "bt_loss",
    "calibrate_heads", "common_direction", "default_memory_budget", "fit_gate", "fit_pair_temperatures",
    "fit_scale_offset", "fit_temperature", "fit_value_head", "frozen_outputs", "gate_epoch", "open_streamed",
    "pair_nll", "part_shuffled", "sigma_report", "split_rows", "stage1_criterion", "stage1_loss", "with_gate",
]
