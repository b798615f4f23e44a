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
``GatingConfig`` from ``pipeline.configs``) and reads its fields. This stage never imports ``pipeline.configs``, not
even for types: the configs import the stages' lists of allowed values, and that way alone (tests/test_layout.py).
"""

from pipeline.train.calibration import (calibrate_heads, common_direction, fit_pair_temperatures, fit_scale_offset,
                                        fit_temperature, pair_nll)
from pipeline.train.feature_stream import TensorRows, as_rows, open_streamed, streams, part_shuffled
from pipeline.train.gate_selection import choose
from pipeline.train.gates import GATE_KINDS, frozen_outputs, gate_epoch, global_weights, set_constant_gate, with_gate
from pipeline.train.losses import STAGE1_LOSSES
from pipeline.train.optimization import adamw, split_rows
from pipeline.train.fit import Fit
from pipeline.train.trainers import NoPreference, fit_gate, fit_value_head

__all__ = [
    "adamw", "as_rows", "calibrate_heads", "choose", "common_direction", "Fit", "fit_gate", "fit_pair_temperatures",
    "fit_scale_offset", "fit_temperature", "fit_value_head", "frozen_outputs", "gate_epoch", "GATE_KINDS",
    "global_weights", "NoPreference", "open_streamed", "pair_nll", "part_shuffled", "set_constant_gate", "split_rows",
    "STAGE1_LOSSES", "streams", "TensorRows", "with_gate",
]
