"""Mixed precision: the autocast context of an `amp` setting ("bf16", "fp16", "none") and
the dtype the LM head sees under it."""

from __future__ import annotations

import contextlib

import torch

_AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16}


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of `amp` ("bf16", "fp16"), or None for None/"none"/"off"."""
    if amp in (None, "none", "off"):
        return None
    if amp not in _AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(_AMP_DTYPES)} or 'none', got {amp!r}")
    return _AMP_DTYPES[amp]


def autocast(device: torch.device | str, amp: str | None):
    """bf16/fp16 autocast context for `amp` in {"bf16", "fp16"}, or a no-op for None/"none"."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def head_input(h: torch.Tensor, amp: str | None) -> torch.Tensor:
    """Final hidden states [..., D] as the LM head sees them under `amp`: in the amp dtype,
    as autocast casts a Linear's input (the fused KD loss then casts the head to match and
    runs its bf16 GEMM path); unchanged without amp. Differentiable."""
    dtype = amp_dtype(amp)
    return h if dtype is None or h.dtype == dtype else h.to(dtype)
