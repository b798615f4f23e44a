"""The heads folder: ``heads.safetensors`` (tensors under their export names) + ``heads.json`` (meta).

``heads.json`` holds the format version, the hidden size, the attribute names, the ``architecture``
(the keyword arguments of ``heads.Heads``: members, bias, gate, gate_hidden, temperature), the
label scaling, and one section per trained stage (``value_head``, ``gating``) with its resolved
config, per-epoch history, final validation metrics and the identity of the cache it was trained on.
Both files are written to a temp file then renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError
from pipeline.heads import Heads

FORMAT_VERSION = 1
TENSORS = "heads.safetensors"
META = "heads.json"


class HeadsError(UserError):
    """A heads folder that is missing, unreadable or does not fit what is asked of it."""


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_heads(directory: str | os.PathLike, heads: Heads, meta: dict) -> Path:
    """Write ``heads`` and ``meta`` (plus format version and architecture) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in heads.state_dict().items()}
    meta = {**meta, "format_version": FORMAT_VERSION, "hidden_size": heads.d,
            "architecture": architecture(heads)}
    _replace_atomically(directory / TENSORS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(_finite(meta), indent=2, allow_nan=False) + "\n"
    _replace_atomically(directory / META, lambda p: p.write_text(text))
    return directory


def _finite(value):
    """NaN / inf -> None (null), so heads.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def architecture(heads: Heads) -> dict:
    """The keyword arguments that rebuild ``heads`` (besides d and k)."""
    gate = heads.softmax_gate
    hidden = heads.weights[0].out_features if heads.weights is not None else (
        gate.layers[0].out_features if gate is not None else None)
    return {"members": heads.members, "bias": heads.score.bias is not None, "gate": heads.gate,
            "gate_hidden": hidden, "temperature": gate.temperature if gate is not None else None}


def load_heads(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Heads:
    """Rebuild the ``Heads`` saved in ``directory``; its ``meta`` attribute holds heads.json."""
    directory = Path(directory)
    if not (directory / META).is_file() or not (directory / TENSORS).is_file():
        raise HeadsError(f"{directory}: no trained heads here ({META} + {TENSORS}); "
                         "train the value head first: `urm train-value-head`")
    meta = json.loads((directory / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise HeadsError(f"{directory / META}: format_version {meta.get('format_version')} "
                         f"(this code reads {FORMAT_VERSION}); retrain the heads with this version")
    arch = {key: value for key, value in meta["architecture"].items() if value is not None}
    heads = Heads(meta["hidden_size"], len(meta["attributes"]), **arch)
    try:
        heads.load_state_dict(load_file(str(directory / TENSORS)))
    except RuntimeError as e:
        raise HeadsError(f"{directory / TENSORS} does not match {META}: {e}; retrain the heads") from None
    heads.meta = meta
    return heads.to(device)
