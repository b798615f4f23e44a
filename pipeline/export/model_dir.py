"""The files of an exported Hugging Face model directory: shards, index, config, code, tokenizer.

The export (pipeline.recipes.export) is ``AutoModelForSequenceClassification``-loadable with
``trust_remote_code=True`` (transformers 4.57.x and 5.x): ``modeling_urm.py``, ``heads.py`` and
``configuration_urm.py`` (copied from this package), config.json (the backbone's config plus a
``urm`` section and ``auto_map``), the weights and the tokenizer with its chat template.

Laid out as the published URM-LLaMa-3.1-8B (so SGLang serves it, write_config): ``num_labels`` 2K,
``score.weight`` [2K, d], the gate ``weights.fc.{0,2,4}.*``, the backbone ``model.*``, and
``architectures`` SGLang's class where that class computes our score (serves_in_sglang). Every other
tensor (``ensemble.weight``, ``posterior.*``, ``softmax_gate.*``, ``base_score.*``, an LM head) has a name SGLang's
model lacks, which its loader logs and skips. ``model_type`` is "urm": a load without
``trust_remote_code`` is an error, never a plain LlamaForSequenceClassification's 2K logits.

Weights, without loading the model: the backbone's safetensors shard files are reused as they are
(hardlinked when the file system allows, else copied), the heads go in one more shard
(``urm-heads.safetensors``, a copy of heads.safetensors: the tensor names are the export's), and a
merged ``model.safetensors.index.json`` names every tensor's shard (a single-file backbone's
``model.safetensors`` goes in as ``model-backbone.safetensors``: transformers would load a file named
``model.safetensors`` alone, ignoring the index and so the heads). So exporting onto an 8B
backbone costs a file copy at most, not a load-and-save of 16 GB. Rewritten instead (one shard at
a time, tensors bit-identical, only renamed):
  - the shard that holds a reward model's own head ``score.*``: transformers reads every tensor of
    every shard file, and ``score.weight`` is the value head's name here, so that shard is written
    anew with it renamed ``base_score.*`` (the other shards are still linked);
  - every shard of a checkpoint whose backbone keys lack the ``model.`` prefix (a bare
    ``LlamaModel`` save, or another prefix): written with the prefix.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pipeline.model as model_package
from pipeline.errors import UserError
from pipeline.hashing import file_xxh3
from pipeline.model import EXPORT_TENSORS, META, HeadsMeta

CODE_DIR = Path(model_package.__file__).resolve().parent  # where the shipped files live: pipeline/model/
CODE_FILES = ("modeling_urm.py", "heads.py", "configuration_urm.py")  # the exported model's code
HEADS_SHARD = EXPORT_TENSORS
SINGLE_FILE_SHARD = "model-backbone.safetensors"
INDEX = "model.safetensors.index.json"
HEAD_PREFIXES = ("score.", "ensemble.", "weights.", "softmax_gate.", "base_score.", "posterior.")
# The published URM-LLaMa-3.1-8B's class: SGLang (python/sglang/srt/models/llama_reward.py) picks it from
# config.json's architectures and loads model.*, score.weight [2K, d] and weights.fc.{0,2,4}.* by name.
PUBLISHED_ARCHITECTURE = "LlamaForSequenceClassificationWithNormal_Weights"
OWN_ARCHITECTURE = "URMForSequenceClassification"
MODEL_TYPE = "urm"  # unknown to transformers: without trust_remote_code a load stops instead of scoring wrong
AUTO_MAP = {"AutoConfig": "configuration_urm.URMConfig",
            "AutoModelForSequenceClassification": "modeling_urm.URMForSequenceClassification"}
BACKBONE_CONFIG_LINE = "from transformers import LlamaConfig as BackboneConfig"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
# config.json keys of the backbone that describe its checkpoint or its old head, not the network
DROP_CONFIG_KEYS = ("_name_or_path", "quantization_config", "_commit_hash", "problem_type")


class ExportError(UserError):
    """The heads cannot be exported onto this backbone, or not to this place."""


@dataclass
class ShardPlan:
    """What happens to each backbone shard file: reused as is, or rewritten with renamed tensors."""

    files: dict[str, dict[str, str]]  # shard file -> {tensor name in the file: name in the export}
    extra: list[str] = field(default_factory=list)  # tensors the URM model does not use (lm_head, ...)

    def rewritten(self, name: str) -> bool:
        return any(k != v for k, v in self.files[name].items())

    @staticmethod
    def export_file(name: str) -> str:
        """A single-file backbone's ``model.safetensors`` is renamed: transformers would load that
        file alone (it takes precedence over the index), missing the heads."""
        return SINGLE_FILE_SHARD if name == "model.safetensors" else name


# ----------------------------------------------------------------------------------------------
# Checks


def check_heads_fit(meta: HeadsMeta, files, template: str, heads_dir) -> None:
    """Refuse heads trained on another backbone (``files``: pipeline.features.backbone.BackboneFiles): hidden
    size, weights revision, chat template (``template``, the backbone's chat_template_hash)."""
    cache, spec = meta.value_head.cache, files.spec
    where = Path(heads_dir) / META
    if meta.hidden_size != files.hidden_size:
        raise ExportError(f"{where}: the heads take hidden size {meta.hidden_size} but backbone {spec!r} has "
                          f"hidden_size {files.hidden_size}; export onto the backbone the heads were "
                          f"trained on ({cache.backbone or 'see value_head.cache.backbone'}), "
                          "or retrain the heads on a cache of this backbone")
    trained, revision = cache.backbone_revision, files.revision
    if trained not in (None, "unknown") and revision not in (None, "unknown") and trained != revision:
        raise ExportError(f"{where}: the heads were trained on features of {cache.backbone!r} at "
                          f"revision {trained}, but backbone {spec!r} is at {revision}: other weights. "
                          "Export onto the same backbone (--backbone, --revision) or re-extract and retrain")
    if cache.chat_template_hash not in (None, template):
        raise ExportError(f"{where}: the heads were trained on conversations rendered with chat template "
                          f"hash {cache.chat_template_hash}, but backbone {spec!r} renders with {template}; "
                          "export onto the backbone (and tokenizer) the cache was extracted with")


# ----------------------------------------------------------------------------------------------
# The backbone's shard files


def shard_keys(directory: Path) -> dict[str, list[str]]:
    """Shard file -> the tensor names it holds (index file, else the single model.safetensors)."""
    index = directory / INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ExportError(f"{directory}: no model.safetensors or {INDEX}; save the backbone as safetensors "
                          "(model.save_pretrained(dir) does by default) and export again")
    out = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as f:
            out[name] = list(f.keys())
    return out


def backbone_parameter_names(config) -> set[str]:
    """The parameter names of the bare backbone (``AutoModel``), built on the meta device (no memory)."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return {name for name, _ in model.named_parameters()}


def find_prefix(keys: set[str], expected: set[str]) -> str | None:
    """The prefix under which the checkpoint holds the backbone's parameters ("model.", "", ...)."""
    probe = sorted(expected)[0]
    candidates = ["model.", ""] + sorted({k[: -len(probe)] for k in keys if k.endswith(probe)})
    for prefix in candidates:
        if all(prefix + e in keys for e in expected):
            return prefix
    return None


def plan_shards(directory: Path, config, reward_model: bool) -> ShardPlan:
    """Name every tensor of every shard in the export: ``model.*``, ``base_score.*``, or left as is."""
    keys = shard_keys(directory)
    expected = backbone_parameter_names(config)
    everything = {k for names in keys.values() for k in names}
    prefix = find_prefix(everything, expected)
    if prefix is None:
        missing = sorted(e for e in expected if "model." + e not in everything)[:3]
        raise ExportError(f"{directory}: the shard files do not hold the backbone's weights "
                          f"(e.g. model.{missing[0] if missing else '?'} is missing); is this the checkpoint of a "
                          f"{config.model_type} model?")

    def export_name(key: str) -> str:
        if key.startswith(prefix) and key[len(prefix):] in expected:
            return "model." + key[len(prefix):]
        if reward_model and key.startswith("score."):
            return "base_score." + key[len("score."):]
        return key

    files = {name: {k: export_name(k) for k in names} for name, names in keys.items()}
    extra = sorted(v for m in files.values() for v in m.values() if not v.startswith(("model.", "base_score.")))
    clash = [k for k in extra if k.startswith(HEAD_PREFIXES)]
    if clash:
        raise ExportError(f"{directory}: the checkpoint holds {clash[0]}, a name of the reward heads (a "
                          f"classifier with {getattr(config, 'num_labels', '?')} labels?); export onto its "
                          "base model or a 1-label reward model")
    return ShardPlan(files, extra)


def link_or_copy(src: Path, dst: Path, link: bool) -> str:
    """Hardlink ``src`` to ``dst`` (same inode, no bytes written); copy when linking is not possible."""
    if link:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:  # another file system, or links not allowed
            pass
    shutil.copyfile(src, dst)
    return "copied"


def rewrite_shard(src: Path, dst: Path, names: dict[str, str]) -> str:
    """Write ``src``'s tensors to ``dst`` under new names (bytes unchanged)."""
    tensors = load_file(str(src))
    save_file({names[k]: v for k, v in tensors.items()}, str(dst), metadata={"format": "pt"})
    return "rewritten"


def place_shards(directory: Path, plan: ShardPlan, tmp: Path, link: bool) -> dict[str, str]:
    """Put every backbone shard into ``tmp``; returns export shard file -> linked | copied | rewritten."""
    done = {}
    for name, names in plan.files.items():
        src, dst = directory / name, tmp / plan.export_file(name)
        done[dst.name] = rewrite_shard(src, dst, names) if plan.rewritten(name) else link_or_copy(src, dst, link)
    return done


UNCHECKED = ("README.md", "urm_export.json")  # the card is for people; the record holds the checksums


def export_checksums(tmp: Path) -> dict[str, str]:
    """xxh3-128 of every file of the export but the card and the record (urm_export.json's ``checksums``):
    weights, config, code, tokenizer, heads.json. `urm score` checks them before loading."""
    return {p.name: file_xxh3(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name not in UNCHECKED}


def check_export_files(directory: Path, verify: bool) -> None:
    """ExportError naming the first file of an export that is missing or not the one exported (its xxh3-128
    differs from urm_export.json's); with ``verify`` False only that each file is there."""
    record = directory / "urm_export.json"
    if not record.is_file():  # a directory built by hand or by another tool: nothing to check against
        return
    try:
        checksums = json.loads(record.read_text(encoding="utf-8-sig")).get("checksums") or {}
        items = [(str(name), str(value)) for name, value in checksums.items()]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ExportError(f"{record}: unreadable ({e}); export it again with `urm export`") from None
    for name, expected in items:
        if not (directory / name).is_file():
            raise ExportError(f"{directory / name} is missing (urm_export.json lists it): export it again "
                              "with `urm export`")
        if verify and file_xxh3(directory / name) != expected:
            raise ExportError(f"{directory / name} has changed since it was exported (its checksum differs from "
                              "urm_export.json's): export it again with `urm export`, or --no-verify if you "
                              "changed it on purpose")


def write_index(tmp: Path, plan: ShardPlan, heads_keys: list[str]) -> dict:
    """The merged model.safetensors.index.json over the backbone shards and the heads shard."""
    weight_map, total = {}, 0
    files = {**{plan.export_file(n): list(m.values()) for n, m in plan.files.items()}, HEADS_SHARD: heads_keys}
    for name, keys in files.items():
        with safe_open(str(tmp / name), framework="pt") as f:
            for key in keys:
                weight_map[key] = name
                sl = f.get_slice(key)
                total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
    index = {"metadata": {"total_size": total, "format": "pt"}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(dtype, 4)


# ----------------------------------------------------------------------------------------------
# Config, code, tokenizer


def urm_section(meta: HeadsMeta, reward_model: bool, base_bias: bool) -> dict:
    """config.json's ``urm`` section: what shapes the heads (read by modeling_urm.urm_settings)."""
    arch, pairs = meta.architecture, meta.pair_calibration
    temperature = {"bt": pairs.temperature_bt, "gaussian": pairs.temperature_gaussian} if pairs else {"bt": 1.0,
                                                                                                    "gaussian": 1.0}
    lengths = [s.cache.max_length for s in (meta.value_head, meta.gating) if s is not None and s.cache.max_length]
    sigma = meta.sigma_calibration
    return {"format_version": 2, "attributes": list(meta.attributes), "members": arch["members"],
            "value_bias": arch["bias"], "gate": arch["gate"], "gate_hidden": arch["gate_hidden"],
            "gate_temperature": arch["temperature"], "base_score": reward_model, "base_score_bias": base_bias,
            "pair_temperature": temperature, "max_length": max(lengths) if lengths else None,
            "sigma_calibrated": sigma is not None and sigma.method == "calibrated",
            "posterior": arch.get("posterior")}


def serves_in_sglang(config, urm: dict) -> bool:
    """Whether SGLang's PUBLISHED_ARCHITECTURE computes this export's score: a Llama backbone, a URM gate
    as wide as the backbone (its Weights are Linear(d, d) twice) and a value head without bias (its
    ``score`` has none, and its loader drops a ``score.bias`` it lacks without a word)."""
    return (config.model_type == "llama" and urm["gate"] == "urm" and urm["gate_hidden"] == config.hidden_size
            and not urm["value_bias"])


def write_config(config, urm: dict, tmp: Path) -> dict:
    """config.json: the backbone's config in the published URM's layout (``num_labels`` 2K, the value
    head's rows; ``architectures`` its class where SGLang's computes the same score, else ours), with
    ``model_type`` "urm" and the backbone's own type in ``urm["backbone_model_type"]``. Label 0 is the
    reward (``logits[:, 0]``, what our model returns; SGLang's /classify gives the same one number).
    ``problem_type`` "regression": with 2K labels and one logit, transformers' text-classification pipeline
    would otherwise softmax that one logit into 1.0; as a regression it returns the reward as is.

    transformers 5.x writes RoPE settings only as ``rope_parameters``; 4.x reads ``rope_theta`` /
    ``rope_scaling`` and would silently fall back to its default theta, so both forms are written.
    """
    urm = {**urm, "backbone_model_type": config.model_type}
    labels = 2 * len(urm["attributes"])
    id2label = {str(i): "score" if i == 0 else f"LABEL_{i}" for i in range(labels)}
    d = {k: v for k, v in config.to_dict().items() if k not in DROP_CONFIG_KEYS}
    d.update(architectures=[PUBLISHED_ARCHITECTURE if serves_in_sglang(config, urm) else OWN_ARCHITECTURE],
             auto_map=dict(AUTO_MAP), urm=urm, model_type=MODEL_TYPE, id2label=id2label,
             label2id={v: int(k) for k, v in id2label.items()}, tie_word_embeddings=False,
             problem_type="regression")  # one output, the reward: transformers' pipeline applies no softmax to it
    d.pop("num_labels", None)  # derived from id2label
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        d.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            d.setdefault("rope_scaling", dict(rope))
    dtype = d.pop("torch_dtype", None) or d.get("dtype")
    if dtype is not None:
        d["dtype"] = str(dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True, default=str) + "\n")
    return d


def write_code(config, tmp: Path) -> None:
    """modeling_urm.py and heads.py as they are, configuration_urm.py with the backbone's config class imported."""
    import transformers

    name = type(config).__name__
    if getattr(transformers, name, None) is not type(config):
        raise ExportError(f"the backbone's config class {name} is not importable from transformers; "
                          "the export supports backbones whose architecture transformers ships")
    for file in CODE_FILES:
        if file != "configuration_urm.py":
            shutil.copyfile(CODE_DIR / file, tmp / file)
    code = (CODE_DIR / "configuration_urm.py").read_text()
    if BACKBONE_CONFIG_LINE not in code:  # the line the export rewrites: without it the config class would stay Llama's
        raise ExportError(f"{CODE_DIR / 'configuration_urm.py'} lacks the line {BACKBONE_CONFIG_LINE!r} that the export "
                          "rewrites to the backbone's config class: the installed package is damaged; reinstall it")
    (tmp / "configuration_urm.py").write_text(
        code.replace(BACKBONE_CONFIG_LINE, f"from transformers import {name} as BackboneConfig"))


def write_tokenizer(tokenizer, directory: Path, tmp: Path) -> None:
    """The backbone's tokenizer files as they are; else saved from the loaded tokenizer.

    ``tokenizer_class: TokenizersBackend`` (written by transformers 5.x) becomes
    ``PreTrainedTokenizerFast``, the name both 4.57 and 5.x resolve to the same fast tokenizer.
    """
    copied = [n for n in TOKENIZER_FILES if (directory / n).is_file()]
    if "tokenizer_config.json" in copied and ("tokenizer.json" in copied or "tokenizer.model" in copied):
        for name in copied:
            shutil.copyfile(directory / name, tmp / name)
    else:
        tokenizer.save_pretrained(tmp)
    config_file = tmp / "tokenizer_config.json"
    cfg = json.loads(config_file.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(cfg, indent=2) + "\n")


def check_tokenizer_round_trip(tmp: Path, template: str, config=None) -> None:
    """The exported tokenizer must render exactly as the one the cache was extracted with (``config``: the
    backbone's, given so that transformers does not look up config.json's model_type "urm")."""
    from transformers import AutoTokenizer

    from pipeline.features import chat_template_hash

    got = chat_template_hash(AutoTokenizer.from_pretrained(tmp, config=config))
    if got != template:
        raise ExportError(f"the exported tokenizer renders with chat template hash {got}, the backbone's with "
                          f"{template}: please report this (backbone tokenizer files could not be carried over)")
