"""Logit scale and final-logit softcapping in the fused KD loss (Gemma 2/3, Cohere, Granite):

    y = c tanh(s r / c) (softcap c) or s r, per side, of the raw head product r = h w[:V]^T

* the reference against an explicit fp64 HF-style head (F.linear, * s, tanh(. / c) * c), then
  KL / CE in fp64: loss and gradients to 1e-10;
* each backend (C++, Triton under TRITON_INTERPRET=1) through the op and its autograd formula
  against the fp64 reference by the rule of `e3kernels.testing` (max|ours - truth| <=
  2 max|ref - truth| + 1e-6 (1 + max|truth|), ref = the reference at the input dtype), for
  fp32 / bf16 / fp16, ragged shapes, padded heads (Vs != Vt), per-side values and a cap small
  enough that tanh saturates (c = 2 on logits of scale ~5);
* the public losses (weightings, reductions, CE) on every backend against the fp64 reference
  backend: loss rtol 1e-5 (fp32) / 2e-3 (bf16, fp16: the rounded gradients), gradients by the
  same tolerance relative to their max;
* the top-K path (teacher_topk, fused_linear_kd_loss_topk) against its references;
* validation errors and opcheck of the ops with the new arguments.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import e3kernels
from e3kernels import dispatch
from e3kernels.ops.fused_kd import LaunchOptions
from e3kernels.reference import fused_linear_kd_ref, kd_topk_ref, teacher_topk_ref
from e3kernels.testing import (
    assert_kd_accurate,
    assert_masked_outputs_zero,
    kd_case,
    kernel_outputs,
    reference_outputs,
    stats_floor,
    ulp_floor,
)

# (name, logit_scale, softcap); kd_case logits have std ~2, so s = 2.5 gives |s r| up to ~15
TRANSFORMS = [
    ("scale", 1.7, None),
    ("cap-saturating", 2.5, 2.0),
    ("per-side", (0.6, 1.4), (None, 3.0)),
    ("per-side-cap-student", (2.5, 1.0), (2.0, None)),
]
# (kl, compute_ce, temperature)
MODES = [("forward", True, 1.0), ("reverse", True, 1.7), ("forward", False, 0.8)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TRITON_LAUNCH = LaunchOptions(block_n=16, block_v=128, block_d=16)  # several ragged tiles


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _require_cpp():
    ext = dispatch.cpp_extension()
    assert ext is not None, f"e3kernels._C is not built: {dispatch.cpp_import_error()}"


def _bf16_route_floor(dtype: torch.dtype, scale: float) -> float:
    """The C++ bf16 GEMM route rounds dz to bf16 before the gradient GEMMs
    (docs/fused_kd_cpp.md), one bf16 rounding more than the reference: its bf16 gradients get
    2 bf16 ulps of their scale on top of 2 err(ref); fp32 statistics keep the stats floor."""
    return ulp_floor(dtype, scale) if dtype == torch.bfloat16 else stats_floor(dtype, scale)


@pytest.fixture(params=["cpp", "triton"])
def backend(request):
    if request.param == "cpp":
        _require_cpp()
    return request.param


# ======================================================================================
# The reference against an explicit fp64 HF-style head
# ======================================================================================

def _hf_style(h, w, v, s, c):
    logits = F.linear(h, w[:v])
    logits = logits * s
    if c is not None:
        logits = torch.tanh(logits / c) * c
    return logits


@pytest.mark.parametrize("name,scale,cap", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_reference_matches_hf_style_fp64(name, scale, cap, kl):
    case = kd_case(23, 70, 12, 10, torch.float64, seed=_seed(name, kl), vs=75, vt=72,
                   compute_ce=True, ignore_every=5)
    temp = 1.3
    (ss, st), (cs, ct) = (scale if isinstance(scale, tuple) else (scale, scale),
                          cap if isinstance(cap, tuple) else (cap, cap))
    hs1, ws1 = case.hs.clone().requires_grad_(), case.ws.clone().requires_grad_()
    out = fused_linear_kd_ref(hs1, ws1, case.ht, case.wt, case.labels, temperature=temp, kl=kl,
                              vocab_size=case.vocab_size, compute_ce=True, logit_scale=scale,
                              softcap=cap)
    hs2, ws2 = case.hs.clone().requires_grad_(), case.ws.clone().requires_grad_()
    ys = _hf_style(hs2, ws2, case.vocab_size, ss, cs)
    yt = _hf_style(case.ht, case.wt, case.vocab_size, st, ct)
    lps, lpt = F.log_softmax(ys / temp, -1), F.log_softmax(yt / temp, -1)
    if kl == "forward":
        kl_i = (lpt.exp() * (lpt - lps)).sum(-1)
    else:
        kl_i = (lps.exp() * (lps - lpt)).sum(-1)
    valid = case.labels != -100
    ce_i = F.cross_entropy(ys, torch.where(valid, case.labels, 0), reduction="none")
    kl_i, ce_i = torch.where(valid, kl_i, 0.0), torch.where(valid, ce_i, 0.0)
    ent = torch.where(valid, -(lpt.exp() * lpt).sum(-1), 0.0)
    torch.testing.assert_close(out.kl, kl_i.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(out.ce, ce_i.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(out.teacher_entropy, ent, rtol=0, atol=1e-10)
    ((out.kl * case.grad_kl.double()).sum() + (out.ce * case.grad_ce.double()).sum()).backward()
    ((kl_i * case.grad_kl.double()).sum() + (ce_i * case.grad_ce.double()).sum()).backward()
    torch.testing.assert_close(hs1.grad, hs2.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(ws1.grad, ws2.grad, rtol=0, atol=1e-10)
    if cs is not None:  # the cap saturates somewhere: the test exercises the flat part of tanh
        assert (ys.detach().abs() > 0.99 * cs).any()


# ======================================================================================
# Each backend through the op and its autograd formula
# ======================================================================================

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name,scale,cap", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-ce{int(m[1])}-T{m[2]}")
def test_op_matches_reference(backend, dtype, name, scale, cap, mode):
    kl, ce, temp = mode
    case = kd_case(37, 300, 24, 20, dtype, seed=_seed(backend, dtype, name, mode), vs=310,
                   vt=305, temperature=temp, kl=kl, compute_ce=ce, ignore_every=6,
                   name=name).replace(logit_scale=scale, softcap=cap)
    truth = reference_outputs(case, torch.float64)
    ref = reference_outputs(case)
    launch = TRITON_LAUNCH if backend == "triton" else None
    ours = kernel_outputs(case, backend, launch=launch)
    assert ours["grad_hs"].dtype == dtype and ours["grad_ws"].dtype == dtype
    floor = _bf16_route_floor if backend == "cpp" and dtype == torch.bfloat16 else stats_floor
    assert_kd_accurate(ours, ref, truth, backend=backend, case=case, floor=floor)
    assert_masked_outputs_zero(ours, backend=backend, case=case)


def test_cpp_two_chunks_and_shared_head(cpu_isa):
    """More tokens than one C++ chunk (256), the teacher head being the student's, at every ISA
    level of the tile loops (the transform runs in them)."""
    case = kd_case(260, 270, 16, 16, torch.float32, seed=_seed("chunks", cpu_isa), kl="reverse",
                   compute_ce=True, temperature=1.4, ignore_every=9).replace(
        logit_scale=(2.5, 1.2), softcap=(2.0, 4.0))
    ours = kernel_outputs(case.replace(wt=case.ws), "cpp", shared_head=True)
    c2 = case.replace(wt=case.ws)
    assert_kd_accurate(ours, reference_outputs(c2), reference_outputs(c2, torch.float64),
                       backend=f"cpp/{cpu_isa}", case=c2)


def test_cpp_bf16_gemm_routes(bf16_route):
    """bf16 student and teacher on the brgemm route and on the fp32 route."""
    case = kd_case(40, 290, 18, 22, torch.bfloat16, seed=_seed("route", bf16_route), vs=300,
                   compute_ce=True, ignore_every=4).replace(logit_scale=2.5, softcap=2.0)
    ours = kernel_outputs(case, "cpp")
    assert_kd_accurate(ours, reference_outputs(case), reference_outputs(case, torch.float64),
                       backend=f"cpp/bf16-gemm={bf16_route}", case=case,
                       floor=_bf16_route_floor if bf16_route else stats_floor)


# ======================================================================================
# The public losses: weightings, reductions, CE, per-side values, the Module
# ======================================================================================

LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}  # ~2 ulp (bf16, fp16)


def _loss_and_grads(inputs, dtype, **kw):
    hs, ws, ht, wt, lab = (t.to(dtype) if t.dtype.is_floating_point else t for t in inputs)
    hs, ws = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    out = e3kernels.fused_linear_kd_loss(hs, ws, ht, wt, lab, **kw)
    (out.loss.sum()).backward()
    return out, hs.grad.double(), ws.grad.double()


def _close(ours, want, tol, what):
    err = (ours.double() - want.double()).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol} x {scale:.3e}"


@pytest.mark.parametrize("be", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("weighting,reduction", [("entropy", "mean"), ("none", "sum"),
                                                 ("confidence", "none")])
def test_loss_matches_fp64_reference(be, dtype, weighting, reduction):
    if be == "cpp":
        _require_cpp()
    g = torch.Generator().manual_seed(_seed(be, dtype, weighting))
    n, v = 29, 200
    inputs = (torch.randn(3, n, 16, generator=g), torch.randn(v + 5, 16, generator=g) * 0.5,
              torch.randn(3, n, 12, generator=g), torch.randn(v, 12, generator=g) * 0.6,
              torch.randint(0, v, (3, n), generator=g))
    inputs[4][0, ::3] = -100
    kw = dict(temperature=1.5, kl="reverse", weighting=weighting, reduction=reduction,
              vocab_size=v, compute_ce=True, ce_weight=0.7, logit_scale=(2.0, 1.3),
              softcap=(2.0, 5.0))
    ours = _loss_and_grads(inputs, dtype, backend=be, **kw)
    rounded = [t.to(dtype).double() if t.dtype.is_floating_point else t for t in inputs]
    want = _loss_and_grads(rounded, torch.float64, backend="reference", **kw)
    tol = LOSS_TOL[dtype]
    for o, w, what in zip(ours[1:], want[1:], ("grad hs", "grad ws")):
        _close(o, w, tol, f"{be} {dtype} {what}")
    _close(ours[0].loss.detach(), want[0].loss.detach(), tol, f"{be} {dtype} loss")
    _close(ours[0].ce, want[0].ce, tol, f"{be} {dtype} ce")


def test_defaults_are_the_identity():
    """Omitted, scalar and per-side identity arguments give the same bits (each backend)."""
    _require_cpp()
    g = torch.Generator().manual_seed(4)
    hs, ws = torch.randn(11, 8, generator=g), torch.randn(40, 8, generator=g)
    ht, wt = torch.randn(11, 6, generator=g), torch.randn(40, 6, generator=g)
    lab = torch.randint(0, 40, (11,), generator=g)
    for be in ("cpp", "triton", "reference"):
        base = e3kernels.fused_linear_kd_loss(hs, ws, ht, wt, lab, compute_ce=True, backend=be)
        for kw in (dict(logit_scale=1.0, softcap=None), dict(logit_scale=(1, 1.0),
                                                               softcap=(None, None))):
            out = e3kernels.fused_linear_kd_loss(hs, ws, ht, wt, lab, compute_ce=True,
                                                 backend=be, **kw)
            assert torch.equal(out.loss, base.loss) and torch.equal(out.kl, base.kl), (be, kw)
        capped = e3kernels.fused_linear_kd_loss(hs, ws, ht, wt, lab, compute_ce=True,
                                                backend=be, softcap=1.5)
        assert not torch.equal(capped.loss, base.loss)


def test_module_passes_the_transform():
    _require_cpp()
    g = torch.Generator().manual_seed(6)
    hs, ws = torch.randn(9, 8, generator=g), torch.randn(30, 8, generator=g)
    ht, wt = torch.randn(9, 6, generator=g), torch.randn(30, 6, generator=g)
    crit = e3kernels.FusedLinearKDLoss(1.2, logit_scale=(1.5, 0.8), softcap=(3.0, None))
    want = e3kernels.fused_linear_kd_loss(hs, ws, ht, wt, None, 1.2, logit_scale=(1.5, 0.8),
                                          softcap=(3.0, None))
    assert torch.equal(crit(hs, ws, ht, wt).loss, want.loss)
    assert "softcap=(3.0, None)" in repr(crit)


# ======================================================================================
# Top-K path
# ======================================================================================

@pytest.mark.parametrize("scale,cap", [(1.7, None), (2.5, 2.0), ((0.7, 3.0), (1.5, None))])
def test_teacher_topk_transform(scale, cap):
    g = torch.Generator().manual_seed(_seed("tk", scale, cap))
    ht, wt = torch.randn(2, 21, 12, generator=g), torch.randn(90, 12, generator=g) * 0.8
    ids, lp = e3kernels.teacher_topk(ht, wt, 7, temperature=1.3, vocab_size=85, block_tokens=8,
                                     block_vocab=32, logit_scale=scale, softcap=cap)
    rid, rlp = teacher_topk_ref(ht.reshape(-1, 12).double(), wt.double(), 85, temperature=1.3,
                                vocab_size=85, logit_scale=scale, softcap=cap)
    exact = torch.empty_like(rlp).scatter_(1, rid, rlp)  # [N, V] fp64 log-probs
    ids, lp = ids.reshape(-1, 7), lp.reshape(-1, 7).double()
    # near-ties may swap between fp32 and fp64: check the values at our ids and the k-th value
    torch.testing.assert_close(lp, exact.gather(1, ids), rtol=0, atol=1e-5)
    assert (lp[:, 6] >= rlp[:, 6] - 1e-5).all() and (lp[:, :-1] >= lp[:, 1:]).all()
    base = e3kernels.teacher_topk(ht, wt, 7, temperature=1.3, vocab_size=85)[1].reshape(-1, 7)
    assert not torch.allclose(lp, base.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("scale,cap", [(1.7, None), (2.5, 2.0), ((2.5, 9.0), (2.0, 9.0))])
def test_topk_loss_student_transform(dtype, scale, cap):
    g = torch.Generator().manual_seed(_seed("tkl", dtype, scale, cap))
    n, v, d, k = 31, 120, 16, 9
    hs, ws = torch.randn(n, d, generator=g).to(dtype), (torch.randn(v, d, generator=g) * 0.6).to(dtype)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k, generator=g), -1)
    lab = torch.randint(0, v, (n,), generator=g)
    lab[::4] = -100
    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    out = e3kernels.fused_linear_kd_loss_topk(h1, w1, ids, lp, lab, 1.4, "reverse", "none",
                                              "sum", logit_scale=scale, softcap=cap)
    out.loss.backward()
    h2, w2 = hs.double().requires_grad_(), ws.double().requires_grad_()
    ref = kd_topk_ref(h2, w2, ids, lp.double(), lab, temperature=1.4, kl="reverse",
                      logit_scale=scale, softcap=cap)
    (ref.kl.sum() * 1.4 ** 2).backward()
    tol = LOSS_TOL[dtype]
    _close(out.kl, ref.kl, tol, "topk kl")
    _close(h1.grad, h2.grad, tol * 4 if dtype != torch.float32 else tol, "topk grad hs")
    _close(w1.grad, w2.grad, tol * 4 if dtype != torch.float32 else tol, "topk grad ws")


# ======================================================================================
# Validation and op registration
# ======================================================================================

BAD_SCALES = [0.0, -1.0, float("nan"), float("inf"), True, "2", (1.0, 2.0, 3.0), (1.0, 0.0)]
BAD_CAPS = [0.0, -2.0, float("nan"), float("inf"), False, "30", (None,), (30.0, -1.0)]


def _small():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(4, 8, generator=g), torch.randn(20, 8, generator=g),
            torch.randn(4, 6, generator=g), torch.randn(20, 6, generator=g))


@pytest.mark.parametrize("bad", BAD_SCALES, ids=repr)
def test_bad_logit_scale(bad):
    hs, ws, ht, wt = _small()
    ids, lp = torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3)
    calls = [
        lambda: e3kernels.fused_linear_kd_loss(hs, ws, ht, wt, logit_scale=bad),
        lambda: e3kernels.FusedLinearKDLoss(logit_scale=bad),
        lambda: e3kernels.teacher_topk(ht, wt, 3, logit_scale=bad),
        lambda: e3kernels.fused_linear_kd_loss_topk(hs, ws, ids, lp, logit_scale=bad),
        lambda: fused_linear_kd_ref(hs, ws, ht, wt, logit_scale=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="logit_scale"):
            call()


@pytest.mark.parametrize("bad", BAD_CAPS, ids=repr)
def test_bad_softcap(bad):
    hs, ws, ht, wt = _small()
    ids, lp = torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3)
    calls = [
        lambda: e3kernels.fused_linear_kd_loss(hs, ws, ht, wt, softcap=bad),
        lambda: e3kernels.FusedLinearKDLoss(softcap=bad),
        lambda: e3kernels.teacher_topk(ht, wt, 3, softcap=bad),
        lambda: e3kernels.fused_linear_kd_loss_topk(hs, ws, ids, lp, softcap=bad),
        lambda: teacher_topk_ref(ht, wt, 3, softcap=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="softcap"):
            call()


@pytest.mark.parametrize("arg,value", [("student_scale", -1.0), ("teacher_scale", float("nan")),
                                       ("student_softcap", 0.0), ("teacher_softcap", -3.0)])
def test_cpp_op_rejects_bad_transform(arg, value):
    _require_cpp()
    hs, ws, ht, wt = _small()
    with pytest.raises(ValueError, match=arg):
        torch.ops.e3kernels.fused_kd_forward(hs, ws, ht, wt, None, 1.0, False, -100, 20, False,
                                             **{arg: value})


@pytest.mark.parametrize("be", ["cpp", "triton"])
@pytest.mark.parametrize("compute_ce", [False, True])
def test_opcheck_with_transform(be, compute_ce):
    if be == "cpp":
        _require_cpp()
    sfx = "_triton" if be == "triton" else ""
    g = torch.Generator().manual_seed(3)
    hs, ws = torch.randn(9, 20, generator=g), torch.randn(50, 20, generator=g) * 0.3
    ht, wt = torch.randn(9, 12, generator=g), torch.randn(50, 12, generator=g) * 0.3
    lab = torch.randint(0, 45, (9,), generator=g)
    lab[2] = -100
    xf = dict(student_scale=2.0, student_softcap=1.5, teacher_scale=0.8, teacher_softcap=None)
    fwd = getattr(torch.ops.e3kernels, f"fused_kd_forward{sfx}").default
    bwd = getattr(torch.ops.e3kernels, f"fused_kd_backward{sfx}").default
    fwd_args = (hs.requires_grad_(), ws.requires_grad_(), ht, wt, lab, 0.5, True, -100, 45,
                compute_ce)
    torch.library.opcheck(fwd, fwd_args, xf)
    out = fwd(*fwd_args, **xf)
    gk = torch.randn(9, generator=g)
    bwd_args = (gk, gk.clone() if compute_ce else None, hs.detach(), ws.detach(), ht, wt, lab,
                out[2].detach(), out[3].detach(), out[0].detach(),
                out[5].detach() if compute_ce else None, 0.5, True, -100, 45, True)
    torch.library.opcheck(bwd, bwd_args, xf)
