"""The option system every stage config is built with: fields with their help text, groups of fields under a
prefix, the flat view (one name per option for the command line, ``URM_<OPTION>`` variables, presets and
heads.json), and the value checks a config runs when it is built.

A config is a dataclass of plain fields and groups: the two training stages each have a
``TrainingRun`` (where they read and write: the same options for both) and an ``Optimization``.
Options are addressed by flat names everywhere a person writes them: a group's fields take the
group's prefix (``lr`` for the value head, ``gate_lr`` for the gate), see ``options``. Each field's
``help`` metadata is the one source of the ``--help`` text.

Checks run when a config is built, so a bad value stops a command before any model loads; each
raises ``ConfigError`` naming the option (``--flag``) and what it must be.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from pipeline.device import DEVICE
from pipeline.errors import UserError

VERIFY_HELP = ("Check every cache part's checksum before its rows are used (a damaged part is refused, and "
               "`urm extract` rebuilds it); --no-verify checks sizes only.")
DTYPE_HELP = ("Compute dtype: auto (bf16 on CUDA, fp32 on CPU), auto-bf16 (bf16 on CUDA and on CPUs with native "
              "bf16, AVX-512 BF16 or AMX; fp32 otherwise), float32, bfloat16, float16.")
DEVICE_HELP = "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ... (or mps, xpu)."
SCORING_DTYPE_HELP = ("Compute dtype: auto (bf16 on CUDA and on CPUs with native bf16, AVX-512 BF16 or AMX: half the "
                      "memory of fp32; fp32 otherwise, saying first how much memory that takes; auto-bf16 is the same "
                      "here), float32, bfloat16, float16. The weights load straight into it.")


def opt(default: Any, help: str, cli: bool = True, shown: str | None = None, secret: bool = False,
        short: str | None = None) -> Any:
    """A config field with its help text; ``cli=False`` keeps it out of the command line; ``short`` is its one-letter
    flag (``-i``), the same letter meaning the same thing in every command; ``shown`` is
    the default as --help states it (when it depends on the preset); ``secret`` (a key) keeps its value out of
    the config's repr, ``to_dict`` and every message, and makes a blank ``URM_<OPTION>`` count as given (so it is
    refused as the blank option would be, never taken for "not set")."""
    meta = {"help": help, "cli": cli, "shown": shown, "secret": secret, "short": short}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta, repr=not secret)


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



@contextlib.contextmanager
def machine_checks_off():
    """Within: checks that depend on this machine (is there a CUDA device?) are skipped, as when a whole
    preset is checked before the stage that uses a value runs here."""
    token = _CHECK_MACHINE.set(False)
    try:
        yield
    finally:
        _CHECK_MACHINE.reset(token)


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
    secret: bool = False  # a key: never shown (see ``opt``)
    short: str | None = None  # its one-letter flag, if it has one


def options(cls: type) -> list[Option]:
    """Every option of a stage config, groups flattened under their prefix, in declaration order."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            inner = f.default_factory()
            inner_hints = typing.get_type_hints(type(inner))
            out += [Option(f.metadata["prefix"] + g.name, (f.name, g.name), inner_hints[g.name], getattr(inner, g.name),
                           g.metadata["help"], g.metadata["cli"], g.metadata["shown"], g.metadata.get("secret", False),
                           g.metadata.get("short"))
                    for g in dataclasses.fields(inner)]
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.append(Option(f.name, (f.name,), hints[f.name], default, f.metadata["help"], f.metadata["cli"],
                              f.metadata["shown"], f.metadata.get("secret", False), f.metadata.get("short")))
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
        out[o.name] = SECRET_SHOWN if o.secret and value is not None else plain(value)
    return out


SECRET_SHOWN = "(set, not shown)"  # a secret option's value wherever a config is written out
