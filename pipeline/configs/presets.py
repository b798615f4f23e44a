"""Presets: the TOML files shipped in pipeline/configs/ (or any path to one), read, checked key by key and
value by value, and merged into each stage's config.

Precedence, lowest first: the dataclass default < the paths named after the preset (cache/NAME,
runs/NAME/heads, runs/NAME/model) < the preset file < a CLI option or its ``URM_<OPTION>``
environment variable (which is also how ``make VAR=...`` overrides reach the CLI).

A preset file has shared keys at the top level (every stage with an option of that name takes
them), one table per stage (``[extract]``, ``[value_head]``, ``[gating]``, ``[export]``, ``[evaluate]``,
``[score]``, ``[serve]``, ``[curate]``) and one ``[datasets.NAME]`` table per dataset to extract.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any

from pipeline.configs.curate import CurateConfig
from pipeline.configs.evaluate import EvaluateConfig
from pipeline.configs.export import ExportConfig
from pipeline.configs.extract import DatasetSpec, ExtractConfig
from pipeline.configs.options import ConfigError, build, machine_checks_off, options, to_dict
from pipeline.configs.paths import DEFAULT_PRESET, run_paths
from pipeline.configs.serve import ScoreConfig, ServeConfig
from pipeline.configs.train import GatingConfig, ValueHeadConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent

STAGES: dict[str, type] = {
    "extract": ExtractConfig,
    "value_head": ValueHeadConfig,
    "gating": GatingConfig,
    "export": ExportConfig,
    "evaluate": EvaluateConfig,
    "score": ScoreConfig,
    "serve": ServeConfig,
    "curate": CurateConfig,
}


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
    from pipeline.data import not_utf8

    path = preset_path(preset)
    data = path.read_bytes()
    try:
        return tomllib.loads(data.decode("utf-8-sig"))  # a byte-order mark (Windows editors) is not TOML
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
    secrets = {o.name for c in STAGES.values() for o in options(c) if o.secret}
    for key, value in data.items():
        if isinstance(value, dict):
            unknown(where, "has unknown tables", key, tables)
            if key in STAGES:
                by_name = {o.name: o.type for o in options(STAGES[key])}
                for inner, v in value.items():
                    unknown(where, f"[{key}] has unknown keys", inner, by_name)
                    typed(where, f"[{key}] {inner}", v, by_name[inner], inner in secrets)
        else:
            unknown(where, "unknown top-level keys", key, known)
            typed(where, key, value, types_[key], key in secrets)
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


def typed(where, shown: str, value, hint, secret: bool = False) -> None:
    try:
        check_type(shown, value, hint)
    except ConfigError as e:
        what = f"{shown} has the wrong type (a secret: its value is not shown)" if secret else str(e)
        raise ConfigError(f"{where}: {what}") from None


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
    with machine_checks_off():
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


# Options a command line gives as one set: giving any of them drops the preset's values of the others (`urm evaluate
# HEADS --eval-preferences X` evaluates X alone, never X plus the preset's held-out ratings).
TOGETHER = {"evaluate": ("eval_preferences", "eval_ratings", "shift_ratings")}


def load_config(stage: str, preset: str | None = DEFAULT_PRESET, overrides: dict | None = None):
    """Build the config of ``stage`` from defaults, the preset, then non-None ``overrides`` (flat names); an
    override of one option of a ``TOGETHER`` set leaves the others of the set at their defaults."""
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
    given = {k: v for k, v in (overrides or {}).items() if v is not None and k in by_name}
    together = TOGETHER.get(stage, ())
    if any(k in given for k in together):
        values = {k: v for k, v in values.items() if k not in together}
    values.update(given)
    config = build(cls, values)
    logger.debug(f"{stage} settings (preset {source or 'none'}; given as options or URM_ variables: "
                 f"{', '.join(sorted(given)) or 'none'}): {to_dict(config)}")
    return config
