"""Fused linear KD as dispatcher ops: schemas, fake (meta) kernels and the autograd formula.

Two forward/backward op pairs with one contract (docs/dispatcher_ops.md):

    e3kernels::fused_kd_forward         C++ (csrc/fused_kd.cpp, TORCH_LIBRARY), CPU
    e3kernels::fused_kd_forward_triton  Triton (`triton_kernels.py`, torch.library.custom_op)

    forward(hs [N, Ds], ws [Vs, Ds], ht [N, Dt], wt [Vt, Dt], labels [N] int | None,
            inv_temperature, reverse, ignore_index, vocab_size, compute_ce,
            student_scale=1., student_softcap=None, teacher_scale=1., teacher_softcap=None)
        -> (kl, teacher_entropy, student_lse, teacher_lse, ce, student_lse_t1)
           all fp32; [N] each, except ce and student_lse_t1: [0] unless compute_ce
    backward(grad_kl [N], grad_ce [N] | None, hs, ws, ht, wt, labels, student_lse, teacher_lse,
             kl, student_lse_t1 | None, inv_temperature, reverse, ignore_index, vocab_size,
             need_grad_ws, student_scale=1., student_softcap=None, teacher_scale=1.,
             teacher_softcap=None) -> (grad_hs [N, Ds] in hs.dtype, grad_ws [Vs, Ds] fp32 or [0])

The logit transform of each side (logit_transform.py): y = c tanh(s r / c) with softcap c, else
s r, of the raw tile r = h w^T; the statistics are those of y (KD: y / T, CE: y_s), and the
backward multiplies d loss / d y_s by dy/dr. s = 1, softcap None runs the untransformed code.

A head of another float dtype than its hidden states is cast per tile inside the kernels (the
numbers of w.to(h.dtype), no copy of the head); the autograd formula returns grad_ws in the
head's own dtype.

The Triton ops take four more ints (block_n, block_v, block_d, num_splits; 0 = automatic),
before the four logit-transform arguments (so the forward and backward tails match).
`register_autograd` makes kl and ce differentiable with respect to hs and ws (the teacher gets
no gradient), so `torch.compile(fullgraph=True)` traces the loss and its backward through the
fakes and calls the kernels as opaque nodes. `fused_kd_stats` is the one entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from e3kernels.dispatch import _init as _init_dispatch
from e3kernels.ops.fused_kd import cpp
from e3kernels.ops.fused_kd.logit_transform import IDENTITY, LogitTransform

NSTAT = 7  # ms, ls, mt, lt, x, y, l1 (per-token statistics of one vocab split)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class LaunchOptions:
    """Explicit tile sizes / vocab splits (tests, tuning). None = automatic: the CUDA autotuner,
    or big blocks and one split under the interpreter (its cost is per program x per op)."""

    block_n: int | None = None
    block_v: int | None = None
    block_d: int | None = None
    num_splits: int | None = None

    def as_ints(self) -> tuple[int, int, int, int]:
        return tuple(int(x or 0) for x in (self.block_n, self.block_v, self.block_d,
                                           self.num_splits))

    @staticmethod
    def from_ints(bn: int, bv: int, bd: int, ns: int) -> "LaunchOptions":
        return LaunchOptions(bn or None, bv or None, bd or None, ns or None)


class FusedKDStats(NamedTuple):
    """Per-token results of the forward op, all fp32 [N] (ce, student_lse_t1: [0] unless
    compute_ce). kl and ce are differentiable with respect to hs and ws."""

    kl: torch.Tensor  # KL_i at temperature T
    teacher_entropy: torch.Tensor  # H_i of the teacher at temperature T
    student_lse: torch.Tensor  # logsumexp_v z_s
    teacher_lse: torch.Tensor  # logsumexp_v z_t
    ce: torch.Tensor  # hard-label CE_i on the unscaled student logits
    student_lse_t1: torch.Tensor  # logsumexp_v (T z_s)


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """ValueError unless every label is in [0, vocab_size) or equals ignore_index (one host
    sync; the functional layer calls it for the Triton and reference backends, the C++ ops
    check on their own)."""
    if labels.numel() == 0:
        return
    lab = labels[labels != ignore_index]
    if lab.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(lab))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"labels {tuple(labels.shape)} must be in [0, {vocab_size}) or equal "
                         f"ignore_index; got values in [{lo}, {hi}]")


# ======================================================================================
# Triton custom ops (the kernels module is imported only when an op runs)
# ======================================================================================

@torch.library.custom_op("e3kernels::fused_kd_forward_triton", mutates_args=())
def fused_kd_forward_triton_op(
        hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor,
        labels: torch.Tensor | None, inv_temperature: float, reverse: bool, ignore_index: int,
        vocab_size: int, compute_ce: bool, block_n: int = 0, block_v: int = 0, block_d: int = 0,
        num_splits: int = 0, student_scale: float = 1.0, student_softcap: float | None = None,
        teacher_scale: float = 1.0, teacher_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from e3kernels.ops.fused_kd.triton_kernels import fused_kd_forward_triton

    lab = labels if labels is not None else torch.empty(0, dtype=torch.int64, device=hs.device)
    return tuple(fused_kd_forward_triton(
        hs, ws, ht, wt, lab, inv_temperature, reverse, ignore_index, vocab_size, compute_ce,
        LaunchOptions.from_ints(block_n, block_v, block_d, num_splits),
        LogitTransform(student_scale, student_softcap),
        LogitTransform(teacher_scale, teacher_softcap)))


@torch.library.custom_op("e3kernels::fused_kd_backward_triton", mutates_args=())
def fused_kd_backward_triton_op(
        grad_kl: torch.Tensor, grad_ce: torch.Tensor | None, hs: torch.Tensor, ws: torch.Tensor,
        ht: torch.Tensor, wt: torch.Tensor, labels: torch.Tensor | None,
        student_lse: torch.Tensor, teacher_lse: torch.Tensor, kl: torch.Tensor,
        student_lse_t1: torch.Tensor | None, inv_temperature: float, reverse: bool,
        ignore_index: int, vocab_size: int, need_grad_ws: bool, block_n: int = 0,
        block_v: int = 0, block_d: int = 0, num_splits: int = 0, student_scale: float = 1.0,
        student_softcap: float | None = None, teacher_scale: float = 1.0,
        teacher_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from e3kernels.ops.fused_kd.triton_kernels import fused_kd_backward_triton

    f32 = dict(dtype=torch.float32, device=hs.device)
    lab = labels if labels is not None else torch.empty(0, dtype=torch.int64, device=hs.device)
    dhs, dws = fused_kd_backward_triton(
        grad_kl, grad_ce if grad_ce is not None else torch.empty(0, **f32), hs, ws, ht, wt, lab,
        student_lse, teacher_lse, kl,
        student_lse_t1 if student_lse_t1 is not None else torch.empty(0, **f32),
        inv_temperature, reverse, ignore_index, vocab_size, need_grad_ws,
        LaunchOptions.from_ints(block_n, block_v, block_d, num_splits),
        LogitTransform(student_scale, student_softcap),
        LogitTransform(teacher_scale, teacher_softcap))
    return dhs, dws


# ======================================================================================
# Fakes (shapes and dtypes only) and the autograd formula, shared by both backends
# ======================================================================================

def _forward_fake(hs, ws, ht, wt, labels, inv_temperature, reverse, ignore_index, vocab_size,
                  compute_ce, *rest):
    n = hs.shape[0]
    vec = [hs.new_empty((n,), dtype=torch.float32) for _ in range(4)]
    m = n if compute_ce else 0
    return (*vec, hs.new_empty((m,), dtype=torch.float32), hs.new_empty((m,), dtype=torch.float32))


def _backward_fake(grad_kl, grad_ce, hs, ws, ht, wt, labels, student_lse, teacher_lse, kl,
                   student_lse_t1, inv_temperature, reverse, ignore_index, vocab_size,
                   need_grad_ws, *rest):
    gws = (ws.new_empty(ws.shape, dtype=torch.float32) if need_grad_ws
           else ws.new_empty((0,), dtype=torch.float32))
    return torch.empty_like(hs, memory_format=torch.contiguous_format), gws


def _setup_context(ctx, inputs, output):
    hs, ws, ht, wt, labels, inv_t, reverse, ignore_index, vocab_size, compute_ce = inputs[:10]
    kl, _, lse_s, lse_t, _, lse1 = output
    ctx.save_for_backward(hs, ws, ht, wt, labels, lse_s, lse_t, kl, lse1)
    ctx.args = (float(inv_t), bool(reverse), int(ignore_index), int(vocab_size),
                bool(compute_ce), tuple(inputs[10:]))  # the op's tail: launch ints, transforms


def _make_backward(backward_op):
    def backward(ctx, g_kl, g_ent, g_lse_s, g_lse_t, g_ce, g_lse1):
        hs, ws, ht, wt, labels, lse_s, lse_t, kl, lse1 = ctx.saved_tensors
        inv_t, reverse, ignore_index, vocab_size, compute_ce, rest = ctx.args
        g_kl = torch.zeros_like(kl) if g_kl is None else g_kl.to(torch.float32)
        use_ce = compute_ce and g_ce is not None
        need_ws = bool(ctx.needs_input_grad[1])
        dhs, dws = backward_op(g_kl, g_ce.to(torch.float32) if use_ce else None, hs, ws, ht, wt,
                               labels, lse_s, lse_t, kl, lse1 if use_ce else None, inv_t, reverse,
                               ignore_index, vocab_size, need_ws, *rest)
        grad_hs = dhs.to(hs.dtype) if ctx.needs_input_grad[0] else None
        grad_ws = dws.to(ws.dtype) if need_ws else None
        return (grad_hs, grad_ws) + (None,) * (8 + len(rest))
    return backward


_init_dispatch()
torch.library.register_fake("e3kernels::fused_kd_forward_triton")(_forward_fake)
torch.library.register_fake("e3kernels::fused_kd_backward_triton")(_backward_fake)
torch.library.register_autograd("e3kernels::fused_kd_forward_triton",
                                _make_backward(torch.ops.e3kernels.fused_kd_backward_triton),
                                setup_context=_setup_context)

if cpp.has_fused_kd():
    torch.library.register_fake("e3kernels::fused_kd_forward")(_forward_fake)
    torch.library.register_fake("e3kernels::fused_kd_backward")(_backward_fake)
    torch.library.register_autograd("e3kernels::fused_kd_forward",
                                    _make_backward(torch.ops.e3kernels.fused_kd_backward),
                                    setup_context=_setup_context)


# ======================================================================================
# Entry point
# ======================================================================================

@dataclass(frozen=True)
class FusedKDConfig:
    inv_temperature: float
    reverse: bool
    ignore_index: int
    vocab_size: int
    compute_ce: bool
    backend: str  # "triton" or "cpp"
    launch: LaunchOptions = LaunchOptions()
    student: LogitTransform = IDENTITY
    teacher: LogitTransform = IDENTITY


def fused_kd_stats(hs, ws, ht, wt, labels, cfg: FusedKDConfig) -> FusedKDStats:
    """Per-token statistics of the fused KD op on cfg.backend ("cpp" or "triton"), through the
    dispatcher (differentiable, traceable). Shapes are validated by the public API."""
    args = (hs, ws, ht, wt, labels, float(cfg.inv_temperature), bool(cfg.reverse),
            int(cfg.ignore_index), int(cfg.vocab_size), bool(cfg.compute_ce))
    xf = (float(cfg.student.scale), cfg.student.softcap, float(cfg.teacher.scale),
          cfg.teacher.softcap)
    if cfg.backend == "cpp":
        cpp.require_fused_kd()
        out = torch.ops.e3kernels.fused_kd_forward(*args, *xf)
    elif cfg.backend == "triton":
        out = torch.ops.e3kernels.fused_kd_forward_triton(*args, *cfg.launch.as_ints(), *xf)
    else:
        raise ValueError(f"fused_kd_stats backend must be 'triton' or 'cpp', got {cfg.backend!r}")
    return FusedKDStats(*out)
