"""The numeric precision of a fine-tune: the frozen backbone in a low-precision dtype where the device computes it
fast, the trained weights (LoRA, heads) in fp32, and the forward under autocast in the backbone's dtype.

`model.backbone_dtype` names the dtype the frozen weights load in: `float32`, `bfloat16`, `float16`, or `auto`:
bfloat16 where the device has a bf16 fast path (a CUDA GPU that supports it; a CPU with AVX512_BF16 or AMX), else
float32. Only the frozen weights change: the weights that train stay fp32 (their updates are too small for bf16's
8 bits of mantissa), and autocast runs each matmul in the backbone's dtype, so a LoRA layer's fp32 weights meet
bf16 activations without a cast of their own. Lightning's `trainer.precision` works beside it as Lightning says:
`bf16-mixed` autocasts too (the same computation), `bf16-true` converts every weight to bf16, trained ones included.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal, Union

import torch
from torch import nn

BackboneDtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: /proc/cpuinfo flags of the x86 CPUs whose bf16 matmuls beat fp32 (AVX512_BF16: Zen 4+, Cooper Lake; AMX: Sapphire
#: Rapids+). Elsewhere (older x86, ARM without a Linux cpuinfo) bf16 is emulated and slower than fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_fast_bf16(cpuinfo: Union[str, Path] = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512_BF16 or AMX), from its Linux cpuinfo flags."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_dtype(name: BackboneDtype, device: Union[str, torch.device]) -> torch.dtype:
    """The torch dtype `model.backbone_dtype` means on `device`."""
    if name != "auto":
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def default_device() -> torch.device:
    """Where a model loaded outside a Trainer (export, serve, evaluate) will run by default."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def keep_trained_weights_fp32(model: nn.Module) -> None:
    """Cast the weights that train (LoRA matrices, heads) to fp32 in place; the frozen ones keep their dtype."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def autocast(device: Union[str, torch.device], dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device` (nothing to do for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
