"""Fused linear KD kernels (Triton under TRITON_INTERPRET=1, C++ e3kernels._C) against the
fp64 reference `fused_linear_kd_ref`, through the backend-agnostic autograd.Function.

Accuracy rule (DESIGN 5): on fresh random inputs (never zeros), for every per-token output and
for the gradients wrt hs and Ws,
    max|ours - truth| <= 2 * max|ref - truth| + FLOOR * (1 + max|truth|)
where truth = reference in fp64 on the same (rounded) inputs, ref = the reference run at the
input dtype (fp32 compute for fp16/bf16 inputs; gradients rounded to the input dtype), and
FLOOR = 1e-6 for every dtype: the statistics are fp32 on every backend, so the floor only
absorbs fp32 rounding where the reference happens to be exact (e.g. a single token).
Triton runs in the interpreter: few programs with big blocks (its cost is per program x op).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from e3kernels import dispatch
from e3kernels.ops.fused_kd import (
    FusedKDConfig,
    FusedLinearKDFunction,
    LaunchOptions,
    fused_kd_backward_triton,
    fused_kd_forward_triton,
)
from e3kernels.reference import fused_linear_kd_ref

FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}
NAMES = ("kl", "teacher_entropy", "student_lse", "teacher_lse", "ce", "grad_hs", "grad_ws")


def make_case(n, v, ds, dt, dtype, *, seed, vs=None, vt=None, ignore_every=0, all_ignored=False,
              neg_inf_rows=None):
    """Fresh random inputs: logits of std ~2; labels with some ignored tokens; optional padding
    rows (vs, vt > v) filled with huge values that would break any result that used them;
    optional teacher rows whose logits overflow to -inf in fp32 (finite in fp64)."""
    g = torch.Generator().manual_seed(seed)
    vs, vt = vs or v, vt or v
    hs = torch.randn(n, ds, generator=g)
    ws = torch.randn(vs, ds, generator=g) * (2.0 / ds ** 0.5)
    ht = torch.randn(n, dt, generator=g)
    wt = torch.randn(vt, dt, generator=g) * (2.0 / dt ** 0.5)
    ws[v:] = 1e4
    wt[v:] = -1e4
    if neg_inf_rows is not None:
        ht[:, 0] = 1.0  # a constant feature, so these rows give a huge negative logit
        wt[neg_inf_rows] = 0.0
        wt[neg_inf_rows, 0] = -3e38
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    if all_ignored:
        labels[:] = -100
    g_kl = torch.rand(n, generator=g) + 0.1
    g_ce = torch.rand(n, generator=g) + 0.1
    cast = lambda t: t.to(dtype)
    return cast(hs), cast(ws), cast(ht), cast(wt), labels, g_kl, g_ce


def reference_run(hs, ws, ht, wt, labels, g_kl, g_ce, *, temperature, kl, vocab_size,
                  compute_ce, cd=None, need_ws=True):
    """Reference outputs + grads of sum(g_kl kl) + sum(g_ce ce) wrt hs and ws (cd=fp64: truth)."""
    conv = (lambda t: t.to(cd)) if cd is not None else (lambda t: t)
    h = conv(hs.detach()).requires_grad_()
    w = conv(ws.detach()).requires_grad_(need_ws)
    out = fused_linear_kd_ref(h, w, conv(ht), conv(wt), labels, temperature=temperature, kl=kl,
                              vocab_size=vocab_size, compute_ce=compute_ce)
    loss = (out.kl * g_kl.to(out.kl.dtype)).sum()
    if compute_ce:
        loss = loss + (out.ce * g_ce.to(out.kl.dtype)).sum()
    loss.backward()
    return {"kl": out.kl, "teacher_entropy": out.teacher_entropy, "student_lse": out.student_lse,
            "teacher_lse": out.teacher_lse, "ce": out.ce, "grad_hs": h.grad,
            "grad_ws": w.grad if need_ws else None}


def kernel_run(backend, hs, ws, ht, wt, labels, g_kl, g_ce, *, temperature, kl, vocab_size,
               compute_ce, need_ws=True, launch=None, shared_head=False):
    h = hs.detach().clone().requires_grad_()
    w = ws.detach().clone().requires_grad_(need_ws)
    wt_ = w if shared_head else wt
    cfg = FusedKDConfig(inv_temperature=1.0 / temperature, reverse=kl == "reverse",
                        ignore_index=-100, vocab_size=vocab_size, compute_ce=compute_ce,
                        backend=backend, launch=launch or LaunchOptions())
    kl_i, ent, lse_s, lse_t, ce, lse1 = FusedLinearKDFunction.apply(h, w, ht, wt_, labels, cfg)
    loss = (kl_i * g_kl).sum()
    if compute_ce:
        loss = loss + (ce * g_ce).sum()
    loss.backward()
    assert kl_i.dtype == torch.float32 and kl_i.shape == (hs.shape[0],)
    assert h.grad.dtype == hs.dtype
    if need_ws:
        assert w.grad.dtype == ws.dtype and w.grad.shape == ws.shape
    else:
        assert w.grad is None
    return {"kl": kl_i, "teacher_entropy": ent, "student_lse": lse_s, "teacher_lse": lse_t,
            "ce": ce if compute_ce else None, "grad_hs": h.grad,
            "grad_ws": w.grad if need_ws else None}


def assert_close_to_truth(ours, ref, truth, dtype, skip=()):
    for name in NAMES:
        if truth.get(name) is None or name in skip:
            continue
        t = truth[name].double()
        o, r = ours[name].double(), ref[name].double()
        assert o.shape == t.shape, (name, o.shape, t.shape)
        assert torch.isfinite(o).all(), f"{name}: non-finite values {o}"
        err_o = (o - t).abs().max().item() if t.numel() else 0.0
        err_r = (r - t).abs().max().item() if t.numel() else 0.0
        scale = t.abs().max().item() if t.numel() else 0.0
        bound = 2 * err_r + FLOOR[dtype] * (1 + scale)
        assert err_o <= bound, f"{name}: error {err_o:.3e} > {bound:.3e} (reference {err_r:.3e})"


def check_case(backend, case, *, temperature, kl, vocab_size, compute_ce, dtype, need_ws=True,
               launch=None):
    kw = dict(temperature=temperature, kl=kl, vocab_size=vocab_size, compute_ce=compute_ce)
    truth = reference_run(*case, cd=torch.float64, need_ws=need_ws, **kw)
    ref = reference_run(*case, need_ws=need_ws, **kw)
    ours = kernel_run(backend, *case, need_ws=need_ws, launch=launch, **kw)
    assert_close_to_truth(ours, ref, truth, dtype)
    if need_ws and ws_rows(case) > vocab_size:
        assert (ours["grad_ws"][vocab_size:] == 0).all(), "padding rows of Ws got a gradient"
    return ours


def ws_rows(case):
    return case[1].shape[0]


# (N, V, Ds, Dt, dtype, kl, T, compute_ce, ignore_every, launch) -- each runs fwd + bwd
TRITON_CASES = {
    "N1-V1000-fp32-fwd": (1, 1000, 63, 63, torch.float32, "forward", 1.0, False, 0, None),
    "N37-V4097-fp32-rev-ce": (37, 4097, 63, 63, torch.float32, "reverse", 2.0, True, 5, None),
    "N300-V4097-Ds63-Dt40-fp32": (300, 4097, 63, 40, torch.float32, "forward", 0.7, True, 7, None),
    "N37-V1000-bf16-ce": (37, 1000, 63, 63, torch.bfloat16, "forward", 1.5, True, 4, None),
    "N37-V1000-fp16-rev": (37, 1000, 63, 33, torch.float16, "reverse", 1.0, False, 3, None),
    "N37-V49152-fp32": (37, 49152, 63, 63, torch.float32, "forward", 1.3, False, 6,
                        LaunchOptions(block_v=2048)),
    # several token blocks and vocab splits: d hs / d Ws atomics, split merge, 2 D-iterations
    "multiblock-rev-ce": (37, 1000, 63, 47, torch.float32, "reverse", 0.8, True, 5,
                          LaunchOptions(block_n=16, block_v=128, block_d=32, num_splits=3)),
    "multiblock-bf16": (37, 1000, 63, 63, torch.bfloat16, "forward", 1.0, False, 5,
                        LaunchOptions(block_n=16, block_v=256, block_d=32, num_splits=2)),
}


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_matches_fp64(name):
    n, v, ds, dt, dtype, kl, t, ce, ign, launch = TRITON_CASES[name]
    case = make_case(n, v, ds, dt, dtype, seed=zlib.crc32(name.encode()), ignore_every=ign)
    check_case("triton", case, temperature=t, kl=kl, vocab_size=v, compute_ce=ce, dtype=dtype,
               launch=launch or LaunchOptions())


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_triton_vocab_padding(kl):
    """Vs != Vt with vocab_size: head rows >= V (huge values) are never read; their grad is 0."""
    case = make_case(37, 1000, 63, 63, torch.float32, seed=11, vs=1007, vt=1003, ignore_every=5)
    check_case("triton", case, temperature=1.2, kl=kl, vocab_size=1000, compute_ce=True,
               dtype=torch.float32, launch=LaunchOptions(block_v=256, num_splits=2))


def test_triton_neg_inf_teacher_logits():
    """Teacher logits that overflow to -inf in fp32 (a whole vocab split of them, plus some
    scattered rows): exp(-inf) = 0 and 0 log 0 = 0 in the online statistics and the backward."""
    rows = torch.cat([torch.arange(512, 1000), torch.arange(0, 500, 7)])
    case = make_case(37, 1000, 63, 63, torch.float32, seed=12, ignore_every=6, neg_inf_rows=rows)
    with torch.no_grad():
        zt = case[2] @ case[3].T / 0.5
    assert torch.isinf(zt).any(), "the test must produce -inf teacher logits in fp32"
    ours = check_case("triton", case, temperature=0.5, kl="forward", vocab_size=1000,
                      compute_ce=True, dtype=torch.float32,
                      launch=LaunchOptions(block_n=32, block_v=128, num_splits=2))
    assert all(torch.isfinite(t).all() for t in ours.values() if t is not None)


def test_triton_all_ignored():
    case = make_case(37, 1000, 63, 63, torch.float32, seed=13, all_ignored=True)
    ours = kernel_run("triton", *case, temperature=2.0, kl="reverse", vocab_size=1000,
                      compute_ce=True)
    for name in ("kl", "teacher_entropy", "ce", "grad_hs", "grad_ws"):
        assert (ours[name] == 0).all(), name
    assert torch.isfinite(ours["student_lse"]).all() and torch.isfinite(ours["teacher_lse"]).all()


def test_triton_frozen_and_shared_head():
    """Frozen head: no d Ws (need_grad_ws False), d hs unchanged. Shared head (ws is wt): the
    teacher side gives no gradient, so d Ws equals the separate-head result."""
    case = make_case(37, 1000, 63, 63, torch.float32, seed=14, ignore_every=5)
    hs, ws, ht, _, labels, g_kl, g_ce = case
    kw = dict(temperature=1.0, kl="forward", vocab_size=1000, compute_ce=False)
    frozen = check_case("triton", case, need_ws=False, dtype=torch.float32, **kw)
    shared_case = (hs, ws, ht, ws, labels, g_kl, g_ce)
    truth = reference_run(*shared_case, cd=torch.float64, **kw)  # teacher = detached copy
    ref = reference_run(*shared_case, **kw)
    shared = kernel_run("triton", *shared_case, shared_head=True, **kw)
    assert_close_to_truth(shared, ref, truth, torch.float32)
    assert frozen["grad_hs"].shape == hs.shape


def test_triton_launchers_poisoned_outputs_written_and_empty_contract():
    """Launcher contract: ce / student_lse_t1 empty without compute_ce, grad_ws empty without
    need_grad_ws, N = 0 works; every output finite (statistics buffers start as NaN)."""
    hs, ws, ht, wt, labels, g_kl, _ = make_case(20, 300, 31, 17, torch.float32, seed=15)
    outs = fused_kd_forward_triton(hs, ws, ht, wt, torch.empty(0, dtype=torch.int64), 1.0, False,
                                   -100, 300, False, LaunchOptions(block_n=16, block_v=64,
                                                                   num_splits=3))
    assert [o.shape for o in outs] == [(20,)] * 4 + [(0,), (0,)]
    assert all(torch.isfinite(o).all() for o in outs)
    dhs, dws = fused_kd_backward_triton(g_kl, torch.empty(0), hs, ws, ht, wt,
                                        torch.empty(0, dtype=torch.int64), outs[2], outs[3],
                                        outs[0], torch.empty(0), 1.0, False, -100, 300, False)
    assert dhs.shape == hs.shape and dws.numel() == 0 and torch.isfinite(dhs).all()
    e = torch.empty(0, 31)
    outs0 = fused_kd_forward_triton(e, ws, torch.empty(0, 17), wt, torch.empty(0), 1.0, False,
                                    -100, 300, False)
    assert [o.numel() for o in outs0] == [0] * 6


# --------------------------------------------------------------------------------------
# C++ backend (e3kernels._C.fused_kd_forward / fused_kd_backward): must exist, no skipping
# --------------------------------------------------------------------------------------

def _require_cpp():
    ext = dispatch.cpp_extension()
    assert ext is not None, f"e3kernels._C is not built: {dispatch.cpp_import_error()}"
    missing = [f for f in ("fused_kd_forward", "fused_kd_backward") if not hasattr(ext, f)]
    assert not missing, f"e3kernels._C lacks {missing}: rebuild (`pip install --no-build-isolation -e .`)"


CPP_CASES = {
    "N1-V1000-fp32": (1, 1000, 63, 63, torch.float32, "forward", 1.0, False, 0, {}),
    "N37-V4097-rev-ce": (37, 4097, 63, 63, torch.float32, "reverse", 2.0, True, 5, {}),
    "N300-V4097-Ds63-Dt40": (300, 4097, 63, 40, torch.float32, "forward", 0.7, True, 7, {}),
    "N37-V1000-bf16": (37, 1000, 63, 63, torch.bfloat16, "forward", 1.5, True, 4, {}),
    "padding": (37, 1000, 63, 63, torch.float32, "forward", 1.2, True, 5, dict(vs=1007, vt=1003)),
    "neg-inf": (37, 1000, 63, 63, torch.float32, "forward", 0.5, True, 6,
                dict(neg_inf_rows=torch.cat([torch.arange(512, 1000), torch.arange(0, 500, 7)]))),
}


@pytest.mark.parametrize("name", list(CPP_CASES))
def test_cpp_matches_fp64(name):
    _require_cpp()
    n, v, ds, dt, dtype, kl, t, ce, ign, extra = CPP_CASES[name]
    case = make_case(n, v, ds, dt, dtype, seed=zlib.crc32(name.encode()), ignore_every=ign, **extra)
    check_case("cpp", case, temperature=t, kl=kl, vocab_size=v, compute_ce=ce, dtype=dtype)


def test_cpp_all_ignored_and_frozen_head():
    _require_cpp()
    case = make_case(37, 1000, 63, 63, torch.float32, seed=21, all_ignored=True)
    ours = kernel_run("cpp", *case, temperature=2.0, kl="reverse", vocab_size=1000,
                      compute_ce=True)
    for name in ("kl", "teacher_entropy", "ce", "grad_hs", "grad_ws"):
        assert (ours[name] == 0).all(), name
    case = make_case(37, 1000, 63, 63, torch.float32, seed=22, ignore_every=4)
    check_case("cpp", case, temperature=1.0, kl="forward", vocab_size=1000, compute_ce=False,
               dtype=torch.float32, need_ws=False)


def test_cuda_autotune_launch_path_plumbing(monkeypatch):
    """The CUDA launch path (autotuned kernels, grid lambda, vocab splits with atomics, zeroing
    of d hs / d Ws between autotuner trials) run here under the interpreter with tiny configs
    and a fake benchmark: it must agree with the explicit-block launch."""
    import e3kernels.ops.fused_kd as fk

    tiny = fk._configs([(16, 64, 32, 4, 1), (32, 64, 32, 4, 1)])
    for tuned in (fk._fwd_tuned, fk._bwd_tuned):
        monkeypatch.setattr(tuned, "configs", tiny)
        monkeypatch.setattr(tuned, "cache", {})
        monkeypatch.setattr(tuned, "_do_bench", lambda call, quantiles: [call() or 1.0] * 3)
    hs, ws, ht, wt, labels, g_kl, g_ce = make_case(40, 300, 40, 24, torch.float32, seed=31,
                                                   ignore_every=6)
    args = (hs, ws, ht, wt, labels, 0.5, True, -100, 300, True)
    monkeypatch.setattr(fk, "_use_tuned", lambda dev, opts: True)
    monkeypatch.setattr(fk, "_num_splits", lambda n, v, dev, opts, bn: 2)
    outs = fk.fused_kd_forward_triton(*args)
    grads = fk.fused_kd_backward_triton(g_kl, g_ce, hs, ws, ht, wt, labels, outs[2], outs[3],
                                        outs[0], outs[5], 0.5, True, -100, 300, True)
    monkeypatch.undo()
    ref_outs = fk.fused_kd_forward_triton(*args)
    ref_grads = fk.fused_kd_backward_triton(g_kl, g_ce, hs, ws, ht, wt, labels, ref_outs[2],
                                            ref_outs[3], ref_outs[0], ref_outs[5], 0.5, True,
                                            -100, 300, True)
    for a, b in zip(outs + grads, ref_outs + ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
