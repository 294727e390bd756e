"""Mixed precision: the autocast context of an `amp` setting ("bf16", "fp16", "none"), the
dtype the LM head sees under it, and what "auto" means on the machine at hand."""

from __future__ import annotations

import contextlib

import torch

_AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16}


AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 GEMMs run natively here: a CUDA device with bf16, or a CPU on which
    oneDNN has a bf16 path (AVX512-BF16, AMX, or AVX-512 core). On AVX2-only CPUs (e.g. AMD
    Zen 2) torch emulates bf16 matmuls, measured 7x slower than fp32 for the bundled model's
    forward (docs/design-changes.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str, device: torch.device | str = "cpu") -> str:
    """The concrete setting of `amp`: "auto" is "bf16" where bf16 is native (see
    native_bf16) and "none" (fp32) elsewhere; the others are returned unchanged."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device) else "none"


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


def frozen_amp_copy(model: torch.nn.Module, amp: str | None,
                    modules: list[torch.nn.Module]) -> torch.nn.Module:
    """A frozen copy of `model` for no-grad forwards under `autocast(amp)` whose fp32
    `nn.Linear` weights and biases inside `modules` (e.g. the decoder layers) are stored in
    the amp dtype, so autocast does not cast them again at every forward. Autocast casts a
    Linear's fp32 weight by rounding to its dtype; storing the rounded weight gives the
    same GEMM inputs, so the outputs are bit for bit those of `model` under autocast.
    Every other parameter and buffer (norms, embeddings, head) is shared with `model`, not
    copied. `model` itself is returned when there is nothing to cast (no amp, or no fp32
    Linear in `modules`). The copy carries no layer gates."""
    import copy

    from e3pruner.models.gates import remove_gates

    dtype = amp_dtype(amp)
    if dtype is None:
        return model
    low = {}
    for lin in (m for mod in modules for m in mod.modules() if isinstance(m, torch.nn.Linear)):
        for t in (lin.weight, lin.bias):
            if t is not None and t.dtype == torch.float32:
                low[id(t)] = torch.nn.Parameter(t.detach().to(dtype), requires_grad=False)
    if not low:
        return model
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())
            if id(t) not in low}
    memo.update(low)
    twin = copy.deepcopy(model, memo)
    remove_gates(twin)  # (the copied gate wrappers would run the original's layers)
    return twin.eval()
