"""Gumbel-TopK, functional and Module layer: argument checks, backend dispatch, the result
object and `GumbelTopK` (maths in the package docstring, `e3kernels.ops.gumbel_topk`)."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import nn

from e3kernels.dispatch import resolve_backend
from e3kernels.ops.gumbel_topk.op import gumbel_from_bits_op, gumbel_noise_op, gumbel_topk_op
from e3kernels.reference import GUMBEL_RELAXATIONS, gumbel_noise_ref, gumbel_topk_ref

__all__ = ["GumbelTopK", "GumbelTopKOutput", "MAX_TRITON_L", "gumbel_from_bits", "gumbel_noise",
           "gumbel_topk", "topk_mask"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TRITON_L = 16384  # one row per tile in registers


class GumbelTopKOutput(NamedTuple):
    mask: torch.Tensor  # [B, L] straight-through mask (logits dtype), values exactly 0/1
    soft: torch.Tensor | None  # [B, L] relaxation s (logits dtype), differentiable
    indices: torch.Tensor | None  # [B, max k] int64 selected columns ascending, -1 padded


def gumbel_from_bits(x: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """fp32 Gumbel noise from uint32 draws held in an int64 tensor (tests of the contract)."""
    if backend == "reference":
        from e3kernels.reference import gumbel_from_bits_ref
        return gumbel_from_bits_ref(x)
    if backend not in ("cpp", "triton"):
        raise ValueError(f"backend must be 'reference', 'cpp' or 'triton', got {backend!r}")
    return gumbel_from_bits_op(x, backend)


def gumbel_noise(batch: int, length: int, seed: int = 0, offset: int = 0,
                 device: torch.device | str = "cpu", backend: str = "auto") -> torch.Tensor:
    """The fp32 noise g [batch, length] that `gumbel_topk` adds (identical on every backend)."""
    device = torch.device(device)
    _check_u64("seed", seed)
    _check_u64("offset", offset)
    be = resolve_backend(device, backend)
    if be == "reference":
        return gumbel_noise_ref(batch, length, seed, offset, device)
    return gumbel_noise_op(batch, length, seed, offset, device, be)


def _check_u64(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= int(v) < 2 ** 64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {v!r}")


def _validate(logits, k, tau, seed, offset, relaxation, check_finite=True):
    """Checks the arguments; returns (logits [B, L], k_rows [B] int32, k_max).
    check_finite=False leaves the finiteness check to the C++ / Triton op (one pass fewer);
    while torch.compile traces, the (host-syncing) check is skipped on the reference too."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError("logits dtype must be one of float16, bfloat16, float32, float64, "
                         f"got {logits.dtype}")
    if logits.dim() not in (1, 2):
        raise ValueError("logits must be 1-D [L] or 2-D [B, L], got shape "
                         f"{tuple(logits.shape)}")
    x = logits if logits.dim() == 2 else logits.unsqueeze(0)
    b, n = x.shape
    if n < 1:
        raise ValueError(f"logits must have L >= 1 columns, got shape {tuple(logits.shape)}")
    if check_finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
        raise ValueError("logits must be finite (no NaN or +-inf), found non-finite values")
    if relaxation not in GUMBEL_RELAXATIONS:
        raise ValueError(f"relaxation must be one of {GUMBEL_RELAXATIONS}, got {relaxation!r}")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not (
            math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite real > 0, got {tau!r}")
    _check_u64("seed", seed)
    _check_u64("offset", offset)
    if isinstance(k, torch.Tensor):
        if k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
            raise ValueError(f"k must be an int or an integer tensor of shape [B], got dtype "
                             f"{k.dtype}")
        if k.dim() > 1 or (k.dim() == 1 and k.shape[0] != b):
            raise ValueError(f"k tensor must have shape [] or [B] = [{b}], got "
                             f"{tuple(k.shape)}")
        kr = k.to(device=x.device, dtype=torch.int64).expand(b)
        lo, hi = (int(v) for v in torch.aminmax(kr)) if b else (0, 0)
        if lo < 0 or hi > n:
            raise ValueError(f"k must be in [0, L] = [0, {n}], got values in [{lo}, {hi}]")
        return x, kr.to(torch.int32).contiguous(), hi
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an int or an integer tensor of shape [B], got {k!r}")
    if not 0 <= int(k) <= n:
        raise ValueError(f"k must be in [0, L] = [0, {n}], got {k}")
    return x, torch.full((b,), int(k), dtype=torch.int32, device=x.device), int(k) if b else 0


def gumbel_topk(
    logits: torch.Tensor,
    k: int | torch.Tensor,
    tau: float = 1.0,
    seed: int = 0,
    offset: int = 0,
    relaxation: str = "softmax",
    return_soft: bool = False,
    return_indices: bool = False,
    backend: str = "auto",
) -> torch.Tensor | GumbelTopKOutput:
    """Straight-through Gumbel-TopK mask (see the module docstring for the maths).

    logits [B, L] or [L] (fp16/bf16/fp32/fp64, finite), k int or [B] ints in [0, L],
    tau > 0, seed and offset ints in [0, 2^64) (the noise is a pure function of
    (seed, offset, row, column)). relaxation "softmax" (successive softmax) or "sigmoid".
    backend: "auto" (CUDA -> Triton, CPU -> C++), "triton", "cpp" or "reference".

    Returns the mask m + s - stopgrad(s) (logits dtype, shape of logits, exactly k ones per
    row), or GumbelTopKOutput(mask, soft, indices) if return_soft or return_indices
    (indices: [B, max k] int64 selected columns ascending, -1 padded). Bad arguments raise
    ValueError naming the argument and its allowed range.
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    be = resolve_backend(logits.device, backend)
    # the C++ and Triton forward ops check finiteness in their own pass (same ValueError)
    x, k_rows, k_max = _validate(logits, k, tau, seed, offset, relaxation,
                                 check_finite=be == "reference")
    if be == "triton" and x.shape[1] > MAX_TRITON_L:
        raise ValueError(f"logits L must be <= {MAX_TRITON_L} on the triton backend, got "
                         f"{x.shape[1]}")
    if be == "reference":
        ref = gumbel_topk_ref(x, k_rows.to(torch.int64), tau, int(seed), int(offset), relaxation,
                              k_max=k_max)
        mask, soft, idx = ref.mask, ref.soft, ref.indices
    else:
        mask, soft, idx, _ = gumbel_topk_op(x, k_rows, tau, seed, offset, relaxation,
                                            return_soft, return_indices, k_max, be)
        soft = soft if return_soft else None  # (the ops return [0] for outputs not asked for)
        idx = idx if return_indices else None
    if logits.dim() == 1:
        mask = mask[0]
        soft = soft[0] if soft is not None else None
        idx = idx[0] if idx is not None else None
    if not (return_soft or return_indices):
        return mask
    return GumbelTopKOutput(mask, soft if return_soft else None,
                            idx if return_indices else None)


def topk_mask(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Noiseless hard top-k mask of logits (ties -> lower index), logits dtype, no gradient."""
    x, k_rows, _ = _validate(logits, k, 1.0, 0, 0, "softmax")
    order = torch.sort(x.detach(), dim=1, descending=True, stable=True).indices
    n = x.shape[1]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device)
                                            .expand_as(order).contiguous())
    m = (rank < k_rows[:, None]).to(logits.dtype)
    return m[0] if logits.dim() == 1 else m


def _indices_from_mask(m: torch.Tensor) -> torch.Tensor:
    """Selected columns of a 0/1 mask [.., L], ascending, -1 padded to the max count."""
    n = m.shape[-1]
    cols = torch.arange(n, device=m.device)
    kmax = int((m > 0).sum(-1).max()) if m.numel() else 0
    idx = torch.sort(torch.where(m > 0, cols, cols + n), dim=-1).values[..., :kmax]
    return torch.where(idx < n, idx, torch.full_like(idx, -1))


class GumbelTopK(nn.Module):
    """Straight-through Gumbel-TopK sampler with a temperature schedule.

    Each training call draws fresh noise: offset = `self.step` (a buffer, saved in the
    state dict), incremented per call, so a run is deterministic given `seed` and resumes
    the same stream. In eval mode (hard_eval=True) it returns the noiseless top-k mask.
    Temperature: `set_tau(tau)`, or `anneal(step, total)`:
        tau(step) = tau0 (tau_min / tau0)^{min(step / total, 1)}   (exponential, tau0 -> tau_min)
    """

    def __init__(self, k: int, tau: float = 1.0, *, tau_min: float = 0.1, seed: int = 0,
                 relaxation: str = "softmax", backend: str = "auto", hard_eval: bool = True):
        super().__init__()
        for name, v in (("tau", tau), ("tau_min", tau_min)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (
                    math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite real > 0, got {v!r}")
        if relaxation not in GUMBEL_RELAXATIONS:
            raise ValueError(f"relaxation must be one of {GUMBEL_RELAXATIONS}, "
                             f"got {relaxation!r}")
        _check_u64("seed", seed)
        self.k = k
        self.tau0 = float(tau)
        self.tau = float(tau)
        self.tau_min = float(tau_min)
        self.seed = int(seed)
        self.relaxation = relaxation
        self.backend = backend
        self.hard_eval = hard_eval
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # host copy of `step`, read while torch.compile traces (int(self.step) is a host sync,
        # a graph break); re-synced from the buffer on every eager call and state-dict load
        self._host_step = 0
        self.register_load_state_dict_post_hook(GumbelTopK._sync_host_step)

    @staticmethod
    def _sync_host_step(module, incompatible_keys) -> None:
        module._host_step = int(module.step)

    def set_tau(self, tau: float) -> None:
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not (
                math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a finite real > 0, got {tau!r}")
        self.tau = float(tau)

    def anneal(self, step: int, total: int) -> float:
        """Set tau = tau0 (tau_min/tau0)^{min(step/total, 1)} and return it."""
        if total <= 0:
            raise ValueError(f"total must be an int > 0, got {total!r}")
        frac = min(max(step / total, 0.0), 1.0)
        self.set_tau(self.tau0 * (self.tau_min / self.tau0) ** frac)
        return self.tau

    def forward(self, logits: torch.Tensor, k: int | torch.Tensor | None = None, *,
                return_soft: bool = False, return_indices: bool = False):
        k = self.k if k is None else k
        if not self.training and self.hard_eval:
            m = topk_mask(logits, k)
            if not (return_soft or return_indices):
                return m
            idx = _indices_from_mask(m) if return_indices else None
            return GumbelTopKOutput(m, m if return_soft else None, idx)
        offset = self._host_step if torch.compiler.is_compiling() else int(self.step)
        self._host_step = offset + 1
        self.step += 1
        return gumbel_topk(logits, k, tau=self.tau, seed=self.seed, offset=offset,
                           relaxation=self.relaxation, return_soft=return_soft,
                           return_indices=return_indices, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"k={self.k}, tau={self.tau:g}, tau0={self.tau0:g}, tau_min={self.tau_min:g}, "
                f"relaxation={self.relaxation!r}, seed={self.seed}")
