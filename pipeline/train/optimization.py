"""What every training loop here shares: a seeded train / validation split, AdamW from a config, a
note when epochs are too short for early stopping, and per-member early stopping with the best
weights kept. The two stages (pipeline.train.trainers) and sigma calibration (pipeline.train.calibration) use it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading


import torch

from pipeline.errors import UserError


logger = logging.getLogger(__name__)


def split_rows(n: int, val_fraction: float, seed: int,
               option: str = "--val-fraction") -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random (train, validation) split of range(n)."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}: set {option} 0.1")
    n_val = round(n * val_fraction)
    if n_val < 1 or n_val >= n:
        raise UserError(f"{n} rows cannot be split with val_fraction {val_fraction}: "
                        f"extract more rows or change {option}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def split_off(rows: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rest, n seeded-random rows of ``rows``): the calibration split comes out of the training rows."""
    if n < 1 or n >= len(rows):
        raise UserError(f"{len(rows)} training rows cannot give {n} calibration rows: extract more rows or change "
                        "--calibration-fraction (or --no-calibrate)")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 1))
    return rows[perm[n:]], rows[perm[:n]]


def adamw(params, optim) -> torch.optim.AdamW:
    """AdamW from a config, fused (one kernel a step for all its tensors, not a dozen per tensor: on CPU the
    elementwise update of a 1024-wide gate cost more than its forward and backward) where the parameters allow."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused or None)


_flushing = threading.local()  # how deep this thread is in flush_denormals blocks


@contextlib.contextmanager
def flush_denormals():
    """Denormal floats (magnitudes below 1.2e-38) read and written as zero in the block, on this thread and the
    threads it starts (the CPU's FTZ/DAZ flags; a thread pool started earlier keeps its own). Training makes them:
    AdamW's first moment of a weight whose gradient is exactly zero (a unit its ReLU has shut) decays by 0.9 a
    step into them, and x86 CPUs handle each in microcode, so an MLP gate's epochs grew 3x slower as units shut.
    Flushing changes numbers only below 1.2e-38 (the losses agree to every printed digit). Blocks nest; the
    flags are off again after the outermost."""
    depth = getattr(_flushing, "depth", 0)
    flushed = torch.set_flush_denormal(True) if depth == 0 else False  # False where the CPU cannot
    _flushing.depth = depth + 1
    try:
        yield
    finally:
        _flushing.depth = depth
        if flushed:
            torch.set_flush_denormal(False)


def stop_if_diverged(epoch: int, train_loss: float, criterion: torch.Tensor, what: str, option: str, lr: float) -> None:
    """A non-finite training or validation loss ends the run (nothing is saved): the weights are no longer numbers."""
    if not (math.isfinite(train_loss) and bool(torch.isfinite(criterion).all())):
        raise UserError(f"the {what}'s training diverged at epoch {epoch}: loss {train_loss}, validation "
                        f"{criterion.tolist()}; nothing was saved. Lower {option} (now {lr:g})")


def warn_few_steps(rows: int, batch_size: int, option: str) -> None:
    """Early stopping counts epochs: with one or two steps per epoch it stops long before convergence."""
    steps = math.ceil(rows / batch_size)
    if steps < 4:
        logger.info(f"note: {rows} training rows in batches of {batch_size} = {steps} optimiser step(s) per epoch; "
                    f"early stopping may end training too soon: consider {option} {max(16, rows // 16)}")


class EarlyStopping:
    """Per-member early stopping on a validation criterion; keeps and restores the best weights.

    ``members`` = M for parameters stacked on a leading member axis (an ensemble stops member by
    member), or None for one model.
    """

    def __init__(self, params: list[torch.Tensor], patience: int, members: int | None = None):
        self.views = [p.data if members else p.data.unsqueeze(0) for p in params]
        self.saved = [v.clone() for v in self.views]
        m = members or 1
        self.best = torch.full((m,), math.inf)
        self.best_epoch = torch.zeros(m, dtype=torch.long)
        self.bad = torch.zeros(m, dtype=torch.long)
        self.patience = patience

    def update(self, criterion: torch.Tensor, epoch: int) -> torch.Tensor:
        """Record this epoch's criterion [M]; returns which members improved."""
        better = criterion.detach().cpu().double() < self.best
        for view, saved in zip(self.views, self.saved):
            saved[better.to(saved.device)] = view[better.to(view.device)]
        self.best = torch.where(better, criterion.detach().cpu().double(), self.best)
        self.best_epoch[better] = epoch
        self.bad = torch.where(better, 0, self.bad + 1)
        return better

    @property
    def done(self) -> bool:
        return bool((self.bad >= self.patience).all())

    def restore(self) -> None:
        for view, saved in zip(self.views, self.saved):
            view.copy_(saved)
