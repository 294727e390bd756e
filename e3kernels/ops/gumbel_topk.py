"""Gumbel-TopK with a straight-through gradient: Triton kernels, C++ dispatch, autograd, module.

Semantics (defined by `e3kernels.reference.gumbel_topk_ref`, matched by every backend), for
logits alpha [B, L], k (int or [B]) in [0, L], tau > 0:

    g[r, c] = -log(-log(u)),  u = (2 (x >> 9) + 1) 2^-24,
    x = Philox4x32-10(counter = (c >> 2, r, offset_lo, offset_hi), key = (seed_lo, seed_hi))[c & 3]
    z = alpha + g,  y = z / tau,  m = top-k of z per row (ties -> lower column index)
    "softmax" (default, successive softmax / relaxed top-k):
        a^0 = y,  p^j = softmax(a^{j-1}),  a^j = a^{j-1} + log(max(1 - p^j, 2^-126)) / tau,
        s = sum_{j<=k} p^j  (Xie & Ermon 2019: the penalty accumulates on the unscaled z, so
        s -> m as tau -> 0; 1 - p of a unique row max is computed as (sum of the other exps)/Z);
        s = 1 if k = L. sum(s) = k but single s_i may exceed 1 (more so for tau > 1).
    "sigmoid": s = sigmoid(y - t), t = (y_(k) + y_(k+1)) / 2 (k-th and (k+1)-th largest y,
        differentiable through those two entries); s = 0 if k = 0, s = 1 if k = L
    output m_st = m + s - stopgrad(s): forward value exactly m (k ones per row),
    backward d alpha = J_s(y)^T (d m_st + d s) / tau.

The noise is computed in fp32 with IEEE +, -, * only (log by a fixed Cephes polynomial, no
FMA: Triton is launched with enable_fp_fusion=False) so the mask is bit-identical on the
reference, C++ and Triton. z is fp32 (fp64 for fp64 logits); y and s use the same dtype.

Backward: regenerates the noise from (seed, offset) instead of saving it. Saved for
backward: the logits (already held by autograd: the mask-search alpha is a leaf), k per row
([B] int32) and, for "sigmoid", the two pivot columns ([B, 2] int32). No [B, L] activation
is kept; Philox + two logs per element cost less than writing and re-reading y on a GPU.
"softmax" backward re-runs the k-step recursion; the Triton kernel keeps nothing in memory
and recomputes p^j for each reverse step (O(k^2 L) per row), the C++ kernel stores the k
steps of one row in a per-thread scratch (O(k L)).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import nn

from e3kernels.dispatch import cpp_extension, resolve_backend, triton_importable
from e3kernels.reference import GUMBEL_RELAXATIONS, SOFTMAX_EPS, gumbel_noise_ref, gumbel_topk_ref

__all__ = ["GumbelTopK", "GumbelTopKOutput", "gumbel_noise", "gumbel_topk",
           "gumbel_topk_backward", "gumbel_topk_forward", "topk_mask"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_RELAX_ID = {name: i for i, name in enumerate(GUMBEL_RELAXATIONS)}  # softmax 0, sigmoid 1
_LOG_EPS = math.log(SOFTMAX_EPS)
MAX_TRITON_L = 16384  # one row per tile in registers

if triton_importable():
    import triton
    import triton.language as tl
else:  # pragma: no cover - triton is a dependency; keep the module importable without it
    triton = None


class GumbelTopKOutput(NamedTuple):
    mask: torch.Tensor  # [B, L] straight-through mask (logits dtype), values exactly 0/1
    soft: torch.Tensor | None  # [B, L] relaxation s (logits dtype), differentiable
    indices: torch.Tensor | None  # [B, max k] int64 selected columns ascending, -1 padded


# ======================================================================================
# Triton kernels
# ======================================================================================

if triton is not None:

    @triton.jit
    def _philox4x32_10(c0, c1, c2, c3, k0, k1):
        for _ in tl.static_range(10):
            _c0 = c0
            _c2 = c2
            c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
            c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
            c1 = _c2 * 0xCD9E8D57
            c3 = _c0 * 0xD2511F53
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def _e3_logf(x):
        # == reference.e3_logf_ref, op for op (fp32, no FMA: launch with enable_fp_fusion=False)
        bits = x.to(tl.int32, bitcast=True)
        e = (bits >> 23) - 126
        m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
        small = m < 0.7071067690849304
        e = tl.where(small, e - 1, e)
        f = tl.where(small, (m + m) - 1.0, m - 1.0)
        z = f * f
        p = f * 0.07037683576345444
        p = p + -0.11514610052108765
        p = p * f
        p = p + 0.11676998436450958
        p = p * f
        p = p + -0.12420140951871872
        p = p * f
        p = p + 0.14249323308467865
        p = p * f
        p = p + -0.16668057441711426
        p = p * f
        p = p + 0.2000071406364441
        p = p * f
        p = p + -0.24999994039535522
        p = p * f
        p = p + 0.3333333134651184
        y = (p * f) * z
        fe = e.to(tl.float32)
        y = y + fe * -0.00021219444170128554
        y = y + z * -0.5
        r = f + y
        return r + fe * 0.693359375

    @triton.jit
    def _gumbel_from_bits(x):
        u = ((x >> 9) * 2 + 1).to(tl.int32, bitcast=True).to(tl.float32) * 5.9604644775390625e-08
        return -_e3_logf(-_e3_logf(u))

    @triton.jit
    def _gumbel_tile(rows, cols, seed_lo, seed_hi, off_lo, off_hi,
                     BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr):
        """fp32 noise [BLOCK_B, BLOCK_L] for global rows/cols (pure function of the position)."""
        zero = tl.zeros([BLOCK_B, BLOCK_L], dtype=tl.uint32)
        c0 = zero + (cols >> 2).to(tl.uint32)[None, :]
        c1 = zero + rows.to(tl.uint32)[:, None]
        c2 = zero + off_lo.to(tl.uint32)
        c3 = zero + off_hi.to(tl.uint32)
        r0, r1, r2, r3 = _philox4x32_10(c0, c1, c2, c3, seed_lo.to(tl.uint32),
                                        seed_hi.to(tl.uint32))
        lane = (cols & 3)[None, :]
        x = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
        return _gumbel_from_bits(x)

    @triton.jit
    def _load_z(x_ptr, rows, cols, valid, stride_x, seed_lo, seed_hi, off_lo, off_hi,
                F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr):
        g = _gumbel_tile(rows, cols, seed_lo, seed_hi, off_lo, off_hi, BLOCK_B, BLOCK_L)
        offs = rows.to(tl.int64)[:, None] * stride_x + cols[None, :]
        alpha = tl.load(x_ptr + offs, mask=valid, other=0.0)
        if F64:
            z = alpha.to(tl.float64) + g.to(tl.float64)
        else:
            z = alpha.to(tl.float32) + g
        return z

    @triton.jit
    def _topk_select(z, valid, kk, cols, F64: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_L: tl.constexpr):
        """Top-k per row by a radix select on order-preserving integer keys of z.

        Returns sel [BB, BL] (exactly k per row, ties -> lower column) and the pivot columns
        ik (k-th largest, -1 if k = 0) and ik1 ((k+1)-th largest, -1 if k = L).
        """
        z = tl.where(z == 0.0, 0.0, z)  # -0 -> +0 so that the keys tie like the floats
        if F64:
            ub = z.to(tl.uint64, bitcast=True)
            key = tl.where((ub >> 63) == 1, ~ub, ub | 0x8000000000000000)
            thr = tl.zeros([BLOCK_B], dtype=tl.uint64)
            one = tl.full([BLOCK_B], 1, dtype=tl.uint64)
            nbits: tl.constexpr = 64
        else:
            ub = z.to(tl.uint32, bitcast=True)
            key = tl.where((ub >> 31) == 1, ~ub, ub | 0x80000000)
            thr = tl.zeros([BLOCK_B], dtype=tl.uint32)
            one = tl.full([BLOCK_B], 1, dtype=tl.uint32)
            nbits: tl.constexpr = 32
        # thr <- the largest t with #(key >= t) >= k, i.e. the k-th largest key
        for i in range(nbits):
            cand = thr | (one << (nbits - 1 - i))
            cnt = tl.sum(tl.where(valid & (key >= cand[:, None]), 1, 0), axis=1)
            thr = tl.where(cnt >= kk, cand, thr)
        gt = valid & (key > thr[:, None])
        n_gt = tl.sum(gt.to(tl.int32), axis=1)
        eq = valid & (key == thr[:, None])
        eq_rank = tl.cumsum(eq.to(tl.int32), axis=1)
        sel = gt | (eq & (eq_rank <= (kk - n_gt)[:, None]))
        col2 = cols[None, :] + tl.zeros([BLOCK_B, BLOCK_L], dtype=tl.int32)
        ik = tl.max(tl.where(sel & eq, col2, -1), axis=1)
        unsel = valid & (sel == 0)
        key2 = tl.max(tl.where(unsel, key, 0), axis=1)
        ik1 = tl.min(tl.where(unsel & (key == key2[:, None]), col2, BLOCK_L), axis=1)
        ik1 = tl.where(ik1 == BLOCK_L, -1, ik1)
        return sel, ik, ik1

    @triton.jit
    def _ss_step(a, valid, tau, EPS: tl.constexpr, LOG_EPS: tl.constexpr):
        """== reference.successive_softmax_step_ref: (p, q, a + log(max(q, eps)) / tau, umax),
        umax marks the row maximum where it is unique (its q is computed without cancellation)."""
        mx = tl.max(a, axis=1)
        mx = tl.where(mx == -float("inf"), 0.0, mx)
        e = tl.where(valid, tl.exp(a - mx[:, None]), 0.0)
        den = tl.sum(e, axis=1)
        den = tl.where(den > 0.0, den, 1.0)
        ismax = valid & (a == mx[:, None])
        nmax = tl.sum(ismax.to(tl.int32), axis=1).to(a.dtype)
        s1 = tl.sum(tl.where(ismax, 0.0, e), axis=1)
        p = e / den[:, None]
        q = tl.where(ismax, ((s1 + (nmax - 1.0)) / den)[:, None], 1.0 - p)
        keep = q > EPS
        logq = tl.where(keep, tl.log(tl.where(keep, q, 1.0)), LOG_EPS)
        return p, q, a + logq / tau, ismax & (nmax == 1.0)[:, None]

    @triton.jit
    def _pivot_soft(y, cols, ik, ik1, kk):
        yk = tl.sum(tl.where(cols[None, :] == ik[:, None], y, 0.0), axis=1)
        yk1 = tl.sum(tl.where(cols[None, :] == ik1[:, None], y, 0.0), axis=1)
        t = (yk + yk1) * 0.5
        s = 1.0 / (1.0 + tl.exp(-(y - t[:, None])))
        s = tl.where((ik1 < 0)[:, None], 1.0, s)
        return tl.where((kk == 0)[:, None], 0.0, s)

    @triton.jit
    def _tau(tau_hi, tau_lo, F64: tl.constexpr):
        # float kernel arguments are fp32 on a GPU: fp64 tau travels as an fp32 (hi, lo) pair
        if F64:
            return tl.cast(tau_hi, tl.float64) + tl.cast(tau_lo, tl.float64)
        else:
            return tau_hi

    @triton.jit(do_not_specialize=["B", "tau_hi", "tau_lo", "seed_lo", "seed_hi", "off_lo",
                                   "off_hi", "k_max"])
    def _gumbel_topk_fwd_kernel(
        x_ptr, k_ptr, mask_ptr, soft_ptr, idx_ptr, piv_ptr,
        B, L, stride_x, tau_hi, tau_lo, seed_lo, seed_hi, off_lo, off_hi, k_max,
        RELAX: tl.constexpr, WANT_SOFT: tl.constexpr, WANT_IDX: tl.constexpr,
        F64: tl.constexpr, EPS: tl.constexpr, LOG_EPS: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        tau = _tau(tau_hi, tau_lo, F64)
        pid = tl.program_id(0)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_L)
        rmask = rows < B
        valid = rmask[:, None] & (cols < L)[None, :]
        z = _load_z(x_ptr, rows, cols, valid, stride_x, seed_lo, seed_hi, off_lo, off_hi,
                    F64, BLOCK_B, BLOCK_L)
        kk = tl.load(k_ptr + rows, mask=rmask, other=0)
        sel, ik, ik1 = _topk_select(z, valid, kk, cols, F64, BLOCK_B, BLOCK_L)
        offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
        # (via fp32: the interpreter converts int1 -> bf16 wrongly)
        tl.store(mask_ptr + offs, tl.where(sel, 1.0, 0.0).to(mask_ptr.dtype.element_ty), mask=valid)
        if RELAX == 1:
            tl.store(piv_ptr + rows.to(tl.int64) * 2, ik, mask=rmask)
            tl.store(piv_ptr + rows.to(tl.int64) * 2 + 1, ik1, mask=rmask)
        if WANT_IDX:
            pos = tl.cumsum(sel.to(tl.int32), axis=1) - 1
            ibase = rows.to(tl.int64)[:, None] * k_max
            col2 = cols[None, :] + tl.zeros([BLOCK_B, BLOCK_L], dtype=tl.int32)
            tl.store(idx_ptr + ibase + pos, col2.to(tl.int64), mask=sel)
            pad = valid & (cols[None, :] < (k_max - kk)[:, None])
            tl.store(idx_ptr + ibase + kk[:, None] + cols[None, :],
                     tl.full([BLOCK_B, BLOCK_L], -1, tl.int64), mask=pad)
        if WANT_SOFT:
            y = z / tau
            if RELAX == 1:
                s = _pivot_soft(y, cols, ik, ik1, kk)
            else:
                a = tl.where(valid, y, -float("inf"))
                s = tl.zeros_like(y)
                for j in range(k_max):
                    p, _q, a, _u = _ss_step(a, valid, tau, EPS, LOG_EPS)
                    s += tl.where((kk > j)[:, None], p, 0.0)
                s = tl.where((kk == L)[:, None], 1.0, s)
            tl.store(soft_ptr + offs, s.to(soft_ptr.dtype.element_ty), mask=valid)

    @triton.jit(do_not_specialize=["B", "tau_hi", "tau_lo", "seed_lo", "seed_hi", "off_lo",
                                   "off_hi", "k_max"])
    def _gumbel_topk_bwd_kernel(
        x_ptr, k_ptr, piv_ptr, gm_ptr, dx_ptr,
        B, L, stride_x, tau_hi, tau_lo, seed_lo, seed_hi, off_lo, off_hi, k_max,
        RELAX: tl.constexpr, F64: tl.constexpr, EPS: tl.constexpr, LOG_EPS: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        tau = _tau(tau_hi, tau_lo, F64)
        pid = tl.program_id(0)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_L)
        rmask = rows < B
        valid = rmask[:, None] & (cols < L)[None, :]
        z = _load_z(x_ptr, rows, cols, valid, stride_x, seed_lo, seed_hi, off_lo, off_hi,
                    F64, BLOCK_B, BLOCK_L)
        y = z / tau
        offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
        v = tl.load(gm_ptr + offs, mask=valid, other=0.0).to(y.dtype)
        kk = tl.load(k_ptr + rows, mask=rmask, other=0)
        if RELAX == 1:
            ik = tl.load(piv_ptr + rows.to(tl.int64) * 2, mask=rmask, other=-1)
            ik1 = tl.load(piv_ptr + rows.to(tl.int64) * 2 + 1, mask=rmask, other=-1)
            s = _pivot_soft(y, cols, ik, ik1, kk)
            w = tl.where(valid, v * (s * (1.0 - s)), 0.0)
            half_g = tl.sum(w, axis=1) * 0.5
            dy = w - tl.where(cols[None, :] == ik[:, None], half_g[:, None], 0.0)
            dy = dy - tl.where(cols[None, :] == ik1[:, None], half_g[:, None], 0.0)
            dy = tl.where(((ik >= 0) & (ik1 >= 0))[:, None], dy, 0.0)
        else:
            a0 = tl.where(valid, y, -float("inf"))
            dy = tl.zeros_like(y)  # adjoint of a^j, j = k_max .. 0
            for jj in range(k_max):
                j = k_max - 1 - jj
                a = a0
                for _t in range(j):  # recompute a^j (nothing stored between steps)
                    _p, _q, a, _u = _ss_step(a, valid, tau, EPS, LOG_EPS)
                p, q, _a, umax = _ss_step(a, valid, tau, EPS, LOG_EPS)
                # dy += J_softmax^T (v + J_logq^T (dy / tau)), with the 1/q of the unique
                # row max cancelled analytically: see ss_vjp in csrc/gumbel_topk.cpp
                keep = q > EPS
                w = tl.where(keep, dy / tau, 0.0)
                w_q = w / tl.where(keep, q, 1.0)
                ratio = w_q * p
                d_u = tl.sum(tl.where(umax, 0.0, ratio), axis=1)
                r_m = tl.sum(tl.where(umax, ratio, 0.0), axis=1)
                contrib = tl.where(umax, p * (d_u[:, None] - w), p * ((d_u + r_m)[:, None] - w_q))
                dotv = tl.sum(p * v, axis=1)
                upd = contrib + p * (v - dotv[:, None])
                dy = tl.where(((kk > j) & (kk < L))[:, None], dy + upd, dy)
        dx = dy / tau
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=valid)

    @triton.jit(do_not_specialize=["B", "seed_lo", "seed_hi", "off_lo", "off_hi"])
    def _gumbel_noise_kernel(out_ptr, B, L, seed_lo, seed_hi, off_lo, off_hi,
                             BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        g = _gumbel_tile(rows, cols, seed_lo, seed_hi, off_lo, off_hi, BLOCK_B, BLOCK_L)
        valid = (rows < B)[:, None] & (cols < L)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * L + cols[None, :], g, mask=valid)

    @triton.jit
    def _gumbel_bits_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < N, other=0).to(tl.uint32)
        tl.store(out_ptr + i, _gumbel_from_bits(x), mask=i < N)


def _split64(v: int) -> tuple[int, int]:
    return v & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF


def _split_tau(tau: float) -> tuple[float, float]:
    """tau as fp32 (hi, lo): hi = fp32(tau) (what fp32 compute divides by, like the reference),
    hi + lo = tau to ~2^-48 relative (fp64 compute)."""
    hi = float(torch.tensor(tau, dtype=torch.float32))
    return hi, float(torch.tensor(tau - hi, dtype=torch.float32))


def _tiles(b: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_L, num_warps): whole rows per tile, many rows per program."""
    block_l = max(4, triton.next_power_of_2(n))
    if device.type == "cpu":  # interpreter: cost ~ number of programs x ops, so few programs
        elems = 1 << 16
    else:
        elems = 2048
    block_b = max(1, min(triton.next_power_of_2(max(b, 1)), elems // block_l))
    num_warps = min(16, max(4, block_b * block_l // 512))
    return block_b, block_l, num_warps


def _fwd_launch_kwargs(device: torch.device, num_warps: int) -> dict:
    # No FMA contraction: the noise must round exactly like the reference and the C++ code.
    return {} if device.type == "cpu" else {"num_warps": num_warps, "enable_fp_fusion": False}


def gumbel_topk_forward(logits: torch.Tensor, k_rows: torch.Tensor, k_max: int, tau: float,
                        seed: int, offset: int, relaxation: str = "softmax",
                        want_soft: bool = False, want_indices: bool = False):
    """Triton forward, one launch. logits [B, L] (row stride free, unit column stride),
    k_rows [B] int32. Returns (mask [B, L], soft [B, L] | None, indices [B, k_max] | None,
    pivots [B, 2] int32 | None (sigmoid only)). Outputs in logits dtype."""
    b, n = logits.shape
    dev = logits.device
    relax = _RELAX_ID[relaxation]
    mask = torch.empty((b, n), dtype=logits.dtype, device=dev)
    soft = torch.empty_like(mask) if want_soft else None
    idx = torch.empty((b, k_max), dtype=torch.int64, device=dev) if want_indices else None
    piv = torch.empty((b, 2), dtype=torch.int32, device=dev) if relax == 1 else None
    if b == 0:
        return mask, soft, idx, piv
    bb, bl, nw = _tiles(b, n, dev)
    s_lo, s_hi = _split64(seed)
    o_lo, o_hi = _split64(offset)
    _gumbel_topk_fwd_kernel[(triton.cdiv(b, bb),)](
        logits, k_rows, mask, soft if want_soft else mask, idx if want_indices else k_rows,
        piv if piv is not None else k_rows,
        b, n, logits.stride(0), *_split_tau(tau), s_lo, s_hi, o_lo, o_hi, k_max,
        RELAX=relax, WANT_SOFT=want_soft, WANT_IDX=want_indices,
        F64=logits.dtype == torch.float64, EPS=SOFTMAX_EPS, LOG_EPS=_LOG_EPS,
        BLOCK_B=bb, BLOCK_L=bl, **_fwd_launch_kwargs(dev, nw))
    return mask, soft, idx, piv


def gumbel_topk_backward(logits: torch.Tensor, k_rows: torch.Tensor, k_max: int,
                         pivots: torch.Tensor | None, grad: torch.Tensor, tau: float,
                         seed: int, offset: int, relaxation: str = "softmax") -> torch.Tensor:
    """Triton backward, one launch: d logits = J_s(y)^T grad / tau (noise regenerated).
    grad [B, L] contiguous (any float dtype). Returns d logits in the logits dtype."""
    b, n = logits.shape
    dx = torch.empty((b, n), dtype=logits.dtype, device=logits.device)
    if b == 0:
        return dx
    bb, bl, nw = _tiles(b, n, logits.device)
    s_lo, s_hi = _split64(seed)
    o_lo, o_hi = _split64(offset)
    relax = _RELAX_ID[relaxation]
    _gumbel_topk_bwd_kernel[(triton.cdiv(b, bb),)](
        logits, k_rows, pivots if pivots is not None else k_rows, grad, dx,
        b, n, logits.stride(0), *_split_tau(tau), s_lo, s_hi, o_lo, o_hi, k_max,
        RELAX=relax, F64=logits.dtype == torch.float64, EPS=SOFTMAX_EPS, LOG_EPS=_LOG_EPS,
        BLOCK_B=bb, BLOCK_L=bl, **_fwd_launch_kwargs(logits.device, nw))
    return dx


def _triton_noise(b: int, n: int, seed: int, offset: int, device: torch.device) -> torch.Tensor:
    out = torch.empty((b, n), dtype=torch.float32, device=device)
    if b * n == 0:
        return out
    bl = min(max(4, triton.next_power_of_2(n)), 1024)
    bb = max(1, min(triton.next_power_of_2(b), (1 << 16 if device.type == "cpu" else 2048) // bl))
    s_lo, s_hi = _split64(seed)
    o_lo, o_hi = _split64(offset)
    _gumbel_noise_kernel[(triton.cdiv(b, bb), triton.cdiv(n, bl))](
        out, b, n, s_lo, s_hi, o_lo, o_hi, BLOCK_B=bb, BLOCK_L=bl,
        **_fwd_launch_kwargs(device, 4))
    return out


def gumbel_from_bits(x: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """fp32 Gumbel noise from uint32 draws held in an int64 tensor (tests of the contract)."""
    if backend == "reference":
        from e3kernels.reference import gumbel_from_bits_ref
        return gumbel_from_bits_ref(x)
    if backend == "cpp":
        return _cpp_ops().gumbel_from_bits(x.to(torch.int64).contiguous())
    x = x.to(torch.int64).contiguous().reshape(-1)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    block = 1 << 16 if x.device.type == "cpu" else 1024
    _gumbel_bits_kernel[(triton.cdiv(x.numel(), block),)](
        x, out, x.numel(), BLOCK=block, **_fwd_launch_kwargs(x.device, 4))
    return out


def gumbel_noise(batch: int, length: int, seed: int = 0, offset: int = 0,
                 device: torch.device | str = "cpu", backend: str = "auto") -> torch.Tensor:
    """The fp32 noise g [batch, length] that `gumbel_topk` adds (identical on every backend)."""
    device = torch.device(device)
    _check_u64("seed", seed)
    _check_u64("offset", offset)
    be = resolve_backend(device, backend)
    if be == "cpp":
        return _cpp_ops().gumbel_noise(batch, length, seed, offset)
    if be == "triton":
        return _triton_noise(batch, length, seed, offset, device)
    return gumbel_noise_ref(batch, length, seed, offset, device)


# ======================================================================================
# C++ (e3kernels._C) launchers
# ======================================================================================

def _cpp_ops():
    ext = cpp_extension()
    if ext is None or not hasattr(ext, "gumbel_topk_forward"):
        raise RuntimeError("e3kernels._C has no gumbel_topk ops: rebuild the extension "
                           "(`tools/build_cpp.sh` or `pip install --no-build-isolation -e .`)")
    return ext


def _cpp_forward(logits, k_rows, k_max, tau, seed, offset, relaxation, want_soft, want_indices):
    mask, soft, idx, piv = _cpp_ops().gumbel_topk_forward(
        logits.contiguous(), k_rows, float(tau), seed, offset, _RELAX_ID[relaxation],
        want_soft, want_indices, k_max)
    return (mask, soft if want_soft else None, idx if want_indices else None,
            piv if relaxation == "sigmoid" else None)


def _cpp_backward(logits, k_rows, k_max, pivots, grad, tau, seed, offset, relaxation):
    if pivots is None:
        pivots = torch.empty((0, 2), dtype=torch.int32)
    return _cpp_ops().gumbel_topk_backward(
        logits.contiguous(), k_rows, pivots, grad.contiguous(), float(tau), seed, offset,
        _RELAX_ID[relaxation], k_max)


# ======================================================================================
# autograd + public API
# ======================================================================================

class _GumbelTopKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k_rows, k_max, tau, seed, offset, relaxation, want_soft,
                want_indices, backend):
        fwd = gumbel_topk_forward if backend == "triton" else _cpp_forward
        mask, soft, idx, piv = fwd(logits, k_rows, k_max, tau, seed, offset, relaxation,
                                   want_soft, want_indices)
        ctx.save_for_backward(logits, k_rows, piv)
        ctx.args = (k_max, tau, seed, offset, relaxation, backend)
        ctx.set_materialize_grads(False)
        if idx is not None:
            ctx.mark_non_differentiable(idx)
        return mask, soft, idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mask, g_soft, _g_idx):
        logits, k_rows, piv = ctx.saved_tensors
        k_max, tau, seed, offset, relaxation, backend = ctx.args
        grad = g_mask if g_soft is None else (g_soft if g_mask is None else g_mask + g_soft)
        if grad is None or not ctx.needs_input_grad[0]:
            return (None,) * 10
        bwd = gumbel_topk_backward if backend == "triton" else _cpp_backward
        dx = bwd(logits, k_rows, k_max, piv, grad.contiguous(), tau, seed, offset, relaxation)
        return (dx,) + (None,) * 9


def _check_u64(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= int(v) < 2 ** 64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {v!r}")


def _validate(logits, k, tau, seed, offset, relaxation, check_finite=True):
    """Checks the arguments; returns (logits [B, L], k_rows [B] int32, k_max).
    check_finite=False leaves the finiteness check to the C++ kernel (one pass fewer)."""
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
    if check_finite and not bool(torch.isfinite(x).all()):
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
    if be == "cpp":
        _cpp_ops()
    # the C++ forward checks finiteness in its own pass and raises the same ValueError
    x, k_rows, k_max = _validate(logits, k, tau, seed, offset, relaxation,
                                 check_finite=be != "cpp")
    if be == "triton" and x.shape[1] > MAX_TRITON_L:
        raise ValueError(f"logits L must be <= {MAX_TRITON_L} on the triton backend, got "
                         f"{x.shape[1]}")
    if be == "reference":
        ref = gumbel_topk_ref(x, k_rows.to(torch.int64), tau, int(seed), int(offset), relaxation)
        mask, soft, idx = ref.mask, ref.soft, ref.indices
    else:
        if x.stride(-1) != 1:
            x = x.contiguous()
        mask, soft, idx = _GumbelTopKFunction.apply(
            x, k_rows, k_max, float(tau), int(seed), int(offset), relaxation, return_soft,
            return_indices, be)
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
        offset = int(self.step)
        self.step += 1
        return gumbel_topk(logits, k, tau=self.tau, seed=self.seed, offset=offset,
                           relaxation=self.relaxation, return_soft=return_soft,
                           return_indices=return_indices, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"k={self.k}, tau={self.tau:g}, tau0={self.tau0:g}, tau_min={self.tau_min:g}, "
                f"relaxation={self.relaxation!r}, seed={self.seed}")
