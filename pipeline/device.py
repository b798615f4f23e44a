"""Devices and compute dtypes: the names options accept, what they resolve to on this machine, and loading a
checkpoint into one.

``auto`` is cuda when torch sees a GPU, else cpu; dtype ``auto`` is bf16 on CUDA and fp32 elsewhere
(docs/method.md 5), ``auto-bf16`` bf16 wherever the hardware runs it natively (CUDA, CPUs with AVX-512
BF16 or AMX) and fp32 elsewhere (on AVX2-only CPUs bf16 is emulated, ~6x slower than fp32; docs/method.md 8).
Scoring with an export (`urm score`, `urm serve`, `urm curate`) reads ``auto`` as ``auto-bf16``
(``scoring_dtype``): there memory decides, and fp32 doubles it. Extraction, training, scoring and serving all
resolve here. torch is imported only when a name is resolved, so the option checks that use the names
(``pipeline.configs``) stay light.

``load_in_dtype`` loads a checkpoint into a compute dtype without a second full copy of its weights: in the
dtype its files store (safetensors are memory-mapped, so nothing is read yet), then cast parameter by
parameter in the files' order, so the source pages held at once are about one shard's, not the whole
checkpoint's (transformers' own cast while loading holds them all: a bf16 checkpoint loaded in fp32 peaked
at 1.56x its fp32 bytes, this at 1.25x; ``bench full_shape``).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Callable
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
AUTO_DTYPES = ("auto", "auto-bf16")
DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")  # the device names options accept


def resolve_device(device: str = "auto") -> "torch.device":
    """``auto`` -> cuda when available, else cpu; any other name as torch reads it.

    >>> str(resolve_device("cpu"))
    'cpu'
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_bf16_cpu() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX-512 BF16 or AMX): there bf16 extraction is ~2-3x
    faster than fp32; on AVX2-only CPUs it is emulated and ~6x slower (docs/method.md section 8)."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        if any(check() for check in checks if check is not None):
            return True
    except RuntimeError:
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: "torch.device") -> "torch.dtype":
    """auto = bf16 on CUDA, fp32 elsewhere (docs/method.md section 5); auto-bf16 = bf16 on CUDA and on CPUs with
    native bf16, fp32 elsewhere; a name of ``COMPUTE_DTYPES`` as it is.

    >>> import torch; resolve_dtype("auto", torch.device("cpu"))
    torch.float32
    """
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "auto-bf16":
        native = device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu())
        return torch.bfloat16 if native else torch.float32
    if dtype not in COMPUTE_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use {', '.join(AUTO_DTYPES + COMPUTE_DTYPES)}")
    return getattr(torch, dtype)


def scoring_dtype(dtype: str) -> str:
    """The dtype name scoring with an export resolves: ``auto`` is ``auto-bf16`` there (bf16 where the hardware
    runs it natively, halving the memory of the weights), any other name as it is.

    >>> scoring_dtype("auto"), scoring_dtype("float32")
    ('auto-bf16', 'float32')
    """
    return "auto-bf16" if dtype == "auto" else dtype


SAFETENSORS_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2)}


def stored_parameters(directory: str | Path) -> tuple[str | None, int]:
    """(the floating dtype most of a checkpoint's weight bytes are stored in, its floating parameter count), from
    its safetensors headers alone ((None, 0) without safetensors files)."""
    by_dtype: dict[str, int] = {}
    count = 0
    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):  # a damaged file: the load that follows names it
            continue
        for name, info in header.items():
            if name == "__metadata__" or info.get("dtype") not in SAFETENSORS_DTYPES:
                continue
            numel = 1
            for n in info["shape"]:
                numel *= n
            dtype, width = SAFETENSORS_DTYPES[info["dtype"]]
            by_dtype[dtype] = by_dtype.get(dtype, 0) + numel * width
            count += numel
    return (max(by_dtype, key=by_dtype.get) if by_dtype else None), count


def load_in_dtype(load: Callable[["torch.dtype"], "torch.nn.Module"], directory: str | Path,
                  dtype: "torch.dtype", keep: tuple[str, ...] = ()) -> "torch.nn.Module":
    """``load(dtype)`` (a ``from_pretrained`` of the checkpoint in ``directory``) ending in ``dtype`` without a
    second full copy of the weights: when the files store another floating dtype, ``load`` reads them in theirs
    (memory-mapped) and the parameters are cast one at a time, in order, so each file's pages are let go once its
    tensors are cast. Parameters under the ``keep`` prefixes (modules kept in fp32) are left as loaded."""
    import torch

    stored, _ = stored_parameters(directory)
    if stored is None or getattr(torch, stored) == dtype:
        return load(dtype)
    source = getattr(torch, stored)
    model = load(source)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype == source and not name.startswith(keep):
                p.data = p.data.to(dtype)
    return model
