"""The training stages' configs: stage 1 (``ValueHeadConfig``) and stage 2 (``GatingConfig``), each with a
``TrainingRun`` (where it reads and writes, the same options for both) and an ``Optimization`` group
(AdamW and early stopping; the gate's options take the ``gate_`` prefix)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configs.options import (DEVICE_HELP, VERIFY_HELP, ConfigError, check, device_name, fraction, group,
                                      number, one_of, opt, positive, whole)
from pipeline.configs.paths import DEFAULT_PATHS


@dataclass
class Optimization:
    """AdamW with early stopping on a held-out validation split: one group per training stage."""

    lr: float = opt(1e-3, "AdamW learning rate.")
    weight_decay: float = opt(1e-4, "AdamW weight decay.")
    epochs: int = opt(100, "Maximum epochs (early stopping on validation may end sooner).")
    batch_size: int = opt(1024, "Examples (ratings, or pairs in stage 2) per optimisation step.")
    val_fraction: float = opt(0.1, "Share held out for validation and early stopping (ridge needs none: its alpha "
                              "comes from leave-one-out).")
    patience: int = opt(10, "Stop after this many epochs without a better validation loss.")


def optimization(optim: Optimization, prefix: str) -> None:
    """The checks of an ``Optimization`` group whose options take ``prefix``."""
    positive(optim.lr, prefix + "lr")
    check(number(optim.weight_decay) and optim.weight_decay >= 0, prefix + "weight_decay", optim.weight_decay,
          "a finite number, 0 or more")
    for name in ("epochs", "batch_size", "patience"):
        whole(getattr(optim, name), prefix + name)
    fraction(optim.val_fraction, prefix + "val_fraction")


@dataclass
class TrainingRun:
    """Where a training stage reads and writes, and how it runs: both stages take the same options, so
    one `--cache-dir` (or `--seed`, ...) sets both in `urm train-heads`."""

    cache_dir: str = opt(DEFAULT_PATHS["cache_dir"], "Folder holding the cached datasets.", shown="cache/PRESET")
    heads_dir: str = opt(DEFAULT_PATHS["heads_dir"], "The heads folder (safetensors + heads.json): stage 1 "
                         "writes the value head there, stage 2 adds the gate.", shown="runs/PRESET/heads")
    seed: int = opt(0, "Random seed (split, init, minibatch order, reparameterisation noise).")
    device: str = opt("auto", DEVICE_HELP)
    verify: bool = opt(True, VERIFY_HELP)
    memory_budget: float | None = opt(None, "Gigabytes of cached features the trainers may hold in memory (on the "
                                      "device); a cache with more is streamed from its part files, 8 parts at a time "
                                      "(same heads, same seed). Default: half the device's memory (GPU or RAM).",
                                      shown="half the device's memory")

    def __post_init__(self):
        device_name(self.device)
        positive(self.memory_budget, "memory_budget", allow_none=True)


@dataclass
class ValueHeadConfig:
    """`urm train-value-head`: stage 1, Gaussian value head on the ratings cache."""

    run: TrainingRun = group(TrainingRun(), prefix="")
    ratings_cache: str | None = opt(None, "Ratings cache folder (default: CACHE_DIR/ratings).")
    loss: str = opt("ridge", "Stage-1 loss: ridge (closed form: least squares plus the L2 penalty that exact "
                    "leave-one-out picks per attribute, sigma from the leave-one-out residuals; seconds), or trained by "
                    "AdamW: reparam (the seed's recipe), nll, beta-nll.")
    ridge_alpha: str = opt("shared", "Ridge: one penalty shared by the attributes, chosen by their summed leave-one-out "
                           "error (pooled evidence: steadier on a few hundred rows), or one per attribute.")
    beta: float = opt(0.5, "beta of beta-nll (0 = nll, 1 = MSE-like gradients for the mean).")
    ensemble: int = opt(8, "Value heads in the ensemble (URME), whose spread is the epistemic uncertainty: with ridge, "
                        "fits on bootstrap resamples of the rows (they differ where the data is thin); with the AdamW "
                        "losses, seeds seed, seed+1, ... (the seed's URME). 1 = no ensemble.")
    bias: bool = opt(False, "Give the value head a bias (the published URM has none: real hidden states "
                     "carry a near-constant direction that serves as one, ridge's intercept).")
    standardize_labels: bool = opt(False, "AdamW losses: train on standardised labels; the saved head predicts on the "
                                   "label scale again (mu = std * head + mean, so it then has a bias). Ridge does not "
                                   "depend on the labels' scale.")
    calibrate: bool = opt(True, "Refit sigma on a held-out calibration split (Gaussian NLL, means frozen) so that it "
                          "is the size of the held-out error; --no-calibrate keeps sigma as the fit left it "
                          "(reparam drives it to 0).")
    calibration_fraction: float = opt(0.1, "Share of rows held out for the sigma calibration.")
    optim: Optimization = group(Optimization(), prefix="")

    def __post_init__(self):
        from pipeline.train import STAGE1_LOSSES  # the names live with the losses

        one_of(self.loss, STAGE1_LOSSES, "loss")
        one_of(self.ridge_alpha, ("shared", "per-attribute"), "ridge_alpha")
        check(number(self.beta) and 0 <= self.beta <= 1, "beta", self.beta, "between 0 and 1")
        whole(self.ensemble, "ensemble")
        fraction(self.calibration_fraction, "calibration_fraction")
        optimization(self.optim, "")
        if self.calibrate and self.optim.val_fraction + self.calibration_fraction >= 1:
            raise ConfigError(f"--val-fraction {self.optim.val_fraction} and --calibration-fraction "
                              f"{self.calibration_fraction} leave no rows to train on")


@dataclass
class GatingConfig:
    """`urm train-gating`: stage 2, gating layer with the Bradley-Terry loss, value head frozen."""

    run: TrainingRun = group(TrainingRun(), prefix="")
    preferences_cache: str | None = opt(None, "Preference cache folder (default: CACHE_DIR/preferences).")
    gate: str = opt("auto", "Gate: auto (the kind that cross-validation on the pairs supports, never one that loses "
                    "to a simpler kind: see --gate-candidates), or one kind: equal (w_k = 1/K), global (one K-number "
                    "weight vector), urm-warm (the URM MLP started at the global vector), urm (the URM MLP, SELU, "
                    "unnormalised weights, from a random start: the seed's), softmax (ArmoRM style).")
    gate_candidates: list[str] = opt(["equal", "global", "urm-warm", "softmax"], "With --gate auto: the kinds to "
                                     "choose among (repeat the option; they are tried simplest first).")
    gate_folds: int = opt(5, "With --gate auto: folds of the cross-validation over every pair (1: the validation "
                          "split alone, as also above 20,000 pairs, where its standard error is small).")
    gate_hidden: int | None = opt(None, "Hidden width of the gate MLP (default: d for urm, 1024 for softmax).")
    temperature: float | None = opt(None, "Softmax gate temperature T in softmax(x / T) (default: ArmoRM's 10).")
    use_margin: bool = opt(False, "Margin-aware BT loss -log sigmoid(s_c - s_r - margin) with each pair's "
                           "margin column (UltraFeedback's score gap, a dataset's own margin; TRL's RewardTrainer).")
    pair_temperature: bool = opt(True, "Fit one temperature for each pair probability (BT and Gaussian) on the "
                                 "validation pairs, used by the export and `urm score`; --no-pair-temperature keeps T = 1.")
    optim: Optimization = group(Optimization(lr=1e-4, epochs=20, batch_size=512, patience=3), prefix="gate_")

    def __post_init__(self):
        from pipeline.train import GATE_KINDS  # the names live with the gates

        one_of(self.gate, ("auto", *GATE_KINDS), "gate")
        if not self.gate_candidates:
            raise ConfigError("--gate-candidates is empty: give at least one of " + ", ".join(GATE_KINDS))
        for kind in self.gate_candidates:
            one_of(kind, GATE_KINDS, "gate_candidates")
        whole(self.gate_folds, "gate_folds")
        whole(self.gate_hidden, "gate_hidden", allow_none=True)
        positive(self.temperature, "temperature", allow_none=True)
        optimization(self.optim, "gate_")
