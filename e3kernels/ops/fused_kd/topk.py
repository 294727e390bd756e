"""Offline teacher cache ops: online top-K of the teacher distribution and the student side of
the top-K KD loss, both without an [N, V] tensor.

`teacher_topk_forward` tiles tokens x vocab in torch (a [block_tokens, block_vocab] fp32 tile
at a time) with an online logsumexp and a running top-K merge. `GatheredLogitsFunction`
computes the student logits on the K cached ids, hs[i] . Ws[ids[i, k]], in token chunks and
recomputes the gathered rows in backward (nothing of size [N, K, Ds] is saved).
"""

from __future__ import annotations

import torch

from e3kernels.ops.fused_kd.logit_transform import IDENTITY, LogitTransform


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def teacher_topk_forward(ht: torch.Tensor, wt: torch.Tensor, k: int, inv_temperature: float,
                         vocab_size: int, block_tokens: int = 1024,
                         block_vocab: int = 8192, transform: LogitTransform = IDENTITY,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """ht [N, Dt], wt [Vt, Dt] -> (ids [N, k] int64, log-probs [N, k]) sorted by decreasing
    log-prob, log p = z - logsumexp_V(z), z = transform(ht wt[:V]^T) / T. Shapes are checked by
    the caller."""
    n = ht.shape[0]
    cd = _compute_dtype(ht.dtype)
    dev = ht.device
    ids_out = torch.empty(n, k, dtype=torch.int64, device=dev)
    lp_out = torch.full((n, k), float("nan"), dtype=cd, device=dev)
    for n0 in range(0, n, block_tokens):
        n1 = min(n, n0 + block_tokens)
        h = ht[n0:n1].to(cd)
        m = torch.full((n1 - n0,), float("-inf"), dtype=cd, device=dev)
        sumexp = torch.zeros(n1 - n0, dtype=cd, device=dev)
        best_v = best_i = None
        for v0 in range(0, vocab_size, block_vocab):
            v1 = min(vocab_size, v0 + block_vocab)
            z = h @ wt[v0:v1].to(cd).T
            if not transform.is_identity:
                z = transform.apply(z)
            z = z * inv_temperature
            m_new = torch.maximum(m, z.max(1).values)
            m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            scale = torch.where(sumexp > 0, torch.exp(m - m_safe), torch.zeros_like(sumexp))
            sumexp = sumexp * scale + torch.exp(z - m_safe[:, None]).sum(1)
            m = m_safe
            cv, ci = z.topk(min(k, v1 - v0), dim=1)
            ci = ci + v0
            if best_v is None:
                best_v, best_i = cv, ci
            else:
                cat_v, cat_i = torch.cat([best_v, cv], 1), torch.cat([best_i, ci], 1)
                best_v, pos = cat_v.topk(min(k, cat_v.shape[1]), dim=1)
                best_i = cat_i.gather(1, pos)
        lse = m + torch.log(sumexp)
        ids_out[n0:n1] = best_i
        lp_out[n0:n1] = best_v - lse[:, None]
    return ids_out, lp_out


class GatheredLogitsFunction(torch.autograd.Function):
    """(hs [N, Ds], ws [Vs, Ds], ids [N, K]) -> z [N, K] = sum_d hs[i, d] ws[ids[i, k], d]
    (fp32, fp64 for fp64 inputs), chunked over tokens so at most ~`max_elems` gathered weights
    exist at a time; backward regathers. d ws is accumulated in the compute dtype (index_add)."""

    @staticmethod
    def forward(ctx, hs, ws, ids, max_elems: int):
        n, kk = ids.shape
        ds = hs.shape[1]
        cd = _compute_dtype(hs.dtype)
        chunk = max(1, max_elems // max(1, kk * ds))
        out = torch.full((n, kk), float("nan"), dtype=cd, device=hs.device)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            wg = ws[ids[c0:c1]].to(cd)  # [c, K, Ds]
            out[c0:c1] = torch.bmm(wg, hs[c0:c1].to(cd).unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(hs, ws, ids)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, dz):
        hs, ws, ids = ctx.saved_tensors
        n = hs.shape[0]
        cd = _compute_dtype(hs.dtype)
        dz = dz.to(cd)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dhs = torch.zeros(hs.shape, dtype=cd, device=hs.device) if need_h else None
        dws = torch.zeros(ws.shape, dtype=cd, device=ws.device) if need_w else None
        for c0 in range(0, n, ctx.chunk):
            c1 = min(n, c0 + ctx.chunk)
            g = dz[c0:c1]
            if need_h:
                wg = ws[ids[c0:c1]].to(cd)
                dhs[c0:c1] = torch.bmm(g.unsqueeze(1), wg).squeeze(1)
            if need_w:
                contrib = g.unsqueeze(-1) * hs[c0:c1].to(cd).unsqueeze(1)  # [c, K, Ds]
                dws.index_add_(0, ids[c0:c1].reshape(-1), contrib.reshape(-1, hs.shape[1]))
        return (dhs.to(hs.dtype) if need_h else None, dws.to(ws.dtype) if need_w else None,
                None, None)


def topk_kd_per_token(zs_k: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float,
                      reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (KL, teacher entropy) on the top-K support from student logits zs_k [N, K]
    (unscaled) and cached teacher log-probs [N, K]; both renormalized over the K ids. -inf
    log-probs mark padding entries of the cache: they are removed from the support on both
    sides (so reverse KL stays finite); 0 log 0 := 0, NaN-free gradients."""
    cd = zs_k.dtype
    pad = torch.isneginf(topk_logprobs)
    zs_k = torch.where(pad, torch.full_like(zs_k, float("-inf")), zs_k)
    log_r = torch.log_softmax(zs_k / temperature, dim=-1)
    log_q = torch.log_softmax(topk_logprobs.to(cd) / temperature, dim=-1)
    r, q = log_r.exp(), log_q.exp()
    zero = torch.zeros((), dtype=cd, device=zs_k.device)
    qpos, rpos = q > 0, r > 0
    if reverse:
        kl = torch.where(rpos, r * (torch.where(rpos, log_r, zero)
                                    - torch.where(rpos, log_q, zero)), zero).sum(-1)
    else:
        kl = torch.where(qpos, q * (torch.where(qpos, log_q, zero)
                                    - torch.where(qpos, log_r, zero)), zero).sum(-1)
    ent = -torch.where(qpos, q.detach() * torch.where(qpos, log_q.detach(), zero), zero).sum(-1)
    return kl, ent


def default_max_elems() -> int:
    return 1 << 24  # 64 MiB of fp32 gathered weights per chunk


__all__ = ["GatheredLogitsFunction", "teacher_topk_forward", "topk_kd_per_token",
           "default_max_elems"]
