"""``Fit``: what a training stage hands back to its recipe (which writes it into heads.json)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.model import Heads, LabelScaling, PairCalibration, SigmaCalibration


@dataclass
class Fit:
    """A trained stage: the heads, per-epoch history, final validation metrics (best epoch)."""

    heads: Heads
    history: list[dict]
    val: dict
    best_epoch: list[int]
    label_scaling: LabelScaling | None = None
    calibration: SigmaCalibration | PairCalibration | None = None
    selection: dict = field(default_factory=dict)  # what was chosen automatically, and the numbers that chose it
