"""The kernels are dispatcher ops: `torch.compile(fullgraph=True)` traces a model plus the
fused KD loss / Gumbel-TopK and their backward on every CPU backend (C++, the plain-torch
reference, Triton under TRITON_INTERPRET=1) and gives the eager numbers; `opcheck` validates
each op's schema, fake kernel and autograd registration.

Tolerances: the compiled graph calls the same kernels as eager, but inductor fuses and reorders
the model's own fp32 ops (the MLP, the reduction of the per-token loss), so loss and gradients
agree to a few fp32 ulps of their scale: rtol 1e-5, atol 1e-6 (observed: <= 3e-8). The
Gumbel-TopK mask is compared exactly (it is a pure function of the logits and the noise).
"""

import pytest
import torch
from torch import nn

from e3kernels import GumbelTopK, fused_linear_kd_loss, gumbel_topk
from e3kernels.dispatch import available_backends
from e3kernels.ops.fused_kd.op import LaunchOptions
from e3kernels.ops.gumbel_topk.op import RELAX_ID, to_i64

BACKENDS = ("cpp", "reference", "triton")
D, V, N = 24, 70, 13  # ragged: no dimension a multiple of a tile


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _require(backend):
    assert backend in available_backends("cpu"), f"backend {backend} unavailable: the C++ module " \
        "must be built and TRITON_INTERPRET=1 set (tests/conftest.py)"


class TinyKD(nn.Module):
    """2-layer MLP: the teacher's hidden state is the first layer, the student's the second;
    both LM heads are parameters (the teacher's frozen)."""

    def __init__(self, backend, kl, compute_ce):
        super().__init__()
        self.l1, self.l2 = nn.Linear(D, D), nn.Linear(D, D)
        self.ws = nn.Parameter(torch.randn(V, D) * 0.3)
        self.wt = nn.Parameter(torch.randn(V, D) * 0.3, requires_grad=False)
        self.backend, self.kl, self.compute_ce = backend, kl, compute_ce

    def forward(self, x, labels):
        ht = torch.tanh(self.l1(x))
        hs = self.l2(ht)
        out = fused_linear_kd_loss(hs, self.ws, ht, self.wt, labels, temperature=2.0, kl=self.kl,
                                   compute_ce=self.compute_ce, backend=self.backend)
        return out.loss, out.kl


def _step(model, x, labels):
    model.zero_grad(set_to_none=True)
    loss, kl = model(x, labels)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()
             if p.requires_grad}
    return loss.detach(), kl.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl,compute_ce", [("forward", True), ("reverse", False)])
def test_fused_kd_fullgraph_matches_eager(backend, kl, compute_ce):
    _require(backend)
    torch.manual_seed(0)
    model = TinyKD(backend, kl, compute_ce)
    x = torch.randn(N, D)
    labels = torch.randint(0, V, (N,))
    labels[3] = -100
    loss_e, kl_e, grads_e = _step(model, x, labels)
    compiled = torch.compile(model, fullgraph=True)
    loss_c, kl_c, grads_c = _step(compiled, x, labels)
    assert loss_e.abs() > 0
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_c, kl_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() == {"l1.weight", "l1.bias", "l2.weight",
                                                "l2.bias", "ws"}
    for name in grads_e:
        assert grads_e[name].abs().max() > 0, name
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relaxation", ["softmax", "sigmoid"])
def test_gumbel_topk_fullgraph_matches_eager(backend, relaxation):
    _require(backend)
    torch.manual_seed(1)
    logits0 = torch.randn(5, 37)
    weight = torch.randn(5, 37)

    def f(logits):
        out = gumbel_topk(logits, 6, tau=0.7, seed=2**63 + 5, offset=3, relaxation=relaxation,
                          return_soft=True, backend=backend)
        return (out.mask * weight).sum() + (out.soft * weight).square().sum(), out.mask

    # inductor inlines the reference's integer-hash noise and k successive softmaxes into one
    # pointwise expression and takes minutes to lower it; aot_eager traces the same full graph
    # (forward and backward) and runs it op by op
    compiler = "aot_eager" if backend == "reference" else "inductor"
    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend=compiler)):
        logits = logits0.clone().requires_grad_(True)
        loss, mask = fn(logits)
        loss.backward()
        results.append((loss.detach(), mask.detach(), logits.grad))
    (le, me, ge), (lc, mc, gc) = results
    assert torch.equal(mc, me) and (me.sum(1) == 6).all()
    assert ge.abs().max() > 0
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_gumbel_module_fullgraph_draws_the_eager_stream(backend):
    _require(backend)
    logits = torch.randn(3, 29)
    eager, comp = GumbelTopK(4, tau=0.5, seed=7, backend=backend), \
        GumbelTopK(4, tau=0.5, seed=7, backend=backend)
    compiled = torch.compile(comp, fullgraph=True)
    for _ in range(3):  # a fresh offset per call, as in eager
        assert torch.equal(compiled(logits), eager(logits))
    assert int(comp.step) == int(eager.step) == 3


# ======================================================================================
# opcheck: schema, fake kernel, autograd registration, AOT dispatch of every op
# ======================================================================================

def _kd_inputs(dtype, labels=True):
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(9, 20, generator=g, dtype=dtype)
    ws = (torch.randn(50, 20, generator=g) * 0.3).to(dtype)
    ht = torch.randn(9, 12, generator=g, dtype=dtype)
    wt = (torch.randn(50, 12, generator=g) * 0.3).to(dtype)
    lab = torch.randint(0, 45, (9,), generator=g) if labels else None
    if labels:
        lab[2] = -100
    return hs, ws, ht, wt, lab


def _kd_op(backend, kind):
    name = f"fused_kd_{kind}" + ("_triton" if backend == "triton" else "")
    return getattr(torch.ops.e3kernels, name).default


def _launch(backend):
    return LaunchOptions().as_ints() if backend == "triton" else ()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compute_ce", [False, True])
def test_opcheck_fused_kd(backend, dtype, compute_ce):
    _require(backend)
    hs, ws, ht, wt, lab = _kd_inputs(dtype)
    fwd_args = (hs.requires_grad_(), ws.requires_grad_(), ht, wt, lab, 0.5, False, -100, 45,
                compute_ce, *_launch(backend))
    torch.library.opcheck(_kd_op(backend, "forward"), fwd_args)
    out = _kd_op(backend, "forward")(*fwd_args)
    g = torch.randn(9)
    bwd_args = (g, g.clone() if compute_ce else None, hs.detach(), ws.detach(), ht, wt, lab,
                out[2].detach(), out[3].detach(), out[0].detach(),
                out[5].detach() if compute_ce else None, 0.5, False, -100, 45, True,
                *_launch(backend))
    torch.library.opcheck(_kd_op(backend, "backward"), bwd_args)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("relaxation", ["softmax", "sigmoid"])
def test_opcheck_gumbel_topk(backend, relaxation):
    _require(backend)
    sfx = "_triton" if backend == "triton" else ""
    ops = torch.ops.e3kernels
    logits = torch.randn(4, 33, requires_grad=True)
    k_rows = torch.tensor([0, 5, 33, 7], dtype=torch.int32)
    fwd_args = (logits, k_rows, 0.8, to_i64(2**64 - 1), 11, RELAX_ID[relaxation], True, True, 33)
    fwd = getattr(ops, f"gumbel_topk_forward{sfx}").default
    torch.library.opcheck(fwd, fwd_args)
    piv = fwd(*fwd_args)[3]
    bwd_args = (logits.detach(), k_rows, piv if relaxation == "sigmoid" else None,
                torch.randn(4, 33), 0.8, to_i64(2**64 - 1), 11, RELAX_ID[relaxation], 33)
    torch.library.opcheck(getattr(ops, f"gumbel_topk_backward{sfx}").default, bwd_args)
    bits = torch.randint(0, 2**32, (3, 17), dtype=torch.int64)
    torch.library.opcheck(getattr(ops, f"gumbel_from_bits{sfx}").default, (bits,))
    noise_args = (3, 10, 5, 6) + ((torch.device("cpu"),) if backend == "triton" else ())
    torch.library.opcheck(getattr(ops, f"gumbel_noise{sfx}").default, noise_args)


def test_fake_tensor_shapes_without_compute():
    """FakeTensorMode propagates shapes and dtypes through the public functions."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hs, ws = torch.randn(2, 7, 16, dtype=torch.bfloat16), torch.randn(40, 16)
        ht, wt = torch.randn(2, 7, 8), torch.randn(40, 8)
        labels = torch.zeros(2, 7, dtype=torch.int64)
        out = fused_linear_kd_loss(hs, ws, ht, wt, labels, reduction="none", compute_ce=True,
                                   backend="cpp")
        assert out.loss.shape == (2, 7) and out.kl.dtype == torch.float32
        assert out.ce.shape == (2, 7)
        res = gumbel_topk(torch.randn(3, 20, dtype=torch.float16), 4, return_soft=True,
                          return_indices=True, backend="cpp")
        assert res.mask.shape == (3, 20) and res.mask.dtype == torch.float16
        assert res.indices.shape == (3, 4) and res.indices.dtype == torch.int64
