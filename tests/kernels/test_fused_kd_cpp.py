"""C++ CPU fused linear KD kernel (e3kernels._C.fused_kd_forward / fused_kd_backward).

Ground truth is `e3kernels.reference.fused_linear_kd_ref` on fp64 copies of the inputs (autograd
for the gradients). A case passes when, for every output,

    max|ours - truth| <= 2 * max|ref_at_input_dtype - truth| + floor

where `ref_at_input_dtype` is the same reference run on the original inputs (fp32 compute for
fp32 / bf16 / fp16 inputs, autograd gradients in the input dtype) and
floor = 2 ulp of the output dtype at the output's scale (fp32: 2^-22 * max(1, max|truth|);
bf16 / fp16 outputs: 2^-7 / 2^-10 times the same scale), which covers rounding the final fp32
value to the output dtype. Inputs are fresh random values (never zeros); all sizes are odd or
not multiples of the kernel's tiles (256 tokens x 256 vocab rows).

The module must FAIL (not skip) when the extension lacks the ops.
"""

from __future__ import annotations

import math

import pytest
import torch

from e3kernels.dispatch import cpp_extension, cpp_import_error
from e3kernels.reference import fused_linear_kd_ref

IGNORE = -100


@pytest.fixture(scope="module")
def C():
    ext = cpp_extension()
    assert ext is not None, f"e3kernels._C is not built: {cpp_import_error()}"
    for name in ("fused_kd_forward", "fused_kd_backward"):
        assert hasattr(ext, name), f"e3kernels._C lacks {name}: rebuild with tools/build_cpp.sh"
    return ext


def _inputs(N, Vs, Vt, Ds, Dt, dtype, seed, ignore_frac=0.25, labels=True, V=None):
    g = torch.Generator().manual_seed(seed)
    V = V or min(Vs, Vt)
    # Logit scale ~3 so that the softmaxes are neither flat nor one-hot.
    hs = torch.randn(N, Ds, generator=g)
    ws = torch.randn(Vs, Ds, generator=g) * (3.0 / math.sqrt(Ds))
    ht = torch.randn(N, Dt, generator=g) + 0.3
    wt = torch.randn(Vt, Dt, generator=g) * (3.0 / math.sqrt(Dt))
    lab = None
    if labels:
        lab = torch.randint(0, V, (N,), generator=g)
        lab[torch.rand(N, generator=g) < ignore_frac] = IGNORE
    cast = lambda x: x.to(dtype)
    return cast(hs), cast(ws), cast(ht), cast(wt), lab


def _ref_outputs(hs, ws, ht, wt, lab, *, T, reverse, V, ce, gkl, gce, dtype):
    """Reference forward outputs and gradients (hs, ws) with all tensors cast to `dtype`."""
    hs_ = hs.detach().to(dtype).requires_grad_()
    ws_ = ws.detach().to(dtype).requires_grad_()
    out = fused_linear_kd_ref(hs_, ws_, ht.to(dtype), wt.to(dtype), lab, temperature=T,
                              kl="reverse" if reverse else "forward", ignore_index=IGNORE,
                              vocab_size=V, compute_ce=ce)
    cd = out.kl.dtype
    loss = (out.kl * gkl.to(cd)).sum()
    if ce:
        loss = loss + (out.ce * gce.to(cd)).sum()
    loss.backward()
    zs1 = hs_.detach().to(cd) @ ws_.detach()[:V].to(cd).T
    fwd = {"kl": out.kl, "teacher_entropy": out.teacher_entropy, "student_lse": out.student_lse,
           "teacher_lse": out.teacher_lse}
    if ce:
        fwd["ce"] = out.ce
        fwd["student_lse_t1"] = torch.logsumexp(zs1, dim=-1)
    return {k: v.detach() for k, v in fwd.items()}, hs_.grad, ws_.grad


_ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _check(name, ours, ref_lp, truth):
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    ours_d, ref_d, truth_d = ours.double(), ref_lp.double(), truth.double()
    assert torch.isfinite(ours_d).all(), f"{name}: non-finite values"
    err = (ours_d - truth_d).abs().max().item() if truth.numel() else 0.0
    err_ref = (ref_d - truth_d).abs().max().item() if truth.numel() else 0.0
    scale = max(1.0, truth_d.abs().max().item() if truth.numel() else 1.0)
    floor = 2 * _ULP[ours.dtype] * scale
    assert err <= 2 * err_ref + floor, (
        f"{name}: max err {err:.3e} > 2 x reference-at-input-dtype err {err_ref:.3e} "
        f"+ floor {floor:.1e} (scale {scale:.3g})")


def _run_case(C, *, N, Vs, Vt, Ds, Dt, V=None, T=1.0, reverse=False, ce=False, dtype=torch.float32,
              labels=True, ignore_frac=0.25, need_grad_ws=True, seed=0, inputs=None):
    V = V or min(Vs, Vt)
    hs, ws, ht, wt, lab = inputs or _inputs(N, Vs, Vt, Ds, Dt, dtype, seed, ignore_frac, labels, V)
    g = torch.Generator().manual_seed(seed + 1)
    gkl = torch.rand(N, generator=g) + 0.5
    gce = torch.randn(N, generator=g) if ce else torch.empty(0)
    lab_arg = lab if lab is not None else torch.empty(0, dtype=torch.long)

    out = C.fused_kd_forward(hs, ws, ht, wt, lab_arg, 1.0 / T, reverse, IGNORE, V, ce)
    kl, ent, lse_s, lse_t, ce_o, lse1 = out
    for t in (kl, ent, lse_s, lse_t):
        assert t.dtype == torch.float32 and t.shape == (N,)
    if ce:
        assert ce_o.shape == (N,) and lse1.shape == (N,)
    else:
        assert ce_o.numel() == 0 and lse1.numel() == 0
    grads = C.fused_kd_backward(gkl, gce, hs, ws, ht, wt, lab_arg, lse_s, lse_t, kl, lse1, 1.0 / T,
                                reverse, IGNORE, V, need_grad_ws)
    g_hs, g_ws = grads
    assert g_hs.dtype == hs.dtype and g_hs.shape == hs.shape
    if need_grad_ws:
        assert g_ws.dtype == torch.float32 and g_ws.shape == ws.shape
        assert (g_ws[V:] == 0).all(), "padded head rows must get zero gradient"
    else:
        assert g_ws.numel() == 0

    kw = dict(T=T, reverse=reverse, V=V, ce=ce, gkl=gkl, gce=gce)
    truth, th, tw = _ref_outputs(hs, ws, ht, wt, lab, dtype=torch.float64, **kw)
    ref, rh, rw = _ref_outputs(hs, ws, ht, wt, lab, dtype=hs.dtype, **kw)
    ours = {"kl": kl, "teacher_entropy": ent, "student_lse": lse_s, "teacher_lse": lse_t}
    if ce:
        ours.update(ce=ce_o, student_lse_t1=lse1)
    for k in truth:
        _check(k, ours[k], ref[k], truth[k])
    _check("grad_hs", g_hs, rh, th)
    if need_grad_ws:
        _check("grad_ws", g_ws, rw, tw)
    if lab is not None:
        ign = lab == IGNORE
        assert (kl[ign] == 0).all() and (ent[ign] == 0).all()
        assert (g_hs[ign] == 0).all(), "ignored tokens must get zero gradient"
        if ce:
            assert (ce_o[ign] == 0).all()
    return out, grads


# --------------------------------------------------------------------------------------------
# Accuracy against fp64
# --------------------------------------------------------------------------------------------
CASES = [
    # id, kwargs
    ("N1-V1000-fwd", dict(N=1, Vs=1000, Vt=1000, Ds=63, Dt=63, labels=False)),
    ("N37-pad-T2-fwd-ce", dict(N=37, Vs=1100, Vt=1050, V=1000, Ds=63, Dt=48, T=2.0, ce=True)),
    ("N37-pad-T07-rev-ce", dict(N=37, Vs=1100, Vt=1050, V=1000, Ds=63, Dt=48, T=0.7,
                                reverse=True, ce=True)),
    ("N300-V4097-T15-fwd-ce", dict(N=300, Vs=4097, Vt=4097, Ds=63, Dt=80, T=1.5, ce=True)),
    ("N300-V4097-rev-T1-ce", dict(N=300, Vs=4097, Vt=4100, V=4097, Ds=80, Dt=63, reverse=True,
                                  ce=True)),
    ("N300-V4097-rev-nogws", dict(N=300, Vs=4097, Vt=4097, Ds=63, Dt=63, T=2.0, reverse=True,
                                  need_grad_ws=False)),
    ("N37-V49152-fwd-ce", dict(N=37, Vs=49152, Vt=49152, Ds=63, Dt=47, ce=True)),
    ("bf16-N300-V4097-fwd-ce", dict(N=300, Vs=4097, Vt=4097, Ds=63, Dt=80, T=2.0, ce=True,
                                    dtype=torch.bfloat16)),
    ("bf16-N37-pad-rev", dict(N=37, Vs=1100, Vt=1050, V=1000, Ds=63, Dt=48, reverse=True,
                              dtype=torch.bfloat16)),
    ("fp16-N300-V4097-rev-ce", dict(N=300, Vs=4097, Vt=4097, Ds=63, Dt=48, T=1.5, reverse=True,
                                    ce=True, dtype=torch.float16)),
    ("fp16-N1-V1000-fwd-nogws", dict(N=1, Vs=1000, Vt=1000, Ds=63, Dt=63, dtype=torch.float16,
                                     ignore_frac=0.0, need_grad_ws=False)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_fp64_reference(C, cpu_isa, kwargs):
    """At every ISA level this CPU runs (the multi-ISA tile loops; see test_cpu_isa.py)."""
    _run_case(C, **kwargs)


def test_all_ignored_is_zero_and_finite(C):
    N, V = 37, 1000
    hs, ws, ht, wt, _ = _inputs(N, V, V, 63, 48, torch.float32, seed=5)
    lab = torch.full((N,), IGNORE, dtype=torch.long)
    out = C.fused_kd_forward(hs, ws, ht, wt, lab, 0.5, False, IGNORE, V, True)
    kl, ent, lse_s, lse_t, ce, lse1 = out
    assert (kl == 0).all() and (ent == 0).all() and (ce == 0).all()
    assert torch.isfinite(lse_s).all() and torch.isfinite(lse_t).all() and torch.isfinite(lse1).all()
    g_hs, g_ws = C.fused_kd_backward(torch.ones(N), torch.ones(N), hs, ws, ht, wt, lab, lse_s, lse_t,
                                     kl, lse1, 0.5, False, IGNORE, V, True)
    assert (g_hs == 0).all() and (g_ws == 0).all()


def test_teacher_neg_inf_logits(C):
    """Teacher columns at -inf (0 log 0 = 0): finite KL / entropy / gradients that match."""
    N, V, D = 37, 1000, 63
    hs, ws, ht, wt, lab = _inputs(N, V, V, D, D, torch.float32, seed=7)
    ht = ht.abs() + 0.1  # positive, so that a -inf head row gives exactly -inf logits
    wt = wt.clone()
    wt[::7] = -math.inf
    _run_case(C, N=N, Vs=V, Vt=V, Ds=D, Dt=D, T=1.3, ce=True, inputs=(hs, ws, ht, wt, lab))


def test_shared_head_and_identical_models_give_zero_kl(C):
    N, V, D = 37, 1000, 63
    hs, ws, _, _, _ = _inputs(N, V, V, D, D, torch.float32, seed=9, labels=False)
    none = torch.empty(0, dtype=torch.long)
    kl, ent, lse_s, lse_t, _, _ = C.fused_kd_forward(hs, ws, hs, ws, none, 1.0, False, IGNORE, V,
                                                    False)
    assert kl.abs().max() < 1e-5 and torch.equal(lse_s, lse_t)
    g_hs, _ = C.fused_kd_backward(torch.ones(N), torch.empty(0), hs, ws, hs, ws, none, lse_s, lse_t,
                                  kl, torch.empty(0), 1.0, False, IGNORE, V, False)
    assert g_hs.abs().max() < 1e-5


def test_thread_count_does_not_change_results(C):
    N, V = 300, 4097
    hs, ws, ht, wt, lab = _inputs(N, V, V, 63, 48, torch.float32, seed=11)
    before = torch.get_num_threads()
    res = []
    try:
        for nt in (1, max(2, before)):
            torch.set_num_threads(nt)
            out = C.fused_kd_forward(hs, ws, ht, wt, lab, 0.5, True, IGNORE, V, True)
            grads = C.fused_kd_backward(torch.ones(N), torch.ones(N), hs, ws, ht, wt, lab, out[2],
                                        out[3], out[0], out[5], 0.5, True, IGNORE, V, True)
            res.append(list(out) + list(grads))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs(C):
    N, V = 37, 1000
    hs, ws, ht, wt, lab = _inputs(N, V, V, 63, 48, torch.float32, seed=17)
    hs_nc = torch.cat([hs, hs], 1)[:, :63]          # row stride 126
    ws_nc = ws.T.contiguous().T                     # column-major
    a = C.fused_kd_forward(hs, ws, ht, wt, lab, 1.0, False, IGNORE, V, True)
    b = C.fused_kd_forward(hs_nc, ws_nc, ht, wt, lab, 1.0, False, IGNORE, V, True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    ga = C.fused_kd_backward(torch.ones(N), torch.ones(N), hs, ws, ht, wt, lab, a[2], a[3], a[0],
                             a[5], 1.0, False, IGNORE, V, True)
    gb = C.fused_kd_backward(torch.ones(N), torch.ones(N), hs_nc, ws_nc, ht, wt, lab, a[2], a[3],
                             a[0], a[5], 1.0, False, IGNORE, V, True)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,Ds,seed", [(torch.float32, 63, 13), (torch.bfloat16, 64, 23)])
def test_run_to_run_bitwise_deterministic(C, dtype, Ds, seed):
    """Vocab groups are taken dynamically by the threads but merged in a fixed order (fp32
    route, and the bf16 route where the machine has it)."""
    N, V = 300, 4097
    hs, ws, ht, wt, lab = _inputs(N, V, V, Ds, 48, dtype, seed=seed)
    runs = []
    for _ in range(2):
        out = C.fused_kd_forward(hs, ws, ht, wt, lab, 0.7, False, IGNORE, V, True)
        grads = C.fused_kd_backward(torch.ones(N), torch.ones(N), hs, ws, ht, wt, lab, out[2],
                                    out[3], out[0], out[5], 0.7, False, IGNORE, V, True)
        runs.append(list(out) + list(grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# bf16 GEMM route: a side whose hidden states and head are both bf16 runs its tile GEMMs as
# bf16 x bf16 -> fp32 (oneDNN brgemm) where the CPU has AVX512_BF16; every case runs on both
# routes (fused_kd_set_bf16_gemm) against the same contract.
# --------------------------------------------------------------------------------------------
def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.fixture(params=[True, False], ids=["bf16-gemm", "fp32-gemm"])
def bf16_route(C, request):
    prev = C.fused_kd_set_bf16_gemm(request.param)
    try:
        route = C.fused_kd_info()["gemm_bf16"]
        if request.param and not route.startswith("cpublas::brgemm"):
            pytest.skip(f"no bf16 GEMM route on this machine: {route}")
        if not request.param:
            assert route.startswith("off"), route
        yield request.param
    finally:
        C.fused_kd_set_bf16_gemm(prev)


def test_bf16_route_available_where_the_cpu_has_avx512_bf16(C):
    """AVX512_BF16 without AMX (e.g. Zen 4): the route must be on (AMX CPUs stay on fp32)."""
    flags = _cpu_flags()
    if "avx512_bf16" not in flags or "amx_bf16" in flags or not torch.backends.mkldnn.is_available():
        pytest.skip("no AVX512_BF16, an AMX CPU, or no oneDNN: the bf16 route is expected off")
    if C.build_info()["isa"] != "avx512":
        assert "the route needs avx512" in C.fused_kd_info()["gemm_bf16"], C.fused_kd_info()
        pytest.skip(f"ISA level lowered to {C.build_info()['isa']}: the bf16 route is expected off")
    prev = C.fused_kd_set_bf16_gemm(True)
    try:
        assert C.fused_kd_info()["gemm_bf16"].startswith("cpublas::brgemm"), C.fused_kd_info()
    finally:
        C.fused_kd_set_bf16_gemm(prev)


BF16_CASES = [
    # ragged: a last chunk of 1 token (N = 257) and a last vocab block of 1 row (V = 513),
    # Ds != Dt, T = 1 (CE shares the student softmax)
    ("N257-V513-Ds576-Dt320-fwd-ce", dict(N=257, Vs=513, Vt=513, Ds=576, Dt=320, ce=True)),
    # odd Ds (K zero-padded to even), odd last chunk (255 tokens) and block (185 rows)
    ("N511-V3001-Ds575-Dt64-rev-ce-T07", dict(N=511, Vs=3001, Vt=3001, Ds=575, Dt=64, T=0.7,
                                              reverse=True, ce=True)),
    ("N300-V4097-Ds63-Dt80-T2-fwd-ce", dict(N=300, Vs=4097, Vt=4097, Ds=63, Dt=80, T=2.0,
                                            ce=True)),
    ("N1-V1000-Ds64-Dt63-nolabels", dict(N=1, Vs=1000, Vt=1000, Ds=64, Dt=63, labels=False)),
    ("N37-pad-rev-nogws", dict(N=37, Vs=1100, Vt=1050, V=1000, Ds=48, Dt=63, reverse=True,
                               need_grad_ws=False)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in BF16_CASES], ids=[c[0] for c in BF16_CASES])
def test_bf16_matches_fp64_reference(C, bf16_route, kwargs):
    _run_case(C, dtype=torch.bfloat16, **kwargs)


@pytest.mark.parametrize("dtypes", [
    (torch.bfloat16, torch.float32),   # bf16 student route, fp32 teacher (sgemm)
    (torch.float32, torch.bfloat16),   # fp32 student (sgemm), bf16 teacher route
    (torch.bfloat16, torch.float16),   # bf16 student route, fp16 teacher (converted to fp32)
], ids=["s-bf16-t-fp32", "s-fp32-t-bf16", "s-bf16-t-fp16"])
def test_bf16_route_per_side(C, bf16_route, dtypes):
    s_dt, t_dt = dtypes
    N, V, Ds, Dt = 300, 1537, 96, 80
    hs, ws, ht, wt, lab = _inputs(N, V, V, Ds, Dt, torch.float32, seed=21)
    inputs = (hs.to(s_dt), ws.to(s_dt), ht.to(t_dt), wt.to(t_dt), lab)
    _run_case(C, N=N, Vs=V, Vt=V, Ds=Ds, Dt=Dt, T=1.5, ce=True, inputs=inputs)


def test_bf16_route_off_while_onednn_is_disabled(C):
    """brgemm refuses to run with oneDNN disabled: the bf16 sides then take the fp32 route."""
    with torch.backends.mkldnn.flags(enabled=False):
        assert C.fused_kd_info()["gemm_bf16"].startswith("off"), C.fused_kd_info()
        _run_case(C, N=37, Vs=1000, Vt=1000, Ds=64, Dt=48, T=1.5, ce=True, dtype=torch.bfloat16)



# --------------------------------------------------------------------------------------------
# Input validation (the Python API layer turns these RuntimeErrors into ValueErrors)
# --------------------------------------------------------------------------------------------
def _good(N=5, V=300, Ds=16, Dt=12):
    g = torch.Generator().manual_seed(3)
    return dict(hs=torch.randn(N, Ds, generator=g), ws=torch.randn(V, Ds, generator=g),
                ht=torch.randn(N, Dt, generator=g), wt=torch.randn(V, Dt, generator=g),
                labels=torch.randint(0, V, (N,), generator=g), inv_temperature=1.0,
                reverse=False, ignore_index=IGNORE, vocab_size=V, compute_ce=True)


@pytest.mark.parametrize("change, match", [
    (dict(hs=torch.randn(5, 17)), "hidden size mismatch"),
    (dict(ht=torch.randn(4, 12)), "token counts differ"),
    (dict(ws=torch.randn(300, 16, 1)), "must be 2-D"),
    (dict(hs=torch.randn(5, 16).double()), "float32, bfloat16 or float16"),
    (dict(vocab_size=301), r"vocab_size must be in \[1, min\(Vs, Vt\)\] = \[1, 300\], got 301"),
    (dict(vocab_size=0), "vocab_size must be"),
    (dict(inv_temperature=0.0), "inv_temperature must be finite and > 0"),
    (dict(inv_temperature=-1.0), "inv_temperature must be finite and > 0"),
    (dict(inv_temperature=math.inf), "inv_temperature must be finite and > 0"),
    (dict(labels=torch.zeros(4, dtype=torch.long)), "labels must be \\[N\\]"),
    (dict(labels=torch.zeros(5)), "labels must be an integer tensor"),
    (dict(labels=torch.empty(0, dtype=torch.long)), "compute_ce=True needs labels"),
    (dict(labels=torch.tensor([0, 1, 2, 300, 4])), r"labels\[3\] = 300 is outside"),
])
def test_forward_rejects_bad_inputs(C, change, match):
    args = _good()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        C.fused_kd_forward(**args)


def test_error_messages_print_shapes(C):
    args = _good()
    args["hs"] = torch.randn(5, 17)
    with pytest.raises(RuntimeError, match=r"hs \[5, 17\].*ws \[300, 16\]"):
        C.fused_kd_forward(**args)


def test_backward_rejects_bad_inputs(C):
    a = _good()
    out = C.fused_kd_forward(**a)
    N = a["hs"].shape[0]
    base = dict(grad_kl=torch.ones(N), grad_ce=torch.ones(N), hs=a["hs"], ws=a["ws"], ht=a["ht"],
                wt=a["wt"], labels=a["labels"], student_lse=out[2], teacher_lse=out[3], kl=out[0],
                student_lse_t1=out[5], inv_temperature=1.0, reverse=False, ignore_index=IGNORE,
                vocab_size=a["vocab_size"], need_grad_ws=True)
    C.fused_kd_backward(**base)  # sanity: the good call works
    for change, match in [
        (dict(grad_kl=torch.ones(N + 1)), "grad_kl must be \\[N\\]"),
        (dict(student_lse=torch.ones(N, 2)), "student_lse must be \\[N\\]"),
        (dict(student_lse_t1=torch.empty(0)), "student_lse_t1 must be \\[N\\]"),
        (dict(labels=torch.empty(0, dtype=torch.long)), "grad_ce given but labels are empty"),
        (dict(inv_temperature=0.0), "inv_temperature"),
    ]:
        kw = dict(base, **change)
        with pytest.raises(RuntimeError, match=match):
            C.fused_kd_backward(**kw)


def test_empty_batch(C):
    a = _good(N=0)
    out = C.fused_kd_forward(**a)
    assert all(t.numel() == 0 for t in out)
