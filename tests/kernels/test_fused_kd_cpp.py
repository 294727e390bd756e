"""C++ specifics of the fused linear KD kernel: e3kernels._C.fused_kd_forward / fused_kd_backward
called directly (raw outputs: grad_ws stays fp32), at every ISA level this CPU runs, on both
GEMM routes (bf16 brgemm / fp32), across thread counts, on non-contiguous inputs, and their
bad-input messages. The cases shared with Triton are in test_fused_kd.py.

Accuracy: the rule of `e3kernels.testing` with `ulp_floor`, 2 ulp of the output dtype:

    max|ours - truth| <= 2 max|ref - truth| + 2 ulp(dtype) max(1, max|truth|)
    (fp32 2^-22, bf16 2^-7, fp16 2^-10: the rounding of the final fp32 value to the output dtype)

Inputs are `e3kernels.testing.kd_case`: fresh random values (never zeros), sizes odd or not
multiples of the kernel's tiles (256 tokens x 256 vocab rows). The module must FAIL (not skip)
when the extension lacks the ops.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from e3kernels.dispatch import cpp_extension, cpp_import_error
from e3kernels.testing import (
    IGNORE_INDEX,
    assert_kd_accurate,
    assert_masked_outputs_zero,
    kd_case,
    reference_outputs,
    ulp_floor,
)


@pytest.fixture(scope="module")
def C():
    ext = cpp_extension()
    assert ext is not None, f"e3kernels._C is not built: {cpp_import_error()}"
    for name in ("fused_kd_forward", "fused_kd_backward"):
        assert hasattr(ext, name), f"e3kernels._C lacks {name}: rebuild with tools/build_cpp.sh"
    return ext


def _case(name, n, v, ds, dt, *, ignore_every=4, **kw):
    """`kd_case` seeded by the case name; every 4th label ignored unless told otherwise."""
    return kd_case(n, v, ds, dt, seed=zlib.crc32(name.encode()), ignore_every=ignore_every,
                   name=name, **kw)


def _labels(case):
    return case.labels if case.labels is not None else torch.empty(0, dtype=torch.long)


def _direct_outputs(C, case, need_grad_ws):
    """_C.fused_kd_forward, then _C.fused_kd_backward with the case's upstream gradients;
    checks the shapes and dtypes of the raw outputs."""
    n = case.hs.shape[0]
    settings = (1.0 / case.temperature, case.kl == "reverse", IGNORE_INDEX, case.vocab_size)
    inputs = (case.hs, case.ws, case.ht, case.wt, _labels(case))
    kl, ent, lse_s, lse_t, ce, lse_t1 = C.fused_kd_forward(*inputs, *settings, case.compute_ce)
    for t in (kl, ent, lse_s, lse_t):
        assert t.dtype == torch.float32 and t.shape == (n,)
    with_ce = n if case.compute_ce else 0
    assert ce.shape == (with_ce,) and lse_t1.shape == (with_ce,)
    grad_ce = case.grad_ce if case.compute_ce else torch.empty(0)
    g_hs, g_ws = C.fused_kd_backward(case.grad_kl, grad_ce, *inputs, lse_s, lse_t, kl, lse_t1,
                                     *settings, need_grad_ws)
    assert g_hs.dtype == case.hs.dtype and g_hs.shape == case.hs.shape
    if need_grad_ws:
        assert g_ws.dtype == torch.float32 and g_ws.shape == case.ws.shape
    else:
        assert g_ws.numel() == 0
    return {"kl": kl, "teacher_entropy": ent, "student_lse": lse_s, "teacher_lse": lse_t,
            "ce": ce if case.compute_ce else None,
            "student_lse_t1": lse_t1 if case.compute_ce else None,
            "grad_hs": g_hs, "grad_ws": g_ws if need_grad_ws else None}


def _run_case(C, case, need_grad_ws=True):
    ours = _direct_outputs(C, case, need_grad_ws)
    truth = reference_outputs(case, torch.float64, need_grad_ws=need_grad_ws)
    ref = reference_outputs(case, need_grad_ws=need_grad_ws)
    assert_kd_accurate(ours, ref, truth, backend="_C", case=case, floor=ulp_floor)
    assert_masked_outputs_zero(ours, backend="_C", case=case)


def _forward_backward(C, case, inv_temperature, reverse, hs=None, ws=None):
    """Raw forward outputs + grads with unit upstream gradients (kl and ce)."""
    hs = case.hs if hs is None else hs
    ws = case.ws if ws is None else ws
    n, v = hs.shape[0], case.vocab_size
    out = C.fused_kd_forward(hs, ws, case.ht, case.wt, case.labels, inv_temperature, reverse,
                             IGNORE_INDEX, v, True)
    grads = C.fused_kd_backward(torch.ones(n), torch.ones(n), hs, ws, case.ht, case.wt,
                                case.labels, out[2], out[3], out[0], out[5], inv_temperature,
                                reverse, IGNORE_INDEX, v, True)
    return list(out), list(grads)


# --------------------------------------------------------------------------------------------
# Accuracy against fp64
# --------------------------------------------------------------------------------------------
CASES = [
    # id, kd_case arguments (+ need_grad_ws)
    ("N1-V1000-fwd", dict(n=1, v=1000, ds=63, dt=63, labels=False)),
    ("N37-pad-T2-fwd-ce", dict(n=37, v=1000, vs=1100, vt=1050, ds=63, dt=48, temperature=2.0,
                               compute_ce=True)),
    ("N37-pad-T07-rev-ce", dict(n=37, v=1000, vs=1100, vt=1050, ds=63, dt=48, temperature=0.7,
                                kl="reverse", compute_ce=True)),
    ("N300-V4097-T15-fwd-ce", dict(n=300, v=4097, ds=63, dt=80, temperature=1.5,
                                   compute_ce=True)),
    ("N300-V4097-rev-T1-ce", dict(n=300, v=4097, vt=4100, ds=80, dt=63, kl="reverse",
                                  compute_ce=True)),
    ("N300-V4097-rev-nogws", dict(n=300, v=4097, ds=63, dt=63, temperature=2.0, kl="reverse",
                                  need_grad_ws=False)),
    ("N37-V49152-fwd-ce", dict(n=37, v=49152, ds=63, dt=47, compute_ce=True)),
    ("bf16-N300-V4097-fwd-ce", dict(n=300, v=4097, ds=63, dt=80, temperature=2.0,
                                    compute_ce=True, dtype=torch.bfloat16)),
    ("bf16-N37-pad-rev", dict(n=37, v=1000, vs=1100, vt=1050, ds=63, dt=48, kl="reverse",
                              dtype=torch.bfloat16)),
    ("fp16-N300-V4097-rev-ce", dict(n=300, v=4097, ds=63, dt=48, temperature=1.5, kl="reverse",
                                    compute_ce=True, dtype=torch.float16)),
    ("fp16-N1-V1000-fwd-nogws", dict(n=1, v=1000, ds=63, dt=63, dtype=torch.float16,
                                     ignore_every=0, need_grad_ws=False)),
]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_matches_fp64_reference(C, cpu_isa, name, kwargs):
    """At every ISA level this CPU runs (the multi-ISA tile loops; see test_cpu_isa.py)."""
    kwargs = dict(kwargs)
    need_grad_ws = kwargs.pop("need_grad_ws", True)
    _run_case(C, _case(name, **kwargs), need_grad_ws)


def test_thread_count_does_not_change_results(C):
    case = _case("threads", 300, 4097, 63, 48)
    before = torch.get_num_threads()
    res = []
    try:
        for nt in (1, max(2, before)):
            torch.set_num_threads(nt)
            out, grads = _forward_backward(C, case, 0.5, True)
            res.append(out + grads)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs(C):
    case = _case("non-contiguous", 37, 1000, 63, 48)
    hs_nc = torch.cat([case.hs, case.hs], 1)[:, :63]  # row stride 126
    ws_nc = case.ws.T.contiguous().T                  # column-major
    a, ga = _forward_backward(C, case, 1.0, False)
    b, gb = _forward_backward(C, case, 1.0, False, hs=hs_nc, ws=ws_nc)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,Ds,seed", [(torch.float32, 63, 13), (torch.bfloat16, 64, 23)])
def test_run_to_run_bitwise_deterministic(C, dtype, Ds, seed):
    """Vocab groups are taken dynamically by the threads but merged in a fixed order (fp32
    route, and the bf16 route where the machine has it)."""
    case = kd_case(300, 4097, Ds, 48, dtype, seed=seed, ignore_every=4)
    runs = [sum(_forward_backward(C, case, 0.7, False), []) for _ in range(2)]
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
    ("N257-V513-Ds576-Dt320-fwd-ce", dict(n=257, v=513, ds=576, dt=320, compute_ce=True)),
    # odd Ds (K zero-padded to even), odd last chunk (255 tokens) and block (185 rows)
    ("N511-V3001-Ds575-Dt64-rev-ce-T07", dict(n=511, v=3001, ds=575, dt=64, temperature=0.7,
                                              kl="reverse", compute_ce=True)),
    ("N300-V4097-Ds63-Dt80-T2-fwd-ce", dict(n=300, v=4097, ds=63, dt=80, temperature=2.0,
                                            compute_ce=True)),
    ("N1-V1000-Ds64-Dt63-nolabels", dict(n=1, v=1000, ds=64, dt=63, labels=False)),
    ("N37-pad-rev-nogws", dict(n=37, v=1000, vs=1100, vt=1050, ds=48, dt=63, kl="reverse",
                               need_grad_ws=False)),
]


@pytest.mark.parametrize("name,kwargs", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bf16_matches_fp64_reference(C, bf16_route, name, kwargs):
    kwargs = dict(kwargs)
    need_grad_ws = kwargs.pop("need_grad_ws", True)
    _run_case(C, _case(name, dtype=torch.bfloat16, **kwargs), need_grad_ws)


@pytest.mark.parametrize("dtypes", [
    (torch.bfloat16, torch.float32),   # bf16 student route, fp32 teacher (sgemm)
    (torch.float32, torch.bfloat16),   # fp32 student (sgemm), bf16 teacher route
    (torch.bfloat16, torch.float16),   # bf16 student route, fp16 teacher (converted to fp32)
], ids=["s-bf16-t-fp32", "s-fp32-t-bf16", "s-bf16-t-fp16"])
def test_bf16_route_per_side(C, bf16_route, dtypes):
    s_dt, t_dt = dtypes
    _run_case(C, _case("per-side", 300, 1537, 96, 80, dtype=s_dt, teacher_dtype=t_dt,
                       temperature=1.5, compute_ce=True))


def test_bf16_route_off_while_onednn_is_disabled(C):
    """brgemm refuses to run with oneDNN disabled: the bf16 sides then take the fp32 route."""
    with torch.backends.mkldnn.flags(enabled=False):
        assert C.fused_kd_info()["gemm_bf16"].startswith("off"), C.fused_kd_info()
        _run_case(C, _case("onednn-off", 37, 1000, 64, 48, temperature=1.5, compute_ce=True,
                           dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------
# Input validation (the Python API layer turns these RuntimeErrors into ValueErrors)
# --------------------------------------------------------------------------------------------
def _good(N=5, V=300, Ds=16, Dt=12):
    g = torch.Generator().manual_seed(3)
    return dict(hs=torch.randn(N, Ds, generator=g), ws=torch.randn(V, Ds, generator=g),
                ht=torch.randn(N, Dt, generator=g), wt=torch.randn(V, Dt, generator=g),
                labels=torch.randint(0, V, (N,), generator=g), inv_temperature=1.0,
                reverse=False, ignore_index=IGNORE_INDEX, vocab_size=V, compute_ce=True)


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
    (dict(labels=torch.tensor([0, 1, 2, 300, 4])), r"labels\[3\] = 300"),
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
                student_lse_t1=out[5], inv_temperature=1.0, reverse=False, ignore_index=IGNORE_INDEX,
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
