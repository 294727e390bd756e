"""Gumbel-TopK: the Triton kernels and their launchers (imported only where triton is).
The maths is in `e3kernels.ops.gumbel_topk` (package docstring); `op.py` registers the
launchers as the custom ops e3kernels::gumbel_topk_*_triton."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from e3kernels.ops.gumbel_topk.op import RELAX_ID, split64, split_tau
from e3kernels.reference import SOFTMAX_EPS

_LOG_EPS = math.log(SOFTMAX_EPS)

# ======================================================================================
# Kernels
# ======================================================================================


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


# ======================================================================================
# Launchers
# ======================================================================================

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


def gumbel_topk_forward_triton(logits: torch.Tensor, k_rows: torch.Tensor, k_max: int,
                               tau: float, seed: int, offset: int, relaxation: str = "softmax",
                               want_soft: bool = False, want_indices: bool = False):
    """Triton forward, one launch. logits [B, L] (row stride free, unit column stride),
    k_rows [B] int32. Returns (mask [B, L], soft [B, L] | None, indices [B, k_max] | None,
    pivots [B, 2] int32 | None (sigmoid only)). Outputs in logits dtype."""
    b, n = logits.shape
    dev = logits.device
    relax = RELAX_ID[relaxation]
    mask = torch.empty((b, n), dtype=logits.dtype, device=dev)
    soft = torch.empty_like(mask) if want_soft else None
    idx = torch.empty((b, k_max), dtype=torch.int64, device=dev) if want_indices else None
    piv = torch.empty((b, 2), dtype=torch.int32, device=dev) if relax == 1 else None
    if b == 0:
        return mask, soft, idx, piv
    bb, bl, nw = _tiles(b, n, dev)
    s_lo, s_hi = split64(seed)
    o_lo, o_hi = split64(offset)
    _gumbel_topk_fwd_kernel[(triton.cdiv(b, bb),)](
        logits, k_rows, mask, soft if want_soft else mask, idx if want_indices else k_rows,
        piv if piv is not None else k_rows,
        b, n, logits.stride(0), *split_tau(tau), s_lo, s_hi, o_lo, o_hi, k_max,
        RELAX=relax, WANT_SOFT=want_soft, WANT_IDX=want_indices,
        F64=logits.dtype == torch.float64, EPS=SOFTMAX_EPS, LOG_EPS=_LOG_EPS,
        BLOCK_B=bb, BLOCK_L=bl, **_fwd_launch_kwargs(dev, nw))
    return mask, soft, idx, piv


def gumbel_topk_backward_triton(logits: torch.Tensor, k_rows: torch.Tensor, k_max: int,
                                pivots: torch.Tensor | None, grad: torch.Tensor, tau: float,
                                seed: int, offset: int,
                                relaxation: str = "softmax") -> torch.Tensor:
    """Triton backward, one launch: d logits = J_s(y)^T grad / tau (noise regenerated).
    grad [B, L] contiguous (any float dtype). Returns d logits in the logits dtype."""
    b, n = logits.shape
    dx = torch.empty((b, n), dtype=logits.dtype, device=logits.device)
    if b == 0:
        return dx
    bb, bl, nw = _tiles(b, n, logits.device)
    s_lo, s_hi = split64(seed)
    o_lo, o_hi = split64(offset)
    relax = RELAX_ID[relaxation]
    _gumbel_topk_bwd_kernel[(triton.cdiv(b, bb),)](
        logits, k_rows, pivots if pivots is not None else k_rows, grad, dx,
        b, n, logits.stride(0), *split_tau(tau), s_lo, s_hi, o_lo, o_hi, k_max,
        RELAX=relax, F64=logits.dtype == torch.float64, EPS=SOFTMAX_EPS, LOG_EPS=_LOG_EPS,
        BLOCK_B=bb, BLOCK_L=bl, **_fwd_launch_kwargs(logits.device, nw))
    return dx


def gumbel_noise_triton(b: int, n: int, seed: int, offset: int,
                        device: torch.device) -> torch.Tensor:
    out = torch.empty((b, n), dtype=torch.float32, device=device)
    if b * n == 0:
        return out
    bl = min(max(4, triton.next_power_of_2(n)), 1024)
    bb = max(1, min(triton.next_power_of_2(b), (1 << 16 if device.type == "cpu" else 2048) // bl))
    s_lo, s_hi = split64(seed)
    o_lo, o_hi = split64(offset)
    _gumbel_noise_kernel[(triton.cdiv(b, bb), triton.cdiv(n, bl))](
        out, b, n, s_lo, s_hi, o_lo, o_hi, BLOCK_B=bb, BLOCK_L=bl,
        **_fwd_launch_kwargs(device, 4))
    return out


def gumbel_from_bits_triton(x: torch.Tensor) -> torch.Tensor:
    """fp32 Gumbel noise from uint32 draws held in an int64 tensor (any shape)."""
    shape = x.shape
    x = x.to(torch.int64).contiguous().reshape(-1)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out.reshape(shape)
    block = 1 << 16 if x.device.type == "cpu" else 1024
    _gumbel_bits_kernel[(triton.cdiv(x.numel(), block),)](
        x, out, x.numel(), BLOCK=block, **_fwd_launch_kwargs(x.device, 4))
    return out.reshape(shape)
