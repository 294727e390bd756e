"""Plain-PyTorch references of every e3kernels op.

They define the semantics the Triton and C++ kernels must match; tests compare against them
(in fp64 for ground truth), and dispatch falls back to them where no kernel is available.
They materialize everything and are slow on purpose: clarity first.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# ======================================================================================
# Gumbel-TopK (issue 3)
# ======================================================================================

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
) -> FusedKDRefOutput:
    """Per-token KD statistics from hidden states and heads, materializing the logits.

    Shapes: hs [N, Ds], ws [Vs, Ds], ht [N, Dt], wt [Vt, Dt], labels [N] (int) or None.
    V = vocab_size if given (<= min(Vs, Vt): head rows >= V are padding and are ignored),
    else Vs, which must equal Vt.

        z_s = hs ws[:V]^T / T,  z_t = ht wt[:V]^T / T
        log p = z - logsumexp(z)
        forward KL_i = sum_v p_t (log p_t - log p_s)      reverse KL_i = sum_v p_s (log p_s - log p_t)
        H_t,i = -sum_v p_t log p_t          (0 log 0 := 0, so -inf logits are allowed)
        ce_i  = logsumexp(T z_s) - T z_s[label_i]                    (hard labels, T = 1)

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
    cd = compute_dtype or (hs.dtype if hs.dtype in (torch.float32, torch.float64) else torch.float32)
    zs1 = hs.to(cd) @ ws[:vocab_size].to(cd).T
    zs = zs1 / temperature
    zt = (ht.to(cd) @ wt[:vocab_size].to(cd).T) / temperature
    lse_s = torch.logsumexp(zs, dim=-1)
    lse_t = torch.logsumexp(zt, dim=-1)
    log_ps = zs - lse_s[:, None]
    log_pt = zt - lse_t[:, None]
    ps, pt = log_ps.exp(), log_pt.exp()
    zero = torch.zeros((), dtype=cd, device=hs.device)
    if kl == "forward":
        kl_i = torch.where(pt > 0, pt * (log_pt - log_ps), zero).sum(-1)
    else:
        kl_i = torch.where(ps > 0, ps * (log_ps - log_pt), zero).sum(-1)
    h_t = -torch.where(pt > 0, pt * log_pt, zero).sum(-1)
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


# --- end fused-kd references ---
