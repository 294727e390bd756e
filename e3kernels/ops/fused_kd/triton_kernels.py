"""Fused linear KD loss: the Triton kernels and their launchers (imported only where triton is).

Per token i, with z_s = hs ws[:V]^T / T and z_t = ht wt[:V]^T / T never stored
beyond one [BLOCK_N, BLOCK_V] register tile:

    forward KL_i = sum_v p_t (log p_t - log p_s)      reverse KL_i = sum_v p_s (log p_s - log p_t)
    H_i = -sum_v p_t log p_t                          (teacher entropy; 0 log 0 := 0)
    ce_i = logsumexp(T z_s) - T z_s[label_i]         (optional hard-label CE, unscaled logits)

Forward kernel, grid (cdiv(N, BLOCK_N), S): program (n, s) owns a token block and the s-th
contiguous vocab range; it loops over vocab tiles, builds both logit tiles with `tl.dot` over the
hidden dims, and keeps online statistics per row, all relative to the running maxima
(m_s, m_t) so that every summand is small and `-inf` logits give exact zeros:

    l_s = sum e^{z_s - m_s}            l_t = sum e^{z_t - m_t}
    Y   = sum e^{z_t - m_t} (z_t - m_t)                               (<= 0, teacher entropy)
    X   = sum e^{z_t - m_t} ((z_t - m_t) - (z_s - m_s))   forward KL, or the mirror image
          sum e^{z_s - m_s} ((z_s - m_s) - (z_t - m_t))   for reverse KL
    l_1 = sum e^{T (z_s - m_s)}                     (CE: sum-exp of the unscaled logits T z_s)

so that lse = m + log l, H = log l_t - Y / l_t, KL_fwd = X / l_t - log l_t + log l_s
(KL_rev = X / l_s - log l_s + log l_t), lse_1 = T m_s + log l_1. The S partial statistics
([S, 7, N] fp32, O(N)) are merged by a few torch ops (`_merge_stats`). S > 1 only on GPUs, to
fill the SMs when N is small. The label logit of the CE, hs[i] . Ws[label_i], is an O(N D)
row-wise dot in torch, and so is the one-hot part of the CE gradient.

Backward kernel, same grid: recompute both tiles, form
    dZ = g/T (p_s - p_t)                         (forward KL)
    dZ = g/T p_s (log p_s - log p_t - KL)        (reverse KL)
    dZ += g_ce (softmax(T z_s) - onehot(label))  (hard-label CE)
then loop over the student hidden dim: d hs += dZ Ws (plain read-modify-write of the rows the
program owns when S == 1, atomics when S > 1) and d Ws += dZ^T hs (fp32 `tl.atomic_add`). One
recompute of the logit tiles only, which is what the compute goal 2NV(Ds+Dt) + 4NVDs asks for;
a second kernel gridded over vocab blocks would avoid the d Ws atomics but recompute both
logit tiles again (+2NV(Ds+Dt) FLOPs, +50% of the backward at Ds = Dt), and its [BLOCK_V, Ds]
accumulator does not fit in registers either, so it would read-modify-write d Ws as much.

Logit transform (logit_transform.py), per side, constexpr XF_S / XF_T: 0 none, 1 y = s u,
2 y = c tanh(s u / c), applied to each raw tile u right after its dots; the statistics above are
those of y (the u of the formulas is y), and the backward multiplies dZ by dy/du (s, or
s (1 - tanh^2)) before the d hs / d Ws dots. XF = 0 compiles exactly the untransformed kernel.

Launchers `fused_kd_forward_triton` / `fused_kd_backward_triton` follow exactly the contract of
the C++ dispatcher ops `torch.ops.e3kernels.fused_kd_forward` / `fused_kd_backward`; `op.py`
registers them as the custom ops `e3kernels::fused_kd_forward_triton` / `_backward_triton`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from e3kernels.dispatch import triton_interpreter_active
from e3kernels.ops.fused_kd.logit_transform import IDENTITY, LogitTransform
from e3kernels.ops.fused_kd.op import NSTAT, LaunchOptions

_NEG_INF = float("-inf")

# ======================================================================================
# Kernels
# ======================================================================================


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc += a @ b in fp32; UPCAST multiplies fp32 copies (interpreter bf16, fp32 inputs)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    else:
        acc = tl.dot(a, b, acc)
    return acc

@triton.jit
def _logit_tile(h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd,
                offs_n, offs_v, n_mask, v_mask, D,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PREC: tl.constexpr):
    """[BLOCK_N, BLOCK_V] fp32 tile of h @ w^T (unscaled), reduced over the hidden dim."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn + offs_d[None, :] * stride_hd
    w_ptrs = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv + offs_d[:, None] * stride_wd
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = (offs_d + d0) < D
        h = tl.load(h_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=d_mask[:, None] & v_mask[None, :], other=0.0)  # [BD, BV]
        w = w.to(h_ptr.dtype.element_ty)  # the head in the hidden states' dtype, per tile
        acc = _mm(h, w, acc, UPCAST, PREC)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    return acc

@triton.jit
def _softcap(u, scale, cap):
    """(y, dy/du) for y = cap tanh(scale u / cap): tanh x = sign(x) (1 - e) / (1 + e) with
    e = exp(-2 |x|) (no overflow), 1 - tanh^2 = 4 e / (1 + e)^2 (no cancellation)."""
    x = u * (scale / cap)
    e = tl.exp(-2.0 * tl.abs(x))
    inv = 1.0 / (1.0 + e)
    t = (1.0 - e) * inv
    return cap * tl.where(x < 0, -t, t), scale * (4.0 * e * inv * inv)

@triton.jit
def _transform(u, scale, cap, XF: tl.constexpr):
    """y of the logit transform XF (0: u, 1: scale u, 2: cap tanh(scale u / cap))."""
    if XF == 1:
        u = u * scale
    elif XF == 2:
        u, _ = _softcap(u, scale, cap)
    return u

@triton.jit
def _fused_kd_fwd_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr, stats_ptr,
    N, Ds, Dt, V, v_chunk, inv_t, t_scale, scale_s, cap_s, scale_t, cap_t,
    stride_hsn, stride_hsd, stride_wsv, stride_wsd,
    stride_htn, stride_htd, stride_wtv, stride_wtd,
    stride_ss, stride_sk,
    REVERSE: tl.constexpr, COMPUTE_CE: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    XF_S: tl.constexpr = 0, XF_T: tl.constexpr = 0,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    v_start = pid_s * v_chunk
    v_stop = tl.minimum(v_start + v_chunk, V)

    ms = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    mt = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    ls = tl.zeros((BLOCK_N,), tl.float32)
    lt = tl.zeros((BLOCK_N,), tl.float32)
    x = tl.zeros((BLOCK_N,), tl.float32)
    y = tl.zeros((BLOCK_N,), tl.float32)
    l1 = tl.zeros((BLOCK_N,), tl.float32)

    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_stop
        us = _logit_tile(hs_ptr, stride_hsn, stride_hsd, ws_ptr, stride_wsv, stride_wsd,
                         offs_n, offs_v, n_mask, v_mask, Ds,
                         BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_S, PREC_S)
        ut = _logit_tile(ht_ptr, stride_htn, stride_htd, wt_ptr, stride_wtv, stride_wtd,
                         offs_n, offs_v, n_mask, v_mask, Dt,
                         BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_T, PREC_T)
        us = _transform(us, scale_s, cap_s, XF_S)
        ut = _transform(ut, scale_t, cap_t, XF_T)
        vm = v_mask[None, :]
        zs = tl.where(vm, us * inv_t, float("-inf"))
        zt = tl.where(vm, ut * inv_t, float("-inf"))

        # running maxima; "safe" maxima are 0 while a row has only -inf so far
        ms_new = tl.maximum(ms, tl.max(zs, axis=1))
        mt_new = tl.maximum(mt, tl.max(zt, axis=1))
        ms_safe = tl.where(ms_new == float("-inf"), 0.0, ms_new)
        mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        # rescale the old sums; a sum that is still 0 stays 0 (its max may be -inf)
        dms = tl.where(ls > 0, ms - ms_safe, 0.0)
        dmt = tl.where(lt > 0, mt - mt_safe, 0.0)
        a_s = tl.exp(dms)
        a_t = tl.exp(dmt)
        cs = zs - ms_safe[:, None]  # <= 0 or -inf
        ct = zt - mt_safe[:, None]
        es = tl.exp(cs)
        et = tl.exp(ct)
        if REVERSE:
            x = a_s * (x + ls * (dms - dmt)) + tl.sum(tl.where(es > 0, es * (cs - ct), 0.0), axis=1)
        else:
            x = a_t * (x + lt * (dmt - dms)) + tl.sum(tl.where(et > 0, et * (ct - cs), 0.0), axis=1)
        y = a_t * (y + lt * dmt) + tl.sum(tl.where(et > 0, et * ct, 0.0), axis=1)
        ls = ls * a_s + tl.sum(es, axis=1)
        lt = lt * a_t + tl.sum(et, axis=1)
        if COMPUTE_CE:
            # unscaled logits u = T z_s share the running max T m_s (T > 0)
            l1 = l1 * tl.exp(dms * t_scale) + tl.sum(tl.exp(cs * t_scale), axis=1)
        ms = ms_safe
        mt = mt_safe

    base = stats_ptr + pid_s * stride_ss + offs_n
    tl.store(base + 0 * stride_sk, ms, mask=n_mask)
    tl.store(base + 1 * stride_sk, ls, mask=n_mask)
    tl.store(base + 2 * stride_sk, mt, mask=n_mask)
    tl.store(base + 3 * stride_sk, lt, mask=n_mask)
    tl.store(base + 4 * stride_sk, x, mask=n_mask)
    tl.store(base + 5 * stride_sk, y, mask=n_mask)
    if COMPUTE_CE:
        tl.store(base + 6 * stride_sk, l1, mask=n_mask)

@triton.jit
def _fused_kd_bwd_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr, labels_ptr,
    gkl_ptr, gce_ptr, lse_s_ptr, lse_t_ptr, kl_ptr, lse1_ptr,
    dhs_ptr, dws_ptr,
    N, Ds, Dt, V, v_chunk, inv_t, ignore_index, scale_s, cap_s, scale_t, cap_t,
    stride_hsn, stride_hsd, stride_wsv, stride_wsd,
    stride_htn, stride_htd, stride_wtv, stride_wtd,
    stride_dhn, stride_dwv,
    HAS_LABELS: tl.constexpr, REVERSE: tl.constexpr, HAS_CE: tl.constexpr,
    NEED_DWS: tl.constexpr, DHS_ATOMIC: tl.constexpr, DZ_LOWP: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, PREC_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    XF_S: tl.constexpr = 0, XF_T: tl.constexpr = 0,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    v_start = pid_s * v_chunk
    v_stop = tl.minimum(v_start + v_chunk, V)
    offs_d = tl.arange(0, BLOCK_D)

    valid = n_mask
    if HAS_LABELS:
        lab = tl.load(labels_ptr + offs_n, mask=n_mask, other=ignore_index)
        valid = valid & (lab != ignore_index)
    g = tl.load(gkl_ptr + offs_n, mask=valid, other=0.0) * inv_t
    g = tl.where(valid, g, 0.0)
    lse_s = tl.load(lse_s_ptr + offs_n, mask=valid, other=0.0)
    lse_t = tl.load(lse_t_ptr + offs_n, mask=valid, other=0.0)
    if REVERSE:
        klv = tl.load(kl_ptr + offs_n, mask=valid, other=0.0)
    if HAS_CE:
        gce = tl.load(gce_ptr + offs_n, mask=valid, other=0.0)
        gce = tl.where(valid, gce, 0.0)
        lse1 = tl.load(lse1_ptr + offs_n, mask=valid, other=0.0)

    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_stop
        us = _logit_tile(hs_ptr, stride_hsn, stride_hsd, ws_ptr, stride_wsv, stride_wsd,
                         offs_n, offs_v, n_mask, v_mask, Ds,
                         BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_S, PREC_S)
        ut = _logit_tile(ht_ptr, stride_htn, stride_htd, wt_ptr, stride_wtv, stride_wtd,
                         offs_n, offs_v, n_mask, v_mask, Dt,
                         BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_T, PREC_T)
        if XF_S == 2:
            us, dyu = _softcap(us, scale_s, cap_s)
        else:
            us = _transform(us, scale_s, cap_s, XF_S)
        ut = _transform(ut, scale_t, cap_t, XF_T)
        keep = valid[:, None] & v_mask[None, :]
        log_ps = tl.where(keep, us * inv_t - lse_s[:, None], float("-inf"))
        log_pt = tl.where(keep, ut * inv_t - lse_t[:, None], float("-inf"))
        ps = tl.exp(log_ps)
        pt = tl.exp(log_pt)
        if REVERSE:
            dz = tl.where(ps > 0, ps * (log_ps - log_pt - klv[:, None]), 0.0) * g[:, None]
        else:
            dz = (ps - pt) * g[:, None]
        if HAS_CE:  # softmax part only; the launcher subtracts the one-hot part
            dz += gce[:, None] * tl.exp(tl.where(keep, us - lse1[:, None], float("-inf")))
        dz = tl.where(keep, dz, 0.0)
        if XF_S == 1:
            dz = dz * scale_s
        elif XF_S == 2:
            dz = dz * dyu
        if DZ_LOWP:
            dzc = dz.to(hs_ptr.dtype.element_ty)
        else:
            dzc = dz

        hs_ptrs = hs_ptr + offs_n.to(tl.int64)[:, None] * stride_hsn + offs_d[None, :] * stride_hsd
        ws_ptrs = ws_ptr + offs_v.to(tl.int64)[:, None] * stride_wsv + offs_d[None, :] * stride_wsd
        dh_ptrs = dhs_ptr + offs_n.to(tl.int64)[:, None] * stride_dhn + offs_d[None, :]
        dw_ptrs = dws_ptr + offs_v.to(tl.int64)[:, None] * stride_dwv + offs_d[None, :]
        for d0 in range(0, Ds, BLOCK_D):
            d_mask = (offs_d + d0) < Ds
            nd_mask = n_mask[:, None] & d_mask[None, :]
            vd_mask = v_mask[:, None] & d_mask[None, :]
            w = tl.load(ws_ptrs, mask=vd_mask, other=0.0).to(hs_ptr.dtype.element_ty)  # [BV, BD]
            if DZ_LOWP:
                dh = tl.dot(dzc, w)
            else:
                dh = tl.dot(dzc, w.to(tl.float32), input_precision=PREC_B)
            if DHS_ATOMIC:
                tl.atomic_add(dh_ptrs, dh, mask=nd_mask)
            else:
                tl.store(dh_ptrs, tl.load(dh_ptrs, mask=nd_mask, other=0.0) + dh, mask=nd_mask)
            if NEED_DWS:
                h = tl.load(hs_ptrs, mask=nd_mask, other=0.0)  # [BN, BD]
                if DZ_LOWP:
                    dw = tl.dot(tl.trans(dzc), h)
                else:
                    dw = tl.dot(tl.trans(dzc), h.to(tl.float32), input_precision=PREC_B)
                tl.atomic_add(dw_ptrs, dw, mask=vd_mask)
            hs_ptrs += BLOCK_D * stride_hsd
            ws_ptrs += BLOCK_D * stride_wsd
            dh_ptrs += BLOCK_D
            dw_ptrs += BLOCK_D

def _configs(shapes):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd},
                          num_warps=w, num_stages=s) for bn, bv, bd, w, s in shapes]

# (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages) per target (compute capability major >= 9: 90,
# else 80); BLOCK_V must divide _V_ALIGN. From offline compiles with Triton's ptxas
# (bench/triton_cubin_report.py, tests/kernels/test_triton_cubin.py): bf16 without reverse KL
# or CE has no register spill and fits shared memory on its target.
_FWD_SHAPES = {
    90: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 3),
         (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)],
    80: [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 128, 64, 8, 4),
         (128, 64, 64, 8, 2), (64, 64, 64, 8, 4), (128, 64, 32, 8, 4)],
}
_BWD_SHAPES = {
    90: [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3),
         (64, 64, 64, 4, 3), (64, 64, 64, 4, 4), (128, 128, 32, 8, 4)],
    80: [(64, 128, 32, 8, 3), (64, 128, 32, 8, 4), (64, 64, 32, 8, 4), (128, 64, 32, 8, 2)],
}
_KEY = ["Ds", "Dt", "V"]


def _target(device: torch.device) -> int:
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _union(table: dict) -> list:
    return list(dict.fromkeys(s for shapes in table.values() for s in shapes))


def _shape_of(c) -> tuple:
    k = c.kwargs
    return (k["BLOCK_N"], k["BLOCK_V"], k["BLOCK_D"], c.num_warps, c.num_stages)


def _prune_for(table: dict):
    """early_config_prune: the autotuner times only the configs of this device's target."""
    def prune(configs, named_args, **kwargs):
        dev = named_args["hs_ptr"].device
        if dev.type != "cuda":  # (the interpreter, in the launch-path test)
            return configs
        mine = set(table[_target(dev)])
        return [c for c in configs if _shape_of(c) in mine]
    return prune


_fwd_tuned = triton.autotune(_configs(_union(_FWD_SHAPES)), key=_KEY,
                             prune_configs_by={"early_config_prune": _prune_for(_FWD_SHAPES)}
                             )(_fused_kd_fwd_kernel)
_bwd_tuned = triton.autotune(_configs(_union(_BWD_SHAPES)), key=_KEY,
                             prune_configs_by={"early_config_prune": _prune_for(_BWD_SHAPES)},
                             reset_to_zero=["dhs_ptr", "dws_ptr"])(_fused_kd_bwd_kernel)


_V_ALIGN = 256  # vocab ranges of the S splits are multiples of this (and of every BLOCK_V)


# ======================================================================================
# Launch configuration
# ======================================================================================

def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _precision_flags(dtype: torch.dtype, interpret: bool) -> tuple[bool, str]:
    """(UPCAST, PREC) of the forward dots on one side. fp32: exact ("ieee", like torch's default
    fp32 matmul); bf16 under the interpreter: fp32 copies (its bf16 tl.dot is wrong); else
    native low-precision dots with fp32 accumulation (exact products)."""
    if dtype == torch.float32:
        return True, "ieee"
    if dtype == torch.bfloat16 and interpret:
        return True, "ieee"
    return False, "ieee"


def _backward_flags(dtype: torch.dtype, interpret: bool) -> tuple[bool, bool, str]:
    """(DZ_LOWP, UPCAST, PREC_B) of the backward dots dZ @ Ws and dZ^T @ hs.

    bf16 on GPU: dZ rounded to bf16, native dots (bf16 has the fp32 exponent range).
    fp16: dZ is often below fp16's normal range (g carries 1/n_tokens), so the student tiles are
    upcast and the dots run in tf32 (10-bit mantissa like fp16, fp32 range). fp32: exact."""
    if dtype == torch.bfloat16 and not interpret:
        return True, False, "ieee"
    if dtype == torch.float16:
        return False, True, "tf32"
    return False, True, "ieee"


def _num_splits(n: int, v: int, device: torch.device, opts: LaunchOptions, block_n: int) -> int:
    max_splits = max(1, math.ceil(v / _V_ALIGN))
    if opts.num_splits is not None:
        return max(1, min(int(opts.num_splits), max_splits))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n_blocks = math.ceil(n / block_n)
    return max(1, min(math.ceil(2 * sms / n_blocks), max_splits))


def _vocab_chunk(v: int, splits: int, block_v: int) -> int:
    align = max(_V_ALIGN, block_v)
    return math.ceil(math.ceil(v / splits) / align) * align


def _interp_blocks(n: int, v: int, d: int, opts: LaunchOptions) -> tuple[int, int, int]:
    bn = opts.block_n or min(max(_pow2(n), 16), 512)
    bv = opts.block_v or min(max(_pow2(v), 16), 1024)
    bd = opts.block_d or min(max(_pow2(d), 16), 128)
    return bn, bv, bd


def _use_tuned(device: torch.device, opts: LaunchOptions) -> bool:
    return device.type == "cuda" and opts.block_n is None and opts.block_v is None \
        and opts.block_d is None


def _quiet(interpret: bool):
    """The interpreter evaluates both branches of tl.where with numpy: -inf - -inf in masked
    lanes would print RuntimeWarnings for values that are discarded."""
    if not interpret:
        return contextlib.nullcontext()
    import numpy as np

    return np.errstate(invalid="ignore", over="ignore")


def _heads_for_interpreter(hs, ws, ht, wt, interpret: bool):
    """The kernels cast a head to its hidden states' dtype per tile (round to nearest even on
    the GPU). The interpreter's fp32 -> bf16 conversion does not round to nearest, so there the
    heads are cast here, once, to keep the numbers of w.to(h.dtype)."""
    if interpret:
        ws, wt = ws.to(hs.dtype), wt.to(ht.dtype)
    return ws, wt


def _check_triton(*tensors: torch.Tensor) -> bool:
    dev = tensors[0].device
    interpret = triton_interpreter_active()
    if dev.type == "cpu" and not interpret:
        raise RuntimeError("Triton kernels run on CPU tensors only with TRITON_INTERPRET=1 "
                           "set before `import triton`")
    return interpret and dev.type == "cpu"


# ======================================================================================
# Launchers (same contract as e3kernels._C.fused_kd_forward / fused_kd_backward)
# ======================================================================================

def _merge_stats(stats: torch.Tensor, reverse: bool, compute_ce: bool, temperature: float):
    """Combine the [S, NSTAT, N] partial statistics of the vocab splits. Returns
    (kl_raw, h_raw, lse_s, lse_t, lse1) before the ignore mask (lse1 None without CE)."""
    ms, ls, mt, lt, x, y, l1 = stats.unbind(1)

    def combine(m, sumexp):
        m_eff = torch.where(sumexp > 0, m, _NEG_INF)
        big = m_eff.max(0).values
        big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
        a = torch.where(sumexp > 0, torch.exp(m_eff - big), torch.zeros_like(sumexp))
        return big, a, (a * sumexp).sum(0)

    Ms, as_, Ls = combine(ms, ls)
    Mt, at_, Lt = combine(mt, lt)
    zero = torch.zeros_like(lt)
    dmt = torch.where(lt > 0, mt - Mt, zero)
    dms = torch.where(ls > 0, ms - Ms, zero)
    Y = (at_ * (y + lt * dmt)).sum(0)
    if reverse:
        X = (as_ * (x + ls * (dms - dmt))).sum(0)
        kl = X / Ls - torch.log(Ls) + torch.log(Lt)
    else:
        X = (at_ * (x + lt * (dmt - dms))).sum(0)
        kl = X / Lt - torch.log(Lt) + torch.log(Ls)
    h = torch.log(Lt) - Y / Lt
    lse_s = Ms + torch.log(Ls)
    lse_t = Mt + torch.log(Lt)
    lse1 = None
    if compute_ce:  # l1_j = sum exp(T (z_s - m_s,j)): rescale by exp(T (m_s,j - M_s))
        a1 = torch.where(ls > 0, torch.exp(temperature * dms), zero)
        lse1 = temperature * Ms + torch.log((a1 * l1).sum(0))
    return kl, h, lse_s, lse_t, lse1


def _xform_args(xs, xt) -> tuple[tuple, dict]:
    """(scale_s, cap_s, scale_t, cap_t) and the constexprs XF_S / XF_T of two transforms."""
    def xf(x):
        return 0 if x.is_identity else (2 if x.softcap is not None else 1)

    cap = lambda x: float(x.softcap) if x.softcap is not None else 1.0  # noqa: E731
    return ((float(xs.scale), cap(xs), float(xt.scale), cap(xt)),
            dict(XF_S=xf(xs), XF_T=xf(xt)))


def _label_logits(hs, ws, safe_labels):
    """u_i = hs[i] . ws[label_i] in fp32 (O(N D)), for the CE value and its one-hot gradient."""
    rows = ws.index_select(0, safe_labels).to(hs.dtype)  # (the head rows as the kernel sees them)
    return torch.bmm(hs.float().unsqueeze(1), rows.float().unsqueeze(2)).view(-1), rows


def fused_kd_forward_triton(hs, ws, ht, wt, labels, inv_temperature: float, reverse: bool,
                            ignore_index: int, vocab_size: int, compute_ce: bool,
                            opts: LaunchOptions | None = None, xs: LogitTransform = IDENTITY,
                            xt: LogitTransform = IDENTITY) -> list[torch.Tensor]:
    """Triton forward. Returns [kl, teacher_entropy, student_lse, teacher_lse, ce, student_lse_t1]
    (all [N] fp32; ce and student_lse_t1 are empty tensors unless compute_ce). xs / xt: the
    student's / teacher's logit transform."""
    opts = opts or LaunchOptions()
    interpret = _check_triton(hs)
    ws, wt = _heads_for_interpreter(hs, ws, ht, wt, interpret)
    n, ds = hs.shape
    dt = ht.shape[1]
    v = int(vocab_size)
    dev = hs.device
    f32 = dict(dtype=torch.float32, device=dev)
    empty = torch.empty(0, **f32)
    has_labels = labels is not None and labels.numel() > 0
    if compute_ce and not has_labels:
        raise ValueError("compute_ce needs labels")
    if n == 0:
        z = torch.empty(0, **f32)
        return [z, z.clone(), z.clone(), z.clone(), z.clone() if compute_ce else empty,
                z.clone() if compute_ce else empty.clone()]
    lab = labels.to(torch.int64).contiguous() if has_labels else torch.empty(1, dtype=torch.int64, device=dev)
    up_s, prec_s = _precision_flags(hs.dtype, interpret)
    up_t, prec_t = _precision_flags(ht.dtype, interpret)
    tuned = _use_tuned(dev, opts)
    bn_nominal = 128 if tuned else _interp_blocks(n, v, max(ds, dt), opts)[0]
    splits = _num_splits(n, v, dev, opts, bn_nominal)
    if tuned:
        v_chunk = _vocab_chunk(v, splits, _V_ALIGN)
    else:
        bn, bv, bd = _interp_blocks(n, v, max(ds, dt), opts)
        v_chunk = _vocab_chunk(v, splits, bv)
    splits = math.ceil(v / v_chunk)
    stats = torch.full((splits, NSTAT, n), float("nan"), **f32)  # poisoned: unwritten shows
    if not compute_ce:
        stats[:, 6:].zero_()
    xf_args, xf_flags = _xform_args(xs, xt)
    args = (hs, ws, ht, wt, stats, n, ds, dt, v, v_chunk, float(inv_temperature),
            1.0 / float(inv_temperature), *xf_args, hs.stride(0), hs.stride(1), ws.stride(0), ws.stride(1),
            ht.stride(0), ht.stride(1), wt.stride(0), wt.stride(1), stats.stride(0), stats.stride(1))
    flags = dict(REVERSE=bool(reverse), COMPUTE_CE=bool(compute_ce), UPCAST_S=up_s, UPCAST_T=up_t,
                 PREC_S=prec_s, PREC_T=prec_t, **xf_flags)
    with _quiet(interpret):
        if tuned:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)
            _fwd_tuned[grid](*args, **flags)
        else:
            _fused_kd_fwd_kernel[(triton.cdiv(n, bn), splits)](
                *args, **flags, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=4)
    kl, h, lse_s, lse_t, lse1 = _merge_stats(stats, bool(reverse), bool(compute_ce),
                                             1.0 / float(inv_temperature))
    if has_labels:
        valid = lab != ignore_index
        zero = torch.zeros((), **f32)
        kl = torch.where(valid, kl, zero)
        h = torch.where(valid, h, zero)
    ce = empty
    if compute_ce:
        ulab, _ = _label_logits(hs, ws, torch.where(valid, lab, 0))
        if not xs.is_identity:
            ulab = xs.apply(ulab)
        ce = torch.where(valid, lse1 - ulab, zero)
    else:
        lse1 = empty.clone()  # a distinct tensor: custom-op outputs must not alias
    return [kl, h, lse_s, lse_t, ce, lse1]


def fused_kd_backward_triton(grad_kl, grad_ce, hs, ws, ht, wt, labels, student_lse, teacher_lse,
                             kl, student_lse_t1, inv_temperature: float, reverse: bool,
                             ignore_index: int, vocab_size: int, need_grad_ws: bool,
                             opts: LaunchOptions | None = None, xs: LogitTransform = IDENTITY,
                             xt: LogitTransform = IDENTITY) -> list[torch.Tensor]:
    """Triton backward. Returns [grad_hs [N, Ds] (dtype of hs), grad_ws [Vs, Ds] fp32 (rows >=
    vocab_size zero; empty unless need_grad_ws)]."""
    opts = opts or LaunchOptions()
    interpret = _check_triton(hs)
    ws, wt = _heads_for_interpreter(hs, ws, ht, wt, interpret)
    n, ds = hs.shape
    dt = ht.shape[1]
    v = int(vocab_size)
    dev = hs.device
    has_labels = labels is not None and labels.numel() > 0
    has_ce = grad_ce is not None and grad_ce.numel() > 0
    dws = (torch.zeros(ws.shape[0], ds, dtype=torch.float32, device=dev) if need_grad_ws
           else torch.empty(0, dtype=torch.float32, device=dev))
    if n == 0:
        return [torch.zeros_like(hs), dws]
    if has_ce and not has_labels:
        raise ValueError("a CE gradient needs labels")
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    lab = labels.to(torch.int64).contiguous() if has_labels else torch.empty(1, dtype=torch.int64, device=dev)
    dhs = torch.zeros(n, ds, dtype=torch.float32, device=dev)
    up_s, prec_s = _precision_flags(hs.dtype, interpret)
    up_t, prec_t = _precision_flags(ht.dtype, interpret)
    dz_lowp, _, prec_b = _backward_flags(hs.dtype, interpret)
    tuned = _use_tuned(dev, opts)
    bn_nominal = 128 if tuned else _interp_blocks(n, v, max(ds, dt), opts)[0]
    splits = _num_splits(n, v, dev, opts, bn_nominal)
    if tuned:
        v_chunk = _vocab_chunk(v, splits, _V_ALIGN)
    else:
        bn, bv, bd = _interp_blocks(n, v, max(ds, dt), opts)
        v_chunk = _vocab_chunk(v, splits, bv)
    splits = math.ceil(v / v_chunk)
    xf_args, xf_flags = _xform_args(xs, xt)
    args = (hs, ws, ht, wt, lab,
            grad_kl.to(torch.float32).contiguous(),
            grad_ce.to(torch.float32).contiguous() if has_ce else dummy,
            student_lse.contiguous(), teacher_lse.contiguous(), kl.to(torch.float32).contiguous(),
            student_lse_t1.contiguous() if has_ce else dummy,
            dhs, dws if need_grad_ws else dummy,
            n, ds, dt, v, v_chunk, float(inv_temperature), int(ignore_index), *xf_args,
            hs.stride(0), hs.stride(1), ws.stride(0), ws.stride(1),
            ht.stride(0), ht.stride(1), wt.stride(0), wt.stride(1),
            dhs.stride(0), ds)
    flags = dict(HAS_LABELS=has_labels, REVERSE=bool(reverse), HAS_CE=has_ce,
                 NEED_DWS=bool(need_grad_ws), DHS_ATOMIC=splits > 1, DZ_LOWP=dz_lowp,
                 UPCAST_S=up_s, UPCAST_T=up_t, PREC_S=prec_s, PREC_T=prec_t, PREC_B=prec_b,
                 **xf_flags)
    with _quiet(interpret):
        if tuned:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)
            _bwd_tuned[grid](*args, **flags)
        else:
            _fused_kd_bwd_kernel[(triton.cdiv(n, bn), splits)](
                *args, **flags, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=4)
    if has_ce:  # one-hot part of the CE gradient: -g_ce at the label column, O(N D)
        valid = lab != ignore_index
        safe = torch.where(valid, lab, 0)
        gce = torch.where(valid, grad_ce.to(torch.float32), 0.0)
        rows = ws.index_select(0, safe).to(hs.dtype).float()
        if not xs.is_identity:  # d y / d u at the label logit
            if xs.softcap is None:
                gce = gce * xs.scale
            else:
                u = torch.bmm(hs.float().unsqueeze(1), rows.unsqueeze(2)).view(-1)
                t = torch.tanh(u * xs.scale / xs.softcap)
                gce = gce * (xs.scale * (1.0 - t * t))
        dhs.sub_(gce[:, None] * rows)
        if need_grad_ws:
            dws.index_add_(0, safe, gce[:, None] * hs.float(), alpha=-1.0)
    return [dhs.to(hs.dtype), dws]
