"""Gumbel-TopK: reference, C++ and Triton (interpreter, TRITON_INTERPRET=1 from conftest).

The mask and the noise must be bit-identical across backends; soft values and gradients
must match the fp64 ground truth no worse than the fp32 reference does (plus a small atol),
and low-precision outputs within their dtype's rounding (the rule and the case generators are
in e3kernels.testing, shared with bench/gpu_check.py).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import e3kernels
from e3kernels import GumbelTopK, gumbel_noise, gumbel_topk, topk_mask
from e3kernels.ops import gumbel_topk as gtk_ops
from e3kernels.reference import (
    gumbel_from_bits_ref,
    gumbel_noise_ref,
    gumbel_topk_ref,
    philox4x32_ref,
)
from e3kernels.testing import (
    assert_gumbel_accurate,
    gumbel_k,
    gumbel_logits,
    gumbel_upstream,
)

BACKENDS = ["reference", "cpp", "triton"]
KERNELS = ["cpp", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# shapes: B not a multiple of any block, L not a power of two, L = 1, N = 1
SHAPES = [(1, 1), (3, 7), (37, 30), (5, 64), (2, 100)]


# --------------------------------------------------------------------------------------
# build, RNG contract
# --------------------------------------------------------------------------------------

def test_cpp_extension_has_gumbel_ops():
    ext = e3kernels.cpp_extension()
    assert ext is not None, "e3kernels._C is not built"
    for name in ("gumbel_topk_forward", "gumbel_topk_backward", "gumbel_noise",
                 "gumbel_from_bits"):
        assert hasattr(ext, name), f"e3kernels._C lacks {name}: rebuild with tools/build_cpp.sh"
    assert e3kernels.resolve_backend("cpu") == "cpp"


@pytest.mark.parametrize("ctr,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(ctr, key, expected):
    """Random123 known-answer vectors for Philox4x32-10."""
    c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
    out = philox4x32_ref(*c, *key)
    assert tuple(int(o) for o in out) == expected


def test_noise_bits_exhaustive_uniform_grid():
    """Every one of the 2^23 uniforms gives the same fp32 noise in C++ and the reference;
    Triton on a strided subset (the interpreter is slow). Values are -log(-log u) to 6e-7."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.arange(1 << 23, dtype=torch.int64) << 9) | torch.randint(0, 512, (1 << 23,),
                                                                         generator=gen)
    ref = gumbel_from_bits_ref(x)
    assert torch.equal(gtk_ops.gumbel_from_bits(x, "cpp"), ref)
    sub = x[::97]
    assert torch.equal(gtk_ops.gumbel_from_bits(sub, "triton"), ref[::97])
    u = ((x >> 9) * 2 + 1).double() * 2.0 ** -24
    assert (ref.double() - (-torch.log(-torch.log(u)))).abs().max() < 6e-7
    assert -2.82 < ref.min() and ref.max() < 16.64


@pytest.mark.parametrize("b,n,seed,offset", [(1, 1, 0, 0), (7, 13, 5, 3), (33, 64, 2 ** 40 + 7, 2 ** 33 + 1),
                                             (3, 101, 2 ** 64 - 1, 2 ** 64 - 1)])
def test_noise_identical_across_backends(b, n, seed, offset):
    ref = gumbel_noise_ref(b, n, seed, offset)
    for be in KERNELS:
        assert torch.equal(gumbel_noise(b, n, seed, offset, backend=be), ref), be


def test_noise_depends_on_position_only():
    """Rows do not depend on B (grid/blocks); different seeds/offsets give other noise."""
    big = gumbel_noise(300, 9, 11, 4, backend="cpp")
    assert torch.equal(gumbel_noise(5, 9, 11, 4, backend="triton"), big[:5])
    assert torch.equal(gumbel_noise(300, 5, 11, 4, backend="cpp"), big[:, :5])
    assert not torch.equal(gumbel_noise(300, 9, 12, 4, backend="cpp"), big)
    assert not torch.equal(gumbel_noise(300, 9, 11, 5, backend="cpp"), big)
    # ~Gumbel(0, 1): mean = Euler-Mascheroni, var = pi^2 / 6
    g = gumbel_noise(1000, 1000, 3, 0, backend="cpp").double()
    assert abs(g.mean() - 0.5772) < 0.01 and abs(g.var() - math.pi ** 2 / 6) < 0.02


# --------------------------------------------------------------------------------------
# hard mask
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relaxation", ["softmax", "sigmoid"])
def test_mask_identical_across_backends(dtype, relaxation):
    for i, (b, n) in enumerate(SHAPES):
        x = gumbel_logits(b, n, dtype, seed=i)
        k = gumbel_k(b, n, seed=i)
        outs = {be: gumbel_topk(x, k, tau=0.7, seed=1234 + i, offset=i, relaxation=relaxation,
                                return_indices=True, backend=be) for be in BACKENDS}
        ref = outs["reference"]
        assert ref.mask.dtype == dtype and ref.mask.shape == (b, n)
        assert torch.equal(ref.mask.float().sum(1), k.float()), "exactly k ones per row"
        assert set(ref.mask.unique().tolist()) <= {0.0, 1.0}
        assert ref.indices.shape == (b, int(k.max()))
        for be in KERNELS:
            assert torch.equal(outs[be].mask, ref.mask), (be, b, n)
            assert torch.equal(outs[be].indices, ref.indices), (be, b, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_edge_cases(backend):
    x = gumbel_logits(4, 9)
    m0 = gumbel_topk(x, 0, seed=1, return_soft=True, return_indices=True, backend=backend)
    assert torch.equal(m0.mask, torch.zeros_like(x)) and m0.indices.shape == (4, 0)
    assert torch.equal(m0.soft, torch.zeros_like(x))
    mL = gumbel_topk(x, 9, seed=1, return_soft=True, return_indices=True, backend=backend)
    assert torch.equal(mL.mask, torch.ones_like(x))
    assert torch.equal(mL.indices, torch.arange(9).expand(4, 9))
    torch.testing.assert_close(mL.soft, torch.ones_like(x))
    ks = torch.tensor([0, 9, 1, 8])
    out = gumbel_topk(x, ks, seed=1, relaxation="sigmoid", return_soft=True,
                      return_indices=True, backend=backend)
    assert torch.equal(out.mask.sum(1), ks.float())
    assert torch.equal(out.soft[0], torch.zeros(9)) and torch.equal(out.soft[1], torch.ones(9))
    assert (out.indices[0] == -1).all() and torch.equal(out.indices[2, 1:], torch.full((8,), -1))
    # one column, 1-D input
    one = gumbel_topk(torch.tensor([0.3]), 1, backend=backend)
    assert one.shape == (1,) and one.item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_broken_by_lower_index(backend):
    # |g| < 17 is absorbed by 1e10 (fp32 ulp 1024): every 1e10 entry ties exactly in z
    x = torch.full((3, 10), 1e10)
    x[1, :4] = 5e9
    x[2] = torch.tensor([1e10, 5e9, 1e10, 1e10, 5e9, 1e10, 1e10, 1e10, 5e9, 1e10])
    out = gumbel_topk(x, torch.tensor([4, 3, 5]), seed=7, return_indices=True,
                      relaxation="sigmoid", backend=backend)
    assert out.indices.tolist() == [[0, 1, 2, 3, -1], [4, 5, 6, -1, -1], [0, 2, 3, 5, 6]]
    xb = x.to(torch.bfloat16)  # 1e10 absorbs the noise in fp32 after the exact upcast too
    assert torch.equal(gumbel_topk(xb, torch.tensor([4, 3, 5]), seed=7, backend=backend),
                       out.mask.to(torch.bfloat16))


def test_seed_and_offset_change_the_mask():
    x = gumbel_logits(64, 20, scale=0.3)
    a = gumbel_topk(x, 5, seed=1, offset=0)
    assert torch.equal(a, gumbel_topk(x, 5, seed=1, offset=0))
    assert torch.equal(a, gumbel_topk(x, 5, seed=1, offset=0, backend="triton"))
    for other in (gumbel_topk(x, 5, seed=2, offset=0), gumbel_topk(x, 5, seed=1, offset=1),
                  gumbel_topk(x, 5, seed=1 + 2 ** 32, offset=0),
                  gumbel_topk(x, 5, seed=1, offset=2 ** 32)):
        assert (other != a).any(1).float().mean() > 0.5


def _plackett_luce_subsets(logits: torch.Tensor, k: int) -> dict[tuple, float]:
    """Exact P(subset) of sampling k items without replacement with p = softmax(logits)."""
    w = logits.double().exp().tolist()
    total = sum(w)
    probs: dict[tuple, float] = {}
    for seq in itertools.permutations(range(len(w)), k):
        p, rest = 1.0, total
        for i in seq:
            p *= w[i] / rest
            rest -= w[i]
        key = tuple(sorted(seq))
        probs[key] = probs.get(key, 0.0) + p
    return probs


def _chisquare_pvalue(obs: torch.Tensor, exp: torch.Tensor) -> float:
    try:
        from scipy.stats import chisquare
        return float(chisquare(obs.numpy(), exp.numpy()).pvalue)
    except ImportError:  # chi2 survival function = regularized upper gamma
        stat = ((obs - exp) ** 2 / exp).sum()
        df = torch.tensor((obs.numel() - 1) / 2.0, dtype=torch.float64)
        return float(torch.special.gammaincc(df, stat / 2))


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("backend,draws", [("cpp", 200_000), ("reference", 20_000),
                                           ("triton", 8_192)])
def test_inclusion_frequencies_match_plackett_luce(k, backend, draws):
    """Gumbel top-k == Plackett-Luce sampling without replacement: chi-square on the
    C(6, k) subset frequencies and binomial z-scores on the per-item inclusion rates."""
    logits = torch.tensor([1.2, 0.4, 0.0, -0.3, -1.0, 0.7])
    n = logits.numel()
    x = logits.expand(draws, n).contiguous()  # one independent draw per row
    m = gumbel_topk(x, k, seed=2024 + k, offset=3, backend=backend)
    assert torch.equal(m.sum(1), torch.full((draws,), float(k)))
    probs = _plackett_luce_subsets(logits, k)
    subsets = sorted(probs)
    code = (m.long() * (2 ** torch.arange(n))).sum(1)
    counts = torch.bincount(code, minlength=2 ** n).double()
    obs = torch.tensor([counts[sum(2 ** i for i in s)] for s in subsets])
    exp = torch.tensor([probs[s] for s in subsets]) * draws
    assert obs.sum() == draws
    assert _chisquare_pvalue(obs, exp) > 1e-3
    incl = torch.tensor([sum(p for s, p in probs.items() if i in s) for i in range(n)])
    freq = m.double().mean(0)
    z = (freq - incl) / (incl * (1 - incl) / draws).sqrt()
    assert z.abs().max() < 4.5, (freq, incl)


# --------------------------------------------------------------------------------------
# soft relaxation and gradients
# --------------------------------------------------------------------------------------

def _ref_soft_grad(x, k, tau, seed, relaxation, v, compute_dtype):
    xr = x.detach().clone().requires_grad_()
    out = gumbel_topk_ref(xr, k, tau, seed, 0, relaxation, compute_dtype=compute_dtype)
    (out.mask.to(v.dtype) * v).sum().backward()
    return out.soft.detach().double(), xr.grad.double(), out.mask.detach()


def _kernel_soft_grad(x, k, tau, seed, relaxation, v, backend):
    xr = x.detach().clone().requires_grad_()
    out = gumbel_topk(xr, k, tau=tau, seed=seed, relaxation=relaxation, return_soft=True,
                      backend=backend)
    out.mask.backward(v.to(x.dtype))
    return out.soft.detach().double(), xr.grad.double(), out.mask.detach()


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("relaxation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_soft_and_grad_match_reference(backend, relaxation, dtype):
    shapes = [(37, 30), (3, 7), (2, 100)] if backend == "cpp" else [(37, 30), (3, 7)]
    kcap = None if backend == "cpp" or relaxation == "sigmoid" else 4  # interpreter: O(k^2)
    for i, (b, n) in enumerate(shapes):
        x = gumbel_logits(b, n, dtype, seed=10 + i)
        k = gumbel_k(b, n, seed=10 + i, kmax=kcap)
        tau = (0.7, 1.0, 2.3)[i % 3]  # 0.7, 2.3: not exact in fp32
        v = gumbel_upstream(b, n, seed=i)
        s_k, g_k, m_k = _kernel_soft_grad(x, k, tau, 99 + i, relaxation, v, backend)
        s64, g64, _ = _ref_soft_grad(x.double(), k, tau, 99 + i, relaxation, v, torch.float64)
        ref32 = None
        if dtype != torch.float64:  # the same maths in fp32 on the (exactly upcast) inputs
            s32, g32, m32 = _ref_soft_grad(x, k, tau, 99 + i, relaxation, v.float(),
                                           torch.float32)
            assert torch.equal(m_k, m32)
            ref32 = {"soft": s32, "grad": g32}
        assert_gumbel_accurate({"soft": s_k, "grad": g_k}, dtype, truth={"soft": s64, "grad": g64},
                               ref32=ref32, label=f"{backend} {relaxation} B={b} L={n}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relaxation", ["softmax", "sigmoid"])
def test_gradcheck_fp64_relaxed_path(backend, relaxation):
    x = gumbel_logits(3, 6, torch.float64, seed=5).requires_grad_()
    k = torch.tensor([2, 3, 5]) if relaxation == "sigmoid" else torch.tensor([1, 2, 3])

    def soft(inp):
        return gumbel_topk(inp, k, tau=0.8, seed=17, offset=2, relaxation=relaxation,
                           return_soft=True, backend=backend).soft

    assert torch.autograd.gradcheck(soft, (x,), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", KERNELS)
def test_straight_through_gradient_is_the_soft_gradient(backend):
    x = gumbel_logits(5, 12, seed=3).requires_grad_()
    v = torch.randn(5, 12)
    out = gumbel_topk(x, 4, tau=0.6, seed=8, return_soft=True, backend=backend)
    (gx_mask,) = torch.autograd.grad(out.mask, x, v, retain_graph=True)
    (gx_soft,) = torch.autograd.grad(out.soft, x, v, retain_graph=True)
    (gx_both,) = torch.autograd.grad((out.mask, out.soft), x, (v, 2 * v))
    torch.testing.assert_close(gx_mask, gx_soft, rtol=0, atol=0)
    torch.testing.assert_close(gx_both, 3 * gx_mask, rtol=1e-5, atol=1e-6)
    # mask-only call (no soft requested) gives the same gradient
    x2 = x.detach().clone().requires_grad_()
    gumbel_topk(x2, 4, tau=0.6, seed=8, backend=backend).backward(v)
    torch.testing.assert_close(x2.grad, gx_mask, rtol=0, atol=0)


@pytest.mark.parametrize("relaxation", ["softmax", "sigmoid"])
def test_relaxation_limits(relaxation):
    x = gumbel_logits(16, 11, torch.float64, seed=4)
    k = gumbel_k(16, 11, seed=4)
    cold = gumbel_topk(x, k, tau=2e-4, seed=3, relaxation=relaxation, return_soft=True)
    torch.testing.assert_close(cold.soft, cold.mask, rtol=0, atol=1e-6)  # s -> m as tau -> 0
    if relaxation == "softmax":
        warm = gumbel_topk(x, k, tau=3.0, seed=3, relaxation=relaxation, return_soft=True)
        torch.testing.assert_close(warm.soft.sum(1), k.double())  # sum_j p^j = k
        assert (warm.soft >= 0).all()  # (s_i may exceed 1 when tau > 1: see docs)
    else:
        warm = gumbel_topk(x, k, tau=3.0, seed=3, relaxation=relaxation, return_soft=True)
        assert ((warm.soft >= 0) & (warm.soft <= 1)).all()


def test_triton_writes_every_output(monkeypatch):
    """Poison the output buffers: every element must be written by the Triton kernels."""
    real_empty = torch.empty

    def poisoned(*size, dtype=None, **kw):
        t = real_empty(*size, dtype=dtype, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -777)

    monkeypatch.setattr(torch, "empty", poisoned)
    x = gumbel_logits(37, 30, seed=6).requires_grad_()
    k = gumbel_k(37, 30, seed=6, kmax=3)
    for relaxation in ("softmax", "sigmoid"):
        out = gumbel_topk(x, k, seed=1, relaxation=relaxation, return_soft=True,
                          return_indices=True, backend="triton")
        assert torch.isfinite(out.mask).all() and torch.isfinite(out.soft).all()
        assert ((out.indices >= -1) & (out.indices < 30)).all()
        (g,) = torch.autograd.grad(out.mask, x, torch.ones_like(x))
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", KERNELS)
def test_noncontiguous_and_1d_inputs(backend):
    base = gumbel_logits(6, 40, seed=9)
    x = base[:, ::2]  # row stride 40, column stride 2
    ref = gumbel_topk(x.contiguous(), 5, seed=3, backend="reference")
    assert torch.equal(gumbel_topk(x, 5, seed=3, backend=backend), ref)
    xt = base[:, :6].t()  # [6, 6] transposed view
    assert torch.equal(gumbel_topk(xt, 2, seed=3, backend=backend),
                       gumbel_topk(xt.contiguous(), 2, seed=3, backend="reference"))
    row = gumbel_topk(base[0], 7, seed=3, backend=backend)
    assert row.shape == (40,) and torch.equal(row, gumbel_topk(base[:1], 7, seed=3)[0])


# --------------------------------------------------------------------------------------
# API, validation, module
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,match", [
    (dict(k=10), r"k must be in \[0, L\] = \[0, 9\]"),
    (dict(k=-1), r"k must be in \[0, L\]"),
    (dict(k=torch.tensor([1, 2, 10])), r"k must be in \[0, L\] = \[0, 9\]"),
    (dict(k=torch.tensor([1, 2])), r"k tensor must have shape \[\] or \[B\] = \[3\]"),
    (dict(k=torch.tensor([1.0, 2.0, 3.0])), r"k must be an int or an integer tensor"),
    (dict(k=2.5), r"k must be an int"),
    (dict(tau=0.0), r"tau must be a finite real > 0"),
    (dict(tau=-1.0), r"tau must be a finite real > 0"),
    (dict(tau=float("inf")), r"tau must be a finite real > 0"),
    (dict(seed=-1), r"seed must be an int in \[0, 2\*\*64\)"),
    (dict(offset=2 ** 64), r"offset must be an int in \[0, 2\*\*64\)"),
    (dict(relaxation="gumbel"), r"relaxation must be one of"),
])
def test_bad_arguments_raise_value_error(backend, kwargs, match):
    call = dict(k=2, tau=1.0, seed=0, offset=0, backend=backend)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gumbel_topk(gumbel_logits(3, 9), **call)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_logits_raise_value_error(backend):
    for bad, match in [
        (torch.tensor(1.0), r"logits must be 1-D \[L\] or 2-D \[B, L\]"),
        (torch.zeros(2, 3, 4), r"logits must be 1-D \[L\] or 2-D \[B, L\]"),
        (torch.zeros(3, dtype=torch.int64), r"logits dtype must be one of float16, bfloat16"),
        (torch.zeros(2, 0), r"logits must have L >= 1"),
        (torch.tensor([[0.0, float("nan"), 1.0]]), r"logits must be finite"),
        (torch.tensor([[0.0, 1.0], [float("-inf"), 1.0]]), r"logits must be finite"),
        ([0.0, 1.0], r"logits must be a torch.Tensor"),
    ]:
        with pytest.raises(ValueError, match=match):
            gumbel_topk(bad, 1, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        gumbel_topk(torch.zeros(2, 3), 1, backend="cuda")


def test_module_noise_stream_and_annealing():
    logits = torch.nn.Parameter(gumbel_logits(1, 12, seed=2)[0])
    a, b = GumbelTopK(3, tau=2.0, tau_min=0.2, seed=5), GumbelTopK(3, tau=2.0, tau_min=0.2, seed=5)
    ma = [a(logits) for _ in range(4)]
    mb = [b(logits) for _ in range(4)]
    assert int(a.step) == 4 and "step" in a.state_dict()
    for x, y in zip(ma, mb, strict=True):  # deterministic given the seed
        assert torch.equal(x, y) and x.sum() == 3
    assert len({tuple(m.tolist()) for m in ma}) > 1  # fresh noise per call
    assert torch.equal(ma[2], gumbel_topk(logits, 3, tau=2.0, seed=5, offset=2))
    ma[0].sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # exponential schedule tau0 -> tau_min
    assert a.anneal(0, 100) == pytest.approx(2.0)
    assert a.anneal(50, 100) == pytest.approx(math.sqrt(2.0 * 0.2))
    assert a.anneal(100, 100) == pytest.approx(0.2) and a.anneal(500, 100) == pytest.approx(0.2)
    taus = [a.anneal(s, 10) for s in range(11)]
    assert all(t1 > t2 for t1, t2 in zip(taus, taus[1:], strict=False))
    a.set_tau(0.7)
    assert a.tau == 0.7
    with pytest.raises(ValueError, match="tau must be"):
        a.set_tau(0.0)
    with pytest.raises(ValueError, match="tau_min must be"):
        GumbelTopK(2, tau_min=-1.0)
    # eval: noiseless top-k, no step consumed
    a.eval()
    step = int(a.step)
    out = a(logits.detach(), return_indices=True)
    assert torch.equal(out.mask, topk_mask(logits.detach(), 3)) and int(a.step) == step
    assert torch.equal(out.indices, torch.sort(torch.topk(logits.detach(), 3).indices).values)
