"""Devices and compute dtypes: the names options accept, and what they resolve to on this machine.

``auto`` is cuda when torch sees a GPU, else cpu; dtype ``auto`` is bf16 on CUDA and fp32 elsewhere
(METHOD.md 5), ``auto-bf16`` bf16 wherever the hardware runs it natively (CUDA, CPUs with AVX-512
BF16 or AMX) and fp32 elsewhere (on AVX2-only CPUs bf16 is emulated, ~6x slower than fp32; METHOD.md 8).
Extraction, training, scoring and serving all resolve here. torch is imported only when a name is
resolved, so the option checks that use the names (``pipeline.configs``) stay light.
"""

from __future__ import annotations

import re
from pathlib import Path
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
    faster than fp32; on AVX2-only CPUs it is emulated and ~6x slower (METHOD.md section 8)."""
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
    """auto = bf16 on CUDA, fp32 elsewhere (METHOD.md section 5); auto-bf16 = bf16 on CUDA and on CPUs with
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
