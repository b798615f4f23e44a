"""Checkpoints in the published URM layout (LxzGordon/URM-LLaMa-3.1-8B, as SGLang serves it) read as our heads.

The layout (SGLang's ``LlamaForSequenceClassificationWithNormal_Weights``, its
python/sglang/srt/models/llama_reward.py): config.json ``architectures``
[PUBLISHED_ARCHITECTURE], ``model_type`` "llama", ``num_labels`` 2K; tensors ``model.*`` (the
backbone), ``score.weight`` [2K, d] (rows interleaved mu_k, log sigma_k; no bias) and the gate
``weights.fc.{0,2,4}.{weight,bias}`` (Linear(d, d) -> SELU -> Linear(d, d) -> SELU -> Linear(d, K)).
Our exports use the same names and add a ``urm`` section; a published checkpoint has none, so
``checkpoint_settings`` derives one: K attributes (HelpSteer2's five when K = 5), one member, no
value-head bias, the URM gate as wide as the backbone, temperatures 1, and ``sigma_calibrated``
False: nothing says its log-sigma rows were ever checked against held-out data.

Every tensor the class needs must be in the files, with the shape config.json gives it, and the heads' tensors
finite (``check_checkpoint_tensors``): transformers would fill a missing one with random numbers and score with
it, and report a wrong shape in its own load table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from pipeline import ATTRIBUTES
from pipeline.model.heads import Heads
from pipeline.model.heads_io import CacheIdentity, HeadsError, HeadsMeta, StageRecord

PUBLISHED_ARCHITECTURE = "LlamaForSequenceClassificationWithNormal_Weights"
PUBLISHED_LOSS = "published checkpoint"  # the value head's "loss" in a HeadsMeta made for one
INDEX = "model.safetensors.index.json"


def read_config_json(directory: str | Path) -> dict:
    """config.json of ``directory`` as a dict (HeadsError when unreadable)."""
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeadsError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise HeadsError(f"{path}: a JSON {type(data).__name__}, not a model config")
    return data


def is_published_layout(config: dict) -> bool:
    """A checkpoint laid out as the published URM (its class, an even number of labels) without our ``urm`` section."""
    labels = len(config.get("id2label") or {}) or config.get("num_labels") or 0
    return (not config.get("urm") and PUBLISHED_ARCHITECTURE in (config.get("architectures") or [])
            and labels >= 2 and labels % 2 == 0)


def is_published_checkpoint(directory: str | Path) -> bool:
    """A model directory in the published layout that is not one of our exports (an export has urm_export.json
    and heads.json: one whose ``urm`` section was lost is a damaged export, not a published checkpoint)."""
    directory = Path(directory)
    return (not made_by_urm(directory) and (directory / "config.json").is_file()
            and is_published_layout(read_config_json(directory)))


def made_by_urm(directory: Path) -> bool:
    """The folder holds an export's own records (urm_export.json or heads.json)."""
    return (directory / "urm_export.json").exists() or (directory / "heads.json").exists()


def published_settings(config: dict) -> dict:
    """The ``urm`` section a published-layout checkpoint would have (see the module docstring)."""
    k = (len(config.get("id2label") or {}) or config["num_labels"]) // 2
    return {"format_version": 2, "layout": "published", "attributes": list(ATTRIBUTES) if k == len(ATTRIBUTES)
            else [f"attribute_{i}" for i in range(k)], "members": 1, "value_bias": False, "gate": "urm",
            "gate_hidden": config["hidden_size"], "gate_temperature": None, "base_score": False,
            "base_score_bias": False, "pair_temperature": {"bt": 1.0, "gaussian": 1.0}, "max_length": None,
            "sigma_calibrated": False, "backbone_model_type": config.get("model_type", "llama")}


def checkpoint_settings(directory: str | Path) -> dict:
    """The ``urm`` settings of a model directory: an export's section (one made before
    ``backbone_model_type`` was written kept the backbone's type as ``model_type``, and its sigma was
    calibrated when its heads.json says so), a published-layout checkpoint's derived ones, else {}."""
    config = read_config_json(directory)
    if not made_by_urm(Path(directory)) and is_published_layout(config):  # is_published_checkpoint, config read once
        return published_settings(config)
    urm = dict(config.get("urm") or {})
    if urm:
        urm.setdefault("backbone_model_type", config.get("model_type"))
    return urm


def tensor_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint (its index's, else model.safetensors)."""
    index = directory / INDEX
    if index.is_file():
        return [directory / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / "model.safetensors"]


def check_checkpoint_tensors(directory: str | Path, wanted: dict[str, tuple[int, ...]],
                             key_mapping: dict[str, str] | None = None,
                             finite: Callable[[str], bool] = lambda name: True) -> None:
    """HeadsError, naming the tensor and the cause, unless every tensor of ``wanted`` (name -> the shape the model
    class gives it) is in the checkpoint's safetensors files with that shape, and every one ``finite`` picks holds
    no NaN or infinity. ``key_mapping`` (regex -> replacement) renames the files' names first, as the load does.
    Reads the files' headers, and the picked tensors only."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    mapping = [(re.compile(a), b) for a, b in (key_mapping or {}).items()]
    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}  # name as the model calls it -> (file, name there, shape)
    try:
        files = tensor_files(directory)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HeadsError(f"{directory / INDEX}: unreadable ({type(e).__name__}: {e})") from None
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = key
                    for pattern, replacement in mapping:
                        name = pattern.sub(replacement, name)
                    found[name] = (file, key, tuple(f.get_slice(key).get_shape()))
        except (OSError, SafetensorError, ValueError) as e:
            raise HeadsError(f"{file}: not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0]}), "
                             "so the model cannot be loaded; restore the file, or export it again") from None
    missing = [name for name in wanted if name not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise HeadsError(f"{directory}: {', '.join(missing[:3])}{more} not in its weight files: the model needs every "
                         "one (left out, it would be filled with random numbers and score with them); restore the "
                         "checkpoint's files, or export it again")
    for name, shape in wanted.items():
        file, key, there = found[name]
        if there != shape:
            raise HeadsError(f"{directory}: {key} in {file.name} has shape {list(there)}, but config.json makes it "
                             f"{list(shape)} ({shape_reason(name, shape)}); the weights and config.json disagree")
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        if finite(name):
            by_file.setdefault(found[name][0], []).append(found[name][1])
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                if not bool(f.get_tensor(key).float().isfinite().all()):
                    raise HeadsError(f"{directory}: {key} in {file.name} holds NaN or infinite values, so every score "
                                     "it gave would be meaningless; restore the checkpoint's files, or export it again")


def shape_reason(name: str, shape: tuple[int, ...]) -> str:
    """What in config.json makes tensor ``name`` this shape, in words."""
    if name == "score.weight":
        return f"{shape[0]} rows, a mean and a log-sigma per attribute (num_labels), of hidden_size {shape[-1]}"
    return f"hidden_size {shape[-1]}" if len(shape) == 2 else "its shape in the model class"


def published_heads(directory: str | Path) -> tuple[Heads, HeadsMeta]:
    """The heads of a published-layout checkpoint (``score.weight``, ``weights.fc.*``, upcast to fp32) and
    a HeadsMeta for them: no training record, sigma not calibrated; the cache identity names the
    checkpoint as its own backbone (the caller fills in its revision and chat template)."""
    directory = Path(directory)
    settings = published_settings(read_config_json(directory))
    d, k = settings["gate_hidden"], len(settings["attributes"])
    heads = Heads(d, k, gate="urm", gate_hidden=d)
    wanted, state = set(heads.state_dict()), {}
    check_checkpoint_tensors(directory, {name: tuple(t.shape) for name, t in heads.state_dict().items()})
    try:
        for file in tensor_files(directory):
            with safe_open(str(file), framework="pt") as f:
                state.update({key: f.get_tensor(key).float() for key in wanted & set(f.keys())})
        heads.load_state_dict(state)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        missing = sorted(wanted - set(state))
        raise HeadsError(f"{directory}: not a checkpoint in the published URM layout ("
                         f"{'missing ' + ', '.join(missing[:3]) if missing else str(e).splitlines()[0]})") from None
    identity = CacheIdentity(path="", backbone=str(directory), hidden_size=d)
    value = StageRecord(config={"loss": PUBLISHED_LOSS}, cache=identity)
    meta = HeadsMeta(attributes=settings["attributes"], hidden_size=d, architecture=dict(heads.architecture),
                     value_head=value)
    return heads.to(torch.float32), meta
