"""Plain-PyTorch references of every e3kernels op.

They define the semantics the Triton and C++ kernels must match; tests compare against them
(in fp64 for ground truth), and dispatch falls back to them where no kernel is available.
They materialize everything and are slow on purpose: clarity first.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from e3kernels.ops.fused_kd.logit_transform import logit_transforms

# ======================================================================================
# Gumbel-TopK (issue 3)
# ======================================================================================

# Gumbel-TopK: the counter-based noise (bit-exact contract shared by every backend) ---------

GUMBEL_RELAXATIONS = ("softmax", "sigmoid")
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_U32 = 0xFFFFFFFF
# Cephes logf coefficients, rounded to fp32 (these decimals are exact fp32 values).
E3LOG_POLY = (0.07037683576345444, -0.11514610052108765, 0.11676998436450958,
              -0.12420140951871872, 0.14249323308467865, -0.16668057441711426,
              0.2000071406364441, -0.24999994039535522, 0.3333333134651184)
E3LOG_LN2_LO, E3LOG_LN2_HI, E3LOG_SQRTHF = -0.00021219444170128554, 0.693359375, 0.7071067690849304
SOFTMAX_EPS = 2.0 ** -126  # successive softmax: a <- a + log(max(1 - p, eps)) / tau


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a uint32 constant and uint32 values held in int64."""
    p_lo = a * (b & 0xFFFF)  # < 2^48: no int64 overflow
    p_hi = a * (b >> 16)
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & _U32


def philox4x32_ref(c0, c1, c2, c3, key0: int, key1: int, rounds: int = 10):
    """Philox4x32-10 (Salmon et al. 2011, Random123) on uint32 values held in int64 tensors."""
    k0, k1 = key0 & _U32, key1 & _U32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
    return c0, c1, c2, c3


def e3_logf_ref(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal fp32 values from IEEE +, -, * only (Cephes logf, ~1 ulp).

    x = 2^e m, m in [sqrt(1/2), sqrt(2)), f = m - 1:
    log x = f - f^2/2 + f^3 P(f) + e ln2, with ln2 = 0.693359375 - 2.12194440e-4.
    Every rounding step is spelled out (no FMA), so C++, Triton and torch agree bit for bit.
    """
    bits = x.view(torch.int32)
    e = (bits >> 23) - 126
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)  # in [0.5, 1)
    small = m < E3LOG_SQRTHF
    e = torch.where(small, e - 1, e)
    f = torch.where(small, (m + m) - 1.0, m - 1.0)
    z = f * f
    p = torch.full_like(f, E3LOG_POLY[0])
    for c in E3LOG_POLY[1:]:
        p = p * f
        p = p + c
    y = (p * f) * z
    fe = e.to(torch.float32)
    y = y + fe * E3LOG_LN2_LO
    y = y + z * -0.5
    r = f + y
    return r + fe * E3LOG_LN2_HI


def gumbel_from_bits_ref(x: torch.Tensor) -> torch.Tensor:
    """fp32 Gumbel(0, 1) noise from uint32 draws (any int tensor holding values in [0, 2^32)).

    u = (2 (x >> 9) + 1) 2^-24, exactly representable, in [2^-24, 1 - 2^-24];
    g = -log(-log(u)) with `e3_logf_ref`, so g in [-2.8, 16.7].
    """
    u = (((x.to(torch.int64) >> 9) * 2 + 1).to(torch.int32).to(torch.float32)) * 2.0 ** -24
    return -e3_logf_ref(-e3_logf_ref(u))


def gumbel_noise_ref(batch: int, length: int, seed: int = 0, offset: int = 0,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 `[batch, length]` noise g[r, c] = G(philox(ctr = (c >> 2, r, off_lo, off_hi),
    key = (seed_lo, seed_hi))[c & 3]): a pure function of (seed, offset, row, column)."""
    n4 = (length + 3) // 4
    c0 = torch.arange(n4, device=device, dtype=torch.int64).expand(batch, n4)
    c1 = torch.arange(batch, device=device, dtype=torch.int64)[:, None].expand(batch, n4)
    c2 = torch.full_like(c0, offset & _U32)
    c3 = torch.full_like(c0, (offset >> 32) & _U32)
    xs = philox4x32_ref(c0, c1, c2, c3, seed & _U32, (seed >> 32) & _U32)
    x = torch.stack(xs, dim=-1).reshape(batch, 4 * n4)[:, :length]
    return gumbel_from_bits_ref(x)


def successive_softmax_step_ref(a: torch.Tensor, tau: float):
    """One step of the relaxed top-k on rows a [B, L]: returns (p, q, a_next).

    p = softmax(a), q = 1 - p (for the row maximum computed as (sum of the other exps)/Z,
    which avoids cancellation when p -> 1), a_next = a + log(max(q, eps)) / tau.
    """
    mx = torch.amax(a, dim=1, keepdim=True)
    e = torch.exp(a - mx)
    den = e.sum(dim=1, keepdim=True)
    ismax = a == mx
    nmax = ismax.sum(dim=1, keepdim=True).to(a.dtype)
    s1 = torch.where(ismax, torch.zeros_like(e), e).sum(dim=1, keepdim=True)
    p = e / den
    q = torch.where(ismax, (s1 + (nmax - 1.0)) / den, 1.0 - p)
    keep = q > SOFTMAX_EPS
    logq = torch.where(keep, torch.log(torch.where(keep, q, torch.ones_like(q))),
                       torch.full_like(q, math.log(SOFTMAX_EPS)))
    return p, q, a + logq / tau


class GumbelTopKRefOutput(NamedTuple):
    mask: torch.Tensor  # [B, L] straight-through m + (s - stopgrad(s)); forward value is m (0/1)
    soft: torch.Tensor  # [B, L] relaxation s
    indices: torch.Tensor  # [B, max k] int64 selected columns in ascending order, -1 padded
    z: torch.Tensor  # [B, L] perturbed logits alpha + g (compute dtype, detached)


def gumbel_topk_ref(
    logits: torch.Tensor,
    k: int | torch.Tensor,
    tau: float = 1.0,
    seed: int = 0,
    offset: int = 0,
    relaxation: str = "softmax",
    compute_dtype: torch.dtype | None = None,
    k_max: int | None = None,
) -> GumbelTopKRefOutput:
    """Gumbel-TopK with a straight-through gradient: the semantics every backend matches.

    logits alpha [B, L] (fp16/bf16/fp32/fp64), k int or [B] ints in [0, L], tau > 0.
    k_max: max(k) when the caller knows it (no host sync: torch.compile can trace it).
        g = gumbel_noise_ref(B, L, seed, offset)           (fp32, bit-exact on every backend)
        z = alpha + g   (compute dtype: fp32, or fp64 for fp64 logits), y = z / tau
        m = top-k of z per row (= top-k of y), ties -> lower column index
        relaxation "softmax" (successive softmax relaxed top-k, Xie & Ermon 2019, the
            penalty accumulated on the unscaled scores z, so s -> m as tau -> 0):
            a^0 = y;  p^j = softmax(a^{j-1});  a^j = a^{j-1} + log(max(1 - p^j, 2^-126)) / tau;
            s = sum_{j=1..k} p^j    (see successive_softmax_step_ref); s = 1 if k = L
            (the steps would only give sum(s) = L; the mask is then all ones, no gradient)
        relaxation "sigmoid": t = (y_(k) + y_(k+1)) / 2 from the k-th and (k+1)-th largest
            y (the hard pivots, differentiable), s = sigmoid(y - t); s = 0 if k = 0, 1 if k = L
        mask = m + (s - stopgrad(s))    (value exactly m; d mask/d alpha = J_s(y) / tau)
    """
    if relaxation not in GUMBEL_RELAXATIONS:
        raise ValueError(f"relaxation must be one of {GUMBEL_RELAXATIONS}, got {relaxation!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, L], got shape {tuple(logits.shape)}")
    b, n = logits.shape
    dev = logits.device
    cd = compute_dtype or (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    kk = torch.as_tensor(k, device=dev).to(torch.int64).expand(b)
    kmax = k_max if k_max is not None else (int(kk.max()) if b else 0)
    g = gumbel_noise_ref(b, n, seed, offset, dev)
    alpha = logits.to(cd)
    z = alpha + g.to(cd)
    y = z / tau
    cols = torch.arange(n, device=dev)
    order = torch.sort(z.detach(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, cols.expand(b, n).contiguous())
    m = (rank < kk[:, None]).to(cd)
    if relaxation == "sigmoid":
        ik = order.gather(1, (kk - 1).clamp(0, n - 1)[:, None])
        ik1 = order.gather(1, kk.clamp(0, n - 1)[:, None])
        t = (y.gather(1, ik) + y.gather(1, ik1)) * 0.5
        s = torch.sigmoid(y - t)
        s = torch.where((kk == 0)[:, None], torch.zeros_like(s), s)
        s = torch.where((kk == n)[:, None], torch.ones_like(s), s)
    else:
        a = y
        s = torch.zeros_like(y) + 0.0 * y  # zeros that keep the graph (k = 0 everywhere)
        for j in range(kmax):
            p, _, a = successive_softmax_step_ref(a, tau)
            s = s + torch.where((kk > j)[:, None], p, torch.zeros_like(p))
        s = torch.where((kk == n)[:, None], torch.ones_like(s), s)
    mask = m + (s - s.detach())
    idx = torch.sort(torch.where(m > 0, cols, cols + n), dim=1).values[:, :kmax]
    idx = torch.where(idx < n, idx, torch.full_like(idx, -1))
    return GumbelTopKRefOutput(mask.to(logits.dtype), s.to(logits.dtype), idx, z.detach())

# --- end gumbel-topk references ---

# ======================================================================================
# Fused linear KD loss (issue 4)
# ======================================================================================

class FusedKDRefOutput(NamedTuple):
    """Per-token outputs, all `[N]`, in the compute dtype. Ignored tokens hold 0."""

    kl: torch.Tensor  # KL(p_t || p_s) (forward) or KL(p_s || p_t) (reverse), at temperature T
    teacher_entropy: torch.Tensor  # H(p_t) at temperature T, nats
    student_lse: torch.Tensor  # logsumexp(z_s) of the temperature-scaled student logits
    teacher_lse: torch.Tensor  # logsumexp(z_t) of the temperature-scaled teacher logits
    ce: torch.Tensor | None  # hard-label cross-entropy of the UNscaled student logits (T=1)


def fused_linear_kd_ref(
    hs: torch.Tensor,
    ws: torch.Tensor,
    ht: torch.Tensor,
    wt: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    kl: str = "forward",
    ignore_index: int = -100,
    vocab_size: int | None = None,
    compute_ce: bool = False,
    compute_dtype: torch.dtype | None = None,
    logit_scale: float | tuple[float, float] = 1.0,
    softcap: float | None | tuple[float | None, float | None] = None,
) -> FusedKDRefOutput:
    """Per-token KD statistics from hidden states and heads, materializing the logits.

    Shapes: hs [N, Ds], ws [Vs, Ds], ht [N, Dt], wt [Vt, Dt], labels [N] (int) or None.
    V = vocab_size if given (<= min(Vs, Vt): head rows >= V are padding and are ignored),
    else Vs, which must equal Vt.

        r_s = hs ws[:V]^T,  r_t = ht wt[:V]^T                    (raw head products)
        y = c tanh(s r / c) (softcap c) or s r, per side           (logit_scale s, softcap c)
        z_s = y_s / T,  z_t = y_t / T
        log p = z - logsumexp(z)
        forward KL_i = sum_v p_t (log p_t - log p_s)      reverse KL_i = sum_v p_s (log p_s - log p_t)
        H_t,i = -sum_v p_t log p_t          (0 log 0 := 0, so -inf logits are allowed)
        ce_i  = logsumexp(y_s) - y_s[label_i]                         (hard labels, T = 1)

    Tokens whose label == ignore_index get kl = H = ce = 0 (lse values are still computed).
    compute_dtype defaults to fp32 for low-precision inputs and to the input dtype otherwise
    (pass fp64 inputs for ground truth). Autograd flows to hs and ws (and ht, wt if they
    require grad).
    """
    if kl not in ("forward", "reverse"):
        raise ValueError(f"kl must be 'forward' or 'reverse', got {kl!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vs, vt = ws.shape[0], wt.shape[0]
    if vocab_size is None:
        if vs != vt:
            raise ValueError(f"student vocab {vs} != teacher vocab {vt}: pass vocab_size")
        vocab_size = vs
    if not 0 < vocab_size <= min(vs, vt):
        raise ValueError(f"vocab_size must be in [1, {min(vs, vt)}], got {vocab_size}")
    xs, xt = logit_transforms(logit_scale, softcap)
    cd = compute_dtype or (hs.dtype if hs.dtype in (torch.float32, torch.float64) else torch.float32)
    zs1 = xs.apply(hs.to(cd) @ ws[:vocab_size].to(cd).T)
    zs = zs1 / temperature
    zt = xt.apply(ht.to(cd) @ wt[:vocab_size].to(cd).T) / temperature
    lse_s = torch.logsumexp(zs, dim=-1)
    lse_t = torch.logsumexp(zt, dim=-1)
    log_ps = zs - lse_s[:, None]
    log_pt = zt - lse_t[:, None]
    ps, pt = log_ps.exp(), log_pt.exp()
    zero = torch.zeros((), dtype=cd, device=hs.device)
    # Double where: where p = 0 the logs are replaced before any product, so neither the
    # forward nor the backward ever forms 0 * inf (NaN-free gradients with -inf logits).
    tpos, spos = pt > 0, ps > 0
    if kl == "forward":
        kl_i = torch.where(tpos, pt * (torch.where(tpos, log_pt, zero)
                                       - torch.where(tpos, log_ps, zero)), zero).sum(-1)
    else:
        kl_i = torch.where(spos, ps * (torch.where(spos, log_ps, zero)
                                       - torch.where(spos, log_pt, zero)), zero).sum(-1)
    h_t = -torch.where(tpos, pt * torch.where(tpos, log_pt, zero), zero).sum(-1)
    if labels is None:
        valid = torch.ones(hs.shape[0], dtype=torch.bool, device=hs.device)
    else:
        valid = labels != ignore_index
    kl_i = torch.where(valid, kl_i, zero)
    h_t = torch.where(valid, h_t, zero)
    ce = None
    if compute_ce:
        if labels is None:
            raise ValueError("compute_ce=True needs labels")
        safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
        ce_all = torch.logsumexp(zs1, dim=-1) - zs1.gather(1, safe[:, None])[:, 0]
        ce = torch.where(valid, ce_all, zero)
    return FusedKDRefOutput(kl_i, h_t, lse_s, lse_t, ce)


def teacher_topk_ref(
    ht: torch.Tensor,
    wt: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
    logit_scale: float | tuple[float, float] = 1.0,
    softcap: float | None | tuple[float | None, float | None] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k teacher token ids [N, k] (int64) and their log-probs [N, k] over the FULL vocab,
    log p = z - logsumexp(z) with z = y / T, y = the teacher's transform (logit_scale, softcap;
    of a pair, the teacher entry) of ht wt[:V]^T, sorted by decreasing log-prob."""
    _, xt = logit_transforms(logit_scale, softcap)
    v = vocab_size or wt.shape[0]
    cd = compute_dtype or (ht.dtype if ht.dtype in (torch.float32, torch.float64) else torch.float32)
    z = xt.apply(ht.to(cd) @ wt[:v].to(cd).T) / temperature
    lp = torch.log_softmax(z, dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    return ids, vals


def kd_topk_ref(
    hs: torch.Tensor,
    ws: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    kl: str = "forward",
    ignore_index: int = -100,
    compute_dtype: torch.dtype | None = None,
    logit_scale: float | tuple[float, float] = 1.0,
    softcap: float | None | tuple[float | None, float | None] = None,
) -> FusedKDRefOutput:
    """KD against an offline teacher cache, on the top-K support S_i = topk_ids[i] (K ids).

        q = softmax_S(topk_logprobs / T)     (teacher, renormalized on S)
        r = softmax_S(z_s[S] / T)            (student logits on the same ids, renormalized)
        forward KL_i = sum_S q (log q - log r), reverse KL_i = sum_S r (log r - log q)
        H_i = -sum_S q log q
    Cache entries with log-prob -inf are padding and are removed from S on both sides.
    student_lse / teacher_lse hold the normalizers on S (logsumexp of z_s[S]/T and of
    topk_logprobs/T); ce is None. Materializes the full student logits (reference only).
    z_s is the student's transformed logit y_s (logit_scale, softcap; of a pair, the student
    entry: the teacher's transform is already in the cache).
    """
    xs, _ = logit_transforms(logit_scale, softcap)
    cd = compute_dtype or (hs.dtype if hs.dtype in (torch.float32, torch.float64) else torch.float32)
    zs = xs.apply(hs.to(cd) @ ws.to(cd).T).gather(1, topk_ids.long()) / temperature
    zs = torch.where(torch.isneginf(topk_logprobs), float("-inf"), zs)
    zt = topk_logprobs.to(cd) / temperature
    lse_s, lse_t = torch.logsumexp(zs, -1), torch.logsumexp(zt, -1)
    log_r, log_q = zs - lse_s[:, None], zt - lse_t[:, None]
    r, q = log_r.exp(), log_q.exp()
    zero = torch.zeros((), dtype=cd, device=hs.device)
    qpos, rpos = q > 0, r > 0
    if kl == "forward":
        kl_i = torch.where(qpos, q * (torch.where(qpos, log_q, zero)
                                      - torch.where(qpos, log_r, zero)), zero).sum(-1)
    else:
        kl_i = torch.where(rpos, r * (torch.where(rpos, log_r, zero)
                                      - torch.where(rpos, log_q, zero)), zero).sum(-1)
    h = -torch.where(qpos, q * torch.where(qpos, log_q, zero), zero).sum(-1)
    if labels is not None:
        valid = labels != ignore_index
        kl_i, h = torch.where(valid, kl_i, zero), torch.where(valid, h, zero)
    return FusedKDRefOutput(kl_i, h, lse_s, lse_t, None)


# --- end fused-kd references ---
