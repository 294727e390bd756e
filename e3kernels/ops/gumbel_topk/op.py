"""Gumbel-TopK as dispatcher ops: schemas, fake (meta) kernels and the autograd formula.

    e3kernels::gumbel_topk_forward[_triton](logits [B, L], k_per_row [B] int32, tau, seed,
        offset, relaxation (0 softmax, 1 sigmoid), want_soft, want_indices, k_max)
        -> (mask [B, L], soft [B, L] or [0], indices [B, k_max] int64 or [0],
            pivots [B, 2] int32 (sigmoid) or [0, 2])            (outputs in the logits dtype)
    e3kernels::gumbel_topk_backward[_triton](logits, k_per_row, pivots?, grad [B, L], tau, seed,
        offset, relaxation, k_max) -> d logits = J_s(y)^T grad / tau      (noise regenerated)
    e3kernels::gumbel_noise[_triton](B, L, seed, offset) -> g [B, L] fp32
    e3kernels::gumbel_from_bits[_triton](x int64) -> fp32 noise of the uint32 draws x

The C++ ops come from csrc/gumbel_topk.cpp (TORCH_LIBRARY), the Triton ones are
`torch.library.custom_op`s around `triton_kernels.py`. seed and offset are uint64 values passed
as int64 (two's complement, `to_i64`). `register_autograd` on the forward op gives the mask and
the soft output the straight-through gradient, so `torch.compile(fullgraph=True)` traces it.
"""

from __future__ import annotations

import torch

from e3kernels.dispatch import _init as _init_dispatch
from e3kernels.ops.gumbel_topk import cpp
from e3kernels.reference import GUMBEL_RELAXATIONS

RELAX_ID = {name: i for i, name in enumerate(GUMBEL_RELAXATIONS)}  # softmax 0, sigmoid 1


def to_i64(v: int) -> int:
    """uint64 -> the int64 with the same bits (a schema `int` is int64)."""
    v = int(v)
    return v - (1 << 64) if v >= 1 << 63 else v


def split64(v: int) -> tuple[int, int]:
    """(low, high) 32-bit words of a uint64 given as uint64 or its int64 twin."""
    return v & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF


def split_tau(tau: float) -> tuple[float, float]:
    """tau as fp32 (hi, lo): hi = fp32(tau) (what fp32 compute divides by, like the reference),
    hi + lo = tau to ~2^-48 relative (fp64 compute)."""
    hi = float(torch.tensor(tau, dtype=torch.float32))
    return hi, float(torch.tensor(tau - hi, dtype=torch.float32))


def check_finite(logits: torch.Tensor) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits must be finite (no NaN or +-inf), found non-finite values")


# ======================================================================================
# Triton custom ops (the kernels module is imported only when an op runs)
# ======================================================================================

@torch.library.custom_op("e3kernels::gumbel_topk_forward_triton", mutates_args=())
def gumbel_topk_forward_triton_op(
        logits: torch.Tensor, k_per_row: torch.Tensor, tau: float, seed: int, offset: int,
        relaxation: int, want_soft: bool, want_indices: bool, k_max: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from e3kernels.ops.gumbel_topk.triton_kernels import gumbel_topk_forward_triton

    check_finite(logits)
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    mask, soft, idx, piv = gumbel_topk_forward_triton(
        x, k_per_row.to(torch.int32).contiguous(), k_max, tau, seed, offset,
        GUMBEL_RELAXATIONS[relaxation], want_soft, want_indices)
    dev = logits.device
    return (mask,
            soft if soft is not None else logits.new_empty((0,)),
            idx if idx is not None else torch.empty((0,), dtype=torch.int64, device=dev),
            piv if piv is not None else torch.empty((0, 2), dtype=torch.int32, device=dev))


@torch.library.custom_op("e3kernels::gumbel_topk_backward_triton", mutates_args=())
def gumbel_topk_backward_triton_op(
        logits: torch.Tensor, k_per_row: torch.Tensor, pivots: torch.Tensor | None,
        grad: torch.Tensor, tau: float, seed: int, offset: int, relaxation: int, k_max: int,
) -> torch.Tensor:
    from e3kernels.ops.gumbel_topk.triton_kernels import gumbel_topk_backward_triton

    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    return gumbel_topk_backward_triton(
        x, k_per_row.to(torch.int32).contiguous(), k_max,
        pivots if relaxation == 1 else None, grad.contiguous(), tau, seed, offset,
        GUMBEL_RELAXATIONS[relaxation])


@torch.library.custom_op("e3kernels::gumbel_noise_triton", mutates_args=())
def gumbel_noise_triton_op(B: int, L: int, seed: int, offset: int,
                           device: torch.device) -> torch.Tensor:
    from e3kernels.ops.gumbel_topk.triton_kernels import gumbel_noise_triton

    return gumbel_noise_triton(B, L, seed, offset, device)


@torch.library.custom_op("e3kernels::gumbel_from_bits_triton", mutates_args=())
def gumbel_from_bits_triton_op(x: torch.Tensor) -> torch.Tensor:
    from e3kernels.ops.gumbel_topk.triton_kernels import gumbel_from_bits_triton

    return gumbel_from_bits_triton(x)


# ======================================================================================
# Fakes and the autograd formula, shared by both backends
# ======================================================================================

def _forward_fake(logits, k_per_row, tau, seed, offset, relaxation, want_soft, want_indices,
                  k_max):
    b, n = logits.shape
    mask = logits.new_empty((b, n))
    soft = logits.new_empty((b, n) if want_soft else (0,))
    idx = logits.new_empty((b, k_max) if want_indices else (0,), dtype=torch.int64)
    piv = logits.new_empty((b if relaxation == 1 else 0, 2), dtype=torch.int32)
    return mask, soft, idx, piv


def _backward_fake(logits, k_per_row, pivots, grad, tau, seed, offset, relaxation, k_max):
    return logits.new_empty(logits.shape)


def _noise_fake(B, L, seed, offset, device=None):
    return torch.empty((B, L), dtype=torch.float32, device=device or "cpu")


def _bits_fake(x):
    return x.new_empty(x.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    logits, k_per_row, tau, seed, offset, relaxation, want_soft, _, k_max = inputs
    ctx.save_for_backward(logits, k_per_row, output[3])
    ctx.args = (tau, seed, offset, relaxation, bool(want_soft), k_max)


def _make_backward(backward_op):
    def backward(ctx, g_mask, g_soft, g_idx, g_piv):
        logits, k_per_row, piv = ctx.saved_tensors
        tau, seed, offset, relaxation, want_soft, k_max = ctx.args
        if not want_soft:
            g_soft = None
        grad = g_mask if g_soft is None else (g_soft if g_mask is None else g_mask + g_soft)
        if grad is None or not ctx.needs_input_grad[0]:
            return (None,) * 9
        dx = backward_op(logits, k_per_row, piv if relaxation == 1 else None,
                         grad.contiguous(), tau, seed, offset, relaxation, k_max)
        return (dx,) + (None,) * 8
    return backward


def _register(suffix: str) -> None:
    ns = "e3kernels::"
    torch.library.register_fake(f"{ns}gumbel_topk_forward{suffix}")(_forward_fake)
    torch.library.register_fake(f"{ns}gumbel_topk_backward{suffix}")(_backward_fake)
    torch.library.register_fake(f"{ns}gumbel_noise{suffix}")(_noise_fake)
    torch.library.register_fake(f"{ns}gumbel_from_bits{suffix}")(_bits_fake)
    bwd = getattr(torch.ops.e3kernels, f"gumbel_topk_backward{suffix}")
    torch.library.register_autograd(f"{ns}gumbel_topk_forward{suffix}", _make_backward(bwd),
                                    setup_context=_setup_context)


_init_dispatch()
_register("_triton")
if cpp.has_gumbel_topk():
    _register("")


# ======================================================================================
# Entry points
# ======================================================================================

def gumbel_topk_op(logits, k_rows, tau: float, seed: int, offset: int, relaxation: str,
                   want_soft: bool, want_indices: bool, k_max: int, backend: str):
    """(mask, soft, indices, pivots) of the forward op on `backend` ("cpp" or "triton"),
    differentiable through the dispatcher; arguments validated by the caller."""
    args = (logits, k_rows, float(tau), to_i64(seed), to_i64(offset), RELAX_ID[relaxation],
            bool(want_soft), bool(want_indices), int(k_max))
    if backend == "cpp":
        cpp.require_gumbel_topk()
        return torch.ops.e3kernels.gumbel_topk_forward(*args)
    if backend == "triton":
        return torch.ops.e3kernels.gumbel_topk_forward_triton(*args)
    raise ValueError(f"gumbel_topk_op backend must be 'triton' or 'cpp', got {backend!r}")


def gumbel_noise_op(b: int, n: int, seed: int, offset: int, device, backend: str):
    if backend == "cpp":
        cpp.require_gumbel_topk()
        return torch.ops.e3kernels.gumbel_noise(b, n, to_i64(seed), to_i64(offset))
    return torch.ops.e3kernels.gumbel_noise_triton(b, n, to_i64(seed), to_i64(offset),
                                                   torch.device(device))


def gumbel_from_bits_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "cpp":
        cpp.require_gumbel_topk()
        return torch.ops.e3kernels.gumbel_from_bits(x)
    return torch.ops.e3kernels.gumbel_from_bits_triton(x)
