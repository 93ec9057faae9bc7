"""Numeric precision of a run: autocast for bf16/fp16, TF32 matrix products for tf32, and full
fp32 matrix products in evaluation whatever training used."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# tf32: fp32 everywhere except matrix products, which use TF32 tensor cores (set_matmul_precision).
AUTOCAST_DTYPES = {"32": None, "tf32": None, "bf16": torch.bfloat16, "16": torch.float16}


def autocast(device: torch.device, precision: str, cache_enabled: bool = True) -> torch.autocast:
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=cache_enabled)


def set_matmul_precision(precision: str) -> None:
    """TF32 matrix products for trainer.precision=tf32, full fp32 ones otherwise (set per run:
    the setting is process-wide and runs may share a process)."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """Evaluation's matrix products run in full fp32 even when training used TF32
    (trainer.precision=tf32): the reported metrics are those of the trained weights, not of a
    faster approximation. (Convolutions follow PyTorch's own cuDNN default in every mode.)"""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
