"""The top-K KD loss (`teacher_topk` cache + `fused_linear_kd_loss_topk`) against full-vocabulary
computations, by the accuracy rule of `e3kernels.testing` (error to the fp64 truth at most
twice the same-precision reference's, + 1e-6 (1 + max|truth|)) on the loss, per-token kl,
teacher entropy, weights and the gradients wrt hs and ws.

K = V: the top-K support is the whole vocabulary, so the loss is `fused_linear_kd_loss`
(truth: its reference backend, `fused_linear_kd_ref`, in fp64).
K < V: an oracle written here from the full [N, V] logits, with S_i the K largest teacher
logits of token i (chosen in fp64):

    q = softmax over S of z_t / T,  r = softmax over S of z_s / T     (0 off S)
    forward KL_i = sum_S q (log q - log r),  reverse KL_i = sum_S r (log r - log q)
    H_i = -sum_S q log q,  w_i = 1 ("none") or clip(H_i / mean_valid H, 0.1, 5) ("entropy")
    loss = T^2 sum_i w_i KL_i / n_valid ("mean"), its sum ("sum") or the terms ("none")
"""

from __future__ import annotations

import zlib

import pytest
import torch

from e3kernels import fused_linear_kd_loss, fused_linear_kd_loss_topk, teacher_topk
from e3kernels.testing import IGNORE_INDEX, assert_kd_accurate, kd_case

DTYPES = [torch.float32, torch.bfloat16]
WEIGHTINGS = ["entropy", "none"]
REDUCTIONS = ["mean", "sum", "none"]
# name: (token shape, V, Ds, Dt, T, kl, ignore_every)
SHAPES = {
    "N1-V97-Ds17-Dt13": ((1,), 97, 17, 13, 1.0, "forward", 0),
    "N37-V1000-Ds63-Dt40": ((37,), 1000, 63, 40, 2.0, "reverse", 4),
    "B3xL13-V501-Ds31-Dt48": ((3, 13), 501, 31, 48, 0.7, "forward", 5),
}
# name: (shape name, K)
TOPK_CASES = {
    "N1-V97-K1": ("N1-V97-Ds17-Dt13", 1),
    "N37-V1000-K16": ("N37-V1000-Ds63-Dt40", 16),
    "N37-V1000-K999": ("N37-V1000-Ds63-Dt40", 999),
    "B3xL13-V501-K100": ("B3xL13-V501-Ds31-Dt48", 100),
}


def inputs(shape_name, dtype):
    """(hs [..., Ds], ws [V, Ds], ht [..., Dt], wt [V, Dt], labels [...], upstream [...]) of
    `kd_case`, token dims reshaped to the shape's."""
    lead, v, ds, dt, _, _, ignore_every = SHAPES[shape_name]
    n = torch.Size(lead).numel()
    c = kd_case(n, v, ds, dt, dtype, seed=zlib.crc32(shape_name.encode()),
                ignore_every=ignore_every)
    return (c.hs.reshape(*lead, ds), c.ws, c.ht.reshape(*lead, dt), c.wt,
            c.labels.reshape(lead), c.grad_ce.reshape(lead))


def backward(out, hs, ws, upstream, reduction):
    """Grads of the loss (scalar) or of sum(upstream * loss) ("none") wrt hs and ws."""
    (out.loss if reduction != "none" else (out.loss * upstream.to(out.loss.dtype)).sum()).backward()
    return {"loss": out.loss.detach(), "kl": out.kl, "teacher_entropy": out.teacher_entropy,
            "weights": out.weights, "grad_hs": hs.grad, "grad_ws": ws.grad}


def leaves(hs, ws, dtype=None):
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    return cast(hs.detach()).requires_grad_(), cast(ws.detach()).requires_grad_()


def topk_loss(hs, ws, ht, wt, labels, upstream, k, *, temperature, kl, weighting, reduction):
    ids, logprobs = teacher_topk(ht, wt, k)
    h, w = leaves(hs, ws)
    out = fused_linear_kd_loss_topk(h, w, ids, logprobs, labels, temperature, kl, weighting,
                                    reduction)
    return backward(out, h, w, upstream, reduction), ids


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_full_support_matches_the_fused_loss(shape_name, dtype, weighting, reduction):
    """K = V: the top-K loss meets the rule against `fused_linear_kd_loss` on its reference
    backend (`fused_linear_kd_ref`): in fp64 the truth, at the input dtype the reference."""
    hs, ws, ht, wt, labels, upstream = inputs(shape_name, dtype)
    _, v, _, _, t, kl, _ = SHAPES[shape_name]
    kw = dict(temperature=t, kl=kl, weighting=weighting, reduction=reduction)

    def fused(dtype_=None):
        h, w = leaves(hs, ws, dtype_)
        cast = (lambda x: x.to(dtype_)) if dtype_ is not None else (lambda x: x)
        out = fused_linear_kd_loss(h, w, cast(ht), cast(wt), labels, backend="reference", **kw)
        return backward(out, h, w, upstream, reduction)

    truth, ref = fused(torch.float64), fused()
    ours, ids = topk_loss(hs, ws, ht, wt, labels, upstream, v, **kw)
    assert ids.shape == (*labels.shape, v)
    assert_kd_accurate(ours, ref, truth, backend="top-K loss",
                       case=f"{shape_name} K=V {dtype} {kl} T={t} {weighting} {reduction}")


def topk_oracle(hs, ws, ht, wt, labels, upstream, support, *, temperature, kl, weighting,
                reduction, compute_dtype=None):
    """The top-K loss from full [N, V] logits on `support` [..., V] (bool), inputs cast to
    compute_dtype (fp64: the truth) or as given (fp32 compute for bf16 inputs, gradients in
    the input dtype)."""
    h, w = leaves(hs, ws, compute_dtype)
    cd = compute_dtype or torch.float32
    zs = (h.to(cd) @ w.to(cd).T) / temperature
    zt = (ht.to(cd) @ wt.to(cd).T) / temperature
    zero = torch.zeros((), dtype=cd)

    def log_softmax_on_support(z):
        return torch.where(support, torch.log_softmax(z.masked_fill(~support, float("-inf")), -1),
                           zero)

    log_r, log_q = log_softmax_on_support(zs), log_softmax_on_support(zt)
    r, q = torch.where(support, log_r.exp(), zero), torch.where(support, log_q.exp(), zero)
    kl_i = (r * (log_r - log_q) if kl == "reverse" else q * (log_q - log_r)).sum(-1)
    ent = -(q * log_q).sum(-1).detach()
    valid = labels != IGNORE_INDEX
    kl_i, ent = torch.where(valid, kl_i, zero), torch.where(valid, ent, zero)
    if weighting == "none":
        wts = torch.ones_like(ent)
    else:
        mean = ent.sum() / valid.sum().clamp(min=1)
        wts = (ent / mean).clamp(0.1, 5.0) if mean > 0 else torch.ones_like(ent)
    wts = torch.where(valid, wts, zero)
    terms = temperature ** 2 * wts * kl_i
    loss = {"mean": terms.sum() / valid.sum().clamp(min=1), "sum": terms.sum(),
            "none": terms}[reduction]
    if reduction == "none":
        (loss * upstream.to(cd)).sum().backward()
    else:
        loss.backward()
    return {"loss": loss.detach(), "kl": kl_i.detach(), "teacher_entropy": ent, "weights": wts,
            "grad_hs": h.grad, "grad_ws": w.grad}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(TOPK_CASES))
def test_top_k_matches_the_full_logits_oracle(name, dtype, weighting, reduction):
    """K < V: the cache holds the K largest teacher logits, and the loss is the oracle's."""
    shape_name, k = TOPK_CASES[name]
    hs, ws, ht, wt, labels, upstream = inputs(shape_name, dtype)
    _, v, _, _, t, kl, _ = SHAPES[shape_name]
    kw = dict(temperature=t, kl=kl, weighting=weighting, reduction=reduction)
    zt = ht.double() @ wt.double().T
    support = torch.zeros(zt.shape, dtype=torch.bool).scatter_(-1, zt.topk(k, -1).indices, True)
    ours, ids = topk_loss(hs, ws, ht, wt, labels, upstream, k, **kw)
    cached = torch.zeros_like(support).scatter_(-1, ids, True)
    assert torch.equal(cached, support), "teacher_topk did not cache the K largest logits"
    truth = topk_oracle(hs, ws, ht, wt, labels, upstream, support, compute_dtype=torch.float64,
                        **kw)
    ref = topk_oracle(hs, ws, ht, wt, labels, upstream, support, **kw)
    assert_kd_accurate(ours, ref, truth, backend="top-K loss",
                       case=f"{name} {dtype} {kl} T={t} {weighting} {reduction}")
