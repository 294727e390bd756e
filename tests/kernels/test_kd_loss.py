"""Public API of the fused KD loss (e3kernels.kd_loss): validation, weighting, reductions,
T^2 scaling, CE mixing, all-ignored batches, backends, nn.Module, and the offline top-K
teacher cache (teacher_topk, fused_linear_kd_loss_topk).

Tolerances: API-level comparisons of the same maths on fp32 inputs use rtol 1e-5 / atol 1e-6
(fp32 summation-order differences only); fp64 checks (gradcheck, reference identities) 1e-10.
The top-K loss follows the project rule of test_fused_kd.py: error vs fp64 truth at most twice
the fp32 reference's own error plus 1e-6 * (1 + scale).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import e3kernels
from e3kernels import (
    FusedLinearKDLoss,
    fused_linear_kd_loss,
    fused_linear_kd_loss_topk,
    kd_token_weights,
    teacher_topk,
)
from e3kernels.ops.fused_kd import LaunchOptions
from e3kernels.ops.fused_kd.topk import GatheredLogitsFunction
from e3kernels.reference import fused_linear_kd_ref, kd_topk_ref, teacher_topk_ref

pytestmark = pytest.mark.filterwarnings("ignore:e3kernels._C has no fused_kd ops")


def inputs(n=23, v=301, ds=31, dt=19, *, seed=0, dtype=torch.float32, lead=None, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    lead = lead or (n,)
    hs = torch.randn(*lead, ds, generator=g, dtype=torch.float64)
    ws = torch.randn(v, ds, generator=g, dtype=torch.float64) * (2 / ds ** 0.5)
    ht = torch.randn(*lead, dt, generator=g, dtype=torch.float64)
    wt = torch.randn(v, dt, generator=g, dtype=torch.float64) * (2 / dt ** 0.5)
    labels = torch.randint(0, v, lead, generator=g)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return hs.to(dtype), ws.to(dtype), ht.to(dtype), wt.to(dtype), labels


def leaf(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------

def _bad_calls():
    hs, ws, ht, wt = torch.randn(5, 8), torch.randn(10, 8), torch.randn(5, 6), torch.randn(10, 6)
    lab = torch.zeros(5, dtype=torch.long)
    f = fused_linear_kd_loss
    return {
        "Ds mismatch": (lambda: f(hs, torch.randn(10, 9), ht, wt), ["(5, 8)", "(10, 9)"]),
        "Dt mismatch": (lambda: f(hs, ws, ht, torch.randn(10, 7)), ["(5, 6)", "(10, 7)"]),
        "token mismatch": (lambda: f(hs, ws, torch.randn(6, 6), wt), ["(5, 8)", "(6, 6)"]),
        "V mismatch": (lambda: f(hs, ws, ht, torch.randn(12, 6)), ["(10, 8)", "(12, 6)"]),
        "vocab_size too big": (lambda: f(hs, ws, ht, torch.randn(12, 6), vocab_size=11),
                               ["(10, 8)", "(12, 6)"]),
        "1-D head": (lambda: f(hs, torch.randn(8), ht, wt), ["(8,)"]),
        "int hs": (lambda: f(hs.long(), ws, ht, wt), ["torch.int64", "(5, 8)"]),
        "int head": (lambda: f(hs, ws.int(), ht, wt), ["torch.int32", "(10, 8)"]),
        "float labels": (lambda: f(hs, ws, ht, wt, lab.float()), ["torch.float32"]),
        "labels shape": (lambda: f(hs, ws, ht, wt, torch.zeros(4, dtype=torch.long)),
                         ["(4,)", "(5, 8)"]),
        "T = 0": (lambda: f(hs, ws, ht, wt, temperature=0.0), ["temperature"]),
        "T < 0": (lambda: f(hs, ws, ht, wt, temperature=-1.0), ["temperature"]),
        "T nan": (lambda: f(hs, ws, ht, wt, temperature=float("nan")), ["temperature"]),
        "kl": (lambda: f(hs, ws, ht, wt, kl="sideways"), ["sideways"]),
        "reduction": (lambda: f(hs, ws, ht, wt, reduction="avg"), ["avg"]),
        "weighting": (lambda: f(hs, ws, ht, wt, weighting="fancy"), ["fancy"]),
        "backend": (lambda: f(hs, ws, ht, wt, backend="gpu"), ["gpu"]),
        "ce without labels": (lambda: f(hs, ws, ht, wt, compute_ce=True), ["labels"]),
        "label out of range": (lambda: f(hs, ws, ht, wt, lab + 10, compute_ce=True), ["[10, 10]"]),
        "fp64 on triton": (lambda: f(hs.double(), ws.double(), ht.double(), wt.double(),
                                     backend="triton"), ["float64"]),
        "module T": (lambda: FusedLinearKDLoss(temperature=0), ["temperature"]),
        "topk k > V": (lambda: teacher_topk(ht, wt, 11), ["11"]),
        "topk k = 0": (lambda: teacher_topk(ht, wt, 0), ["0"]),
        "topk wt shape": (lambda: teacher_topk(ht, ws, 3), ["(5, 6)", "(10, 8)"]),
        "topk ids shape": (lambda: fused_linear_kd_loss_topk(hs, ws, lab[:, None].expand(5, 3),
                                                             torch.zeros(5, 4)), ["(5, 3)", "(5, 4)"]),
        "topk ids range": (lambda: fused_linear_kd_loss_topk(hs, ws, lab[:, None] + 10,
                                                             torch.zeros(5, 1)), ["[0, 10)", "(10, 8)"]),
        "topk float ids": (lambda: fused_linear_kd_loss_topk(hs, ws, torch.zeros(5, 2),
                                                             torch.zeros(5, 2)), ["float32"]),
        "topk T": (lambda: fused_linear_kd_loss_topk(hs, ws, lab[:, None], torch.zeros(5, 1),
                                                     temperature=-2.0), ["temperature"]),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_invalid_input_raises_value_error(case):
    call, fragments = _bad_calls()[case]
    with pytest.raises(ValueError) as exc:
        call()
    for frag in fragments:
        assert frag in str(exc.value), (frag, str(exc.value))


# --------------------------------------------------------------------------------------
# weighting, reduction, T^2, CE
# --------------------------------------------------------------------------------------

def test_weighting_formulas():
    h = torch.tensor([0.0, 0.5, 1.0, 2.0, 9.0, 3.0])
    valid = torch.tensor([True, True, True, True, True, False])
    v = 100
    assert torch.equal(kd_token_weights(h, valid, "none"), valid.float())
    mean = h[:5].mean()
    expected = (h / mean).clamp(0.1, 5.0) * valid
    assert torch.allclose(kd_token_weights(h, valid, "entropy"), expected)
    assert torch.allclose(kd_token_weights(h, valid, "entropy", clip=(0.0, 100.0)),
                          (h / mean) * valid)
    hn = (h / math.log(v)).clamp(max=1.0)  # H <= log V; 9.0 is out of range on purpose
    assert torch.allclose(kd_token_weights(h, valid, "normalized_entropy", vocab_size=v), hn * valid)
    assert torch.allclose(kd_token_weights(h, valid, "confidence", vocab_size=v), (1 - hn) * valid)
    assert torch.allclose(kd_token_weights(h, valid, lambda e, m: e ** 2), h ** 2 * valid)
    # degenerate: mean entropy 0 -> weight 1; nothing valid -> all 0, no NaN
    assert torch.equal(kd_token_weights(torch.zeros(3), None, "entropy"), torch.ones(3))
    w = kd_token_weights(h, torch.zeros(6, dtype=torch.bool), "entropy")
    assert torch.equal(w, torch.zeros(6))


@pytest.mark.parametrize("weighting", ["none", "entropy", "normalized_entropy", "confidence"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_t2_and_ce(weighting, reduction):
    hs, ws, ht, wt, lab = inputs(seed=1)
    t = 2.5
    out = fused_linear_kd_loss(hs, ws, ht, wt, lab, temperature=t, weighting=weighting,
                               reduction=reduction, compute_ce=True, ce_weight=0.3,
                               backend="reference")
    ref = fused_linear_kd_ref(hs, ws, ht, wt, lab, temperature=t, compute_ce=True)
    valid = lab != -100
    w = kd_token_weights(ref.teacher_entropy, valid, weighting, vocab_size=ws.shape[0])
    per = t * t * w * ref.kl + 0.3 * ref.ce
    want = {"mean": per.sum() / valid.sum(), "sum": per.sum(), "none": per}[reduction]
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.weights, w)
    assert int(out.num_valid) == int(valid.sum())
    for field in (out.kl, out.teacher_entropy, out.weights, out.ce):
        assert not field.requires_grad
    # no T^2 and no CE
    out2 = fused_linear_kd_loss(hs, ws, ht, wt, lab, temperature=t, weighting=weighting,
                                reduction=reduction, t2_scale=False, backend="reference")
    per2 = w * ref.kl
    want2 = {"mean": per2.sum() / valid.sum(), "sum": per2.sum(), "none": per2}[reduction]
    torch.testing.assert_close(out2.loss, want2, rtol=1e-5, atol=1e-6)
    assert out2.ce is None


def test_ce_matches_torch_cross_entropy():
    hs, ws, ht, wt, lab = inputs(seed=2)
    out = fused_linear_kd_loss(hs, ws, ht, wt, lab, temperature=3.0, weighting="none",
                               compute_ce=True, ce_weight=1.0, t2_scale=False, backend="reference")
    ce = F.cross_entropy(hs @ ws.T, lab, ignore_index=-100)
    torch.testing.assert_close(out.ce.sum() / out.num_valid, ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("weighting", ["entropy", "none"])
def test_all_ignored_batch_zero_loss_zero_grad(backend, weighting):
    hs, ws, ht, wt, lab = inputs(n=16, v=200, seed=3)
    lab[:] = -100
    h, w = leaf(hs, ws)
    out = fused_linear_kd_loss(h, w, ht, wt, lab, temperature=2.0, weighting=weighting,
                               compute_ce=True, backend=backend)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    assert (out.kl == 0).all() and (out.teacher_entropy == 0).all() and (out.weights == 0).all()
    # an empty batch
    h0, w0 = leaf(hs[:0], ws)
    out0 = fused_linear_kd_loss(h0, w0, ht[:0], wt, lab[:0], backend=backend)
    out0.loss.backward()
    assert out0.loss.item() == 0.0 and out0.kl.shape == (0,)
    assert torch.equal(w0.grad, torch.zeros_like(w0))


# --------------------------------------------------------------------------------------
# backends and module
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_kernel_backends_match_reference_through_api(kl, backend):
    """[B, L, D] inputs, separate vocab sizes, entropy weighting, CE mixing: loss and grads.
    "cpp" must be built (no skip): e3kernels._C.fused_kd_forward / fused_kd_backward."""
    hs, ws, ht, wt, lab = inputs(lead=(2, 9), v=300, seed=4)
    wt = torch.cat([wt, torch.randn(5, wt.shape[1])])  # teacher head with 5 padding rows
    kw = dict(temperature=1.7, kl=kl, weighting="entropy", compute_ce=True, ce_weight=0.5,
              vocab_size=300)
    h1, w1 = leaf(hs, ws)
    ref = fused_linear_kd_loss(h1, w1, ht, wt, lab, backend="reference", **kw)
    ref.loss.backward()
    h2, w2 = leaf(hs, ws)
    tri = fused_linear_kd_loss(h2, w2, ht, wt, lab, backend=backend,
                               launch=LaunchOptions(block_n=16, block_v=128, num_splits=2), **kw)
    tri.loss.backward()
    assert tri.kl.shape == (2, 9) and tri.weights.shape == (2, 9)
    torch.testing.assert_close(tri.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for a, b in ((tri.kl, ref.kl), (tri.teacher_entropy, ref.teacher_entropy), (tri.ce, ref.ce),
                 (h2.grad, h1.grad), (w2.grad, w1.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient_and_shared_head():
    hs, ws, ht, wt, lab = inputs(seed=5, dt=31)
    h, w, t = leaf(hs, ws, ht)
    out = fused_linear_kd_loss(h, w, t, w, lab, backend="reference")  # shared head
    out.loss.backward()
    assert t.grad is None
    h2, w2 = leaf(hs, ws)
    out2 = fused_linear_kd_loss(h2, w2, ht, ws.detach().clone(), lab, backend="reference")
    out2.loss.backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_module_auto_backend_and_fp64_gradcheck():
    hs, ws, ht, wt, lab = inputs(seed=6)
    crit = FusedLinearKDLoss(temperature=2.0, kl="reverse", weighting="confidence")
    assert "temperature=2.0" in repr(crit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = crit(hs, ws, ht, wt, lab)  # CPU "auto": C++ when built, else the reference
    want = fused_linear_kd_loss(hs, ws, ht, wt, lab, 2.0, "reverse", "confidence",
                                backend="reference")
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    # fp64 goes to the reference; its gradient is exact
    h, w = leaf(*(t.double() for t in inputs(n=5, v=11, ds=4, dt=3, seed=7)[:2]))
    _, _, ht64, wt64, lab64 = inputs(n=5, v=11, ds=4, dt=3, seed=7, dtype=torch.float64)
    f = lambda a, b: fused_linear_kd_loss(a, b, ht64, wt64, lab64, temperature=1.3,
                                          compute_ce=True).loss
    assert torch.autograd.gradcheck(f, (h, w))


def test_public_exports():
    for name in ("fused_linear_kd_loss", "FusedLinearKDLoss", "teacher_topk",
                 "fused_linear_kd_loss_topk", "kd_token_weights", "KDLossOutput"):
        assert name in e3kernels.__all__ and hasattr(e3kernels, name)


# --------------------------------------------------------------------------------------
# offline teacher cache
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_topk_matches_reference(dtype):
    _, _, ht, wt, _ = inputs(n=23, v=333, seed=8, dtype=dtype, lead=(23,))
    ids, lp = teacher_topk(ht, wt, 5, temperature=1.5, block_tokens=7, block_vocab=50)
    rids, rlp = teacher_topk_ref(ht, wt, 5, temperature=1.5)
    assert ids.dtype == torch.int64 and ids.shape == (23, 5) and lp.dtype == torch.float32
    assert torch.equal(ids, rids)
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-5)
    # K = V: all ids; log-probs normalized over the full vocab; leading dims kept
    ids_all, lp_all = teacher_topk(ht.reshape(1, 23, -1), wt, 333, block_vocab=64)
    assert ids_all.shape == (1, 23, 333)
    assert torch.equal(ids_all.sort(-1).values[0], torch.arange(333).expand(23, 333))
    torch.testing.assert_close(lp_all.exp().sum(-1), torch.ones(1, 23), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_topk_loss_matches_fp64(kl):
    hs, ws, ht, wt, lab = inputs(n=37, v=1000, ds=63, dt=40, seed=9)
    ids, lp = teacher_topk(ht, wt, 16)
    lp[::3, -2:] = float("-inf")  # padded cache entries: out of the support on both sides
    g = torch.rand(37, generator=torch.Generator().manual_seed(0)) + 0.1

    def run(hs_, ws_, lp_, fn):
        h, w = leaf(hs_, ws_)
        if fn == "ours":
            out = fused_linear_kd_loss_topk(h, w, ids, lp_, lab, temperature=2.0, kl=kl,
                                            reduction="none", weighting="none", t2_scale=False,
                                            max_gather_elems=4000)
            kl_i = out.loss
        else:
            kl_i = kd_topk_ref(h, w, ids, lp_, lab, temperature=2.0, kl=kl).kl
        (kl_i * g.to(kl_i.dtype)).sum().backward()
        return kl_i.detach(), h.grad, w.grad

    truth = run(hs.double(), ws.double(), lp.double(), "ref")
    ref = run(hs, ws, lp, "ref")
    ours = run(hs, ws, lp, "ours")
    for o, r, t in zip(ours, ref, truth, strict=True):
        assert torch.isfinite(o).all()
        err_o, err_r = (o.double() - t).abs().max(), (r.double() - t).abs().max()
        assert err_o <= 2 * err_r + 1e-6 * (1 + t.abs().max()), (err_o, err_r)


def test_topk_with_full_support_equals_fused_loss():
    """K = V: the renormalized top-K KL is the full KL (same loss as fused_linear_kd_loss)."""
    hs, ws, ht, wt, lab = inputs(n=13, v=97, seed=10, dtype=torch.float64)
    ids, lp = teacher_topk(ht, wt, 97)
    for kl in ("forward", "reverse"):
        a = fused_linear_kd_loss_topk(hs, ws, ids, lp, lab, temperature=1.5, kl=kl)
        b = fused_linear_kd_loss(hs, ws, ht, wt, lab, temperature=1.5, kl=kl, backend="reference")
        torch.testing.assert_close(a.kl, b.kl, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-10, atol=1e-10)


def test_gathered_logits_gradcheck():
    g = torch.Generator().manual_seed(11)
    h = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 9, (6, 4), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: GatheredLogitsFunction.apply(a, b, ids, 40), (h, w))
