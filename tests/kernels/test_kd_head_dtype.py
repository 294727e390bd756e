"""A head of another dtype than its hidden states: the kernels cast it per tile (no copy of the
[V, D] head), which must give exactly the numbers of casting the head first, and the gradient of
the head comes back in the head's own dtype (an fp32 head gets the fp32 kernel gradient, not a
bf16 rounding of it)."""

import pytest
import torch

from e3kernels import fused_linear_kd_loss
from e3kernels.dispatch import cpp_extension

PAIRS = [  # (hidden states dtype, head dtype)
    (torch.bfloat16, torch.float32),  # autocast: bf16 activations, fp32 parameters
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float16),
    (torch.float16, torch.bfloat16),
]
IDS = ["h-bf16-w-fp32", "h-fp32-w-bf16", "h-fp16-w-fp32", "h-bf16-w-fp16", "h-fp16-w-bf16"]


def _inputs(n, v, ds, dt, seed):
    g = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(n, ds, generator=g), torch.randn(n, dt, generator=g)
    ws, wt = torch.randn(v, ds, generator=g) * 0.2, torch.randn(v, dt, generator=g) * 0.2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return hs, ws, ht, wt, labels


def _run(hs, ws, ht, wt, labels, backend, **kw):
    hs, ws = hs.detach().requires_grad_(), ws.detach().requires_grad_()
    out = fused_linear_kd_loss(hs, ws, ht, wt, labels, temperature=1.5, compute_ce=True,
                               ce_weight=0.3, backend=backend, **kw)
    g = torch.Generator().manual_seed(7)
    (out.loss + (out.kl * torch.rand(out.kl.shape, generator=g)).sum()).backward()
    return out, hs.grad, ws.grad


def _assert_cast_inside_equals_cast_first(h_dt, w_dt, backend, n, v, ds, dt):
    hs, ws, ht, wt, labels = _inputs(n, v, ds, dt, seed=n + v)
    hs, ht, ws, wt = hs.to(h_dt), ht.to(h_dt), ws.to(w_dt), wt.to(w_dt)
    out, g_hs, g_ws = _run(hs, ws, ht, wt, labels, backend)
    first, g_hs_first, g_ws_first = _run(hs, ws.to(h_dt), ht, wt.to(h_dt), labels, backend)
    for name in ("loss", "kl", "teacher_entropy", "ce"):
        a, b = getattr(out, name), getattr(first, name)
        assert torch.equal(a, b), f"{name} differs ({backend}, h {h_dt}, w {w_dt})"
    assert torch.equal(g_hs, g_hs_first), f"grad hs differs ({backend}, h {h_dt}, w {w_dt})"
    assert g_ws.dtype == w_dt, g_ws.dtype
    # the head's gradient in the head's dtype. An fp32 head gets the kernel's fp32 gradient,
    # which casting first would have rounded to h_dt; any other head, the cast's gradient.
    if w_dt == torch.float32:
        assert torch.equal(g_ws.to(h_dt), g_ws_first), f"grad ws ({backend}, h {h_dt})"
    else:
        assert torch.equal(g_ws, g_ws_first.to(w_dt)), f"grad ws ({backend}, h {h_dt}, w {w_dt})"
    assert torch.isfinite(g_ws).all() and g_ws.abs().sum() > 0


@pytest.mark.parametrize("dtypes", PAIRS, ids=IDS)
@pytest.mark.parametrize("shape", [(37, 700, 64, 48), (300, 1537, 63, 80)], ids=["small", "ragged"])
def test_cpp_head_cast_per_tile(bf16_route, dtypes, shape):
    _assert_cast_inside_equals_cast_first(*dtypes, "cpp", *shape)


@pytest.mark.parametrize("dtypes", PAIRS[:3], ids=IDS[:3])
def test_triton_head_cast_per_tile(dtypes):
    pytest.importorskip("triton")  # (runs in the interpreter: TRITON_INTERPRET=1, tests/conftest.py)
    _assert_cast_inside_equals_cast_first(*dtypes, "triton", 19, 300, 32, 24)


def test_no_head_copy_on_the_hot_path(monkeypatch):
    """An fp32 head with bf16 hidden states reaches the C++ op as the parameter itself."""
    if cpp_extension() is None:
        pytest.skip("e3kernels._C is not built")
    import e3kernels.ops.fused_kd.functional as functional

    seen = []
    real = functional.fused_kd_stats

    def spy(hs, ws, ht, wt, labels, cfg):
        seen.append((ws.data_ptr(), wt.data_ptr(), ws.dtype))
        return real(hs, ws, ht, wt, labels, cfg)

    monkeypatch.setattr(functional, "fused_kd_stats", spy)
    hs, ws, ht, _, labels = _inputs(16, 500, 32, 32, seed=3)
    w = ws.requires_grad_()
    out = fused_linear_kd_loss(hs.bfloat16().requires_grad_(), w, ht.bfloat16(), w, labels,
                               compute_ce=True, backend="cpp")
    out.loss.backward()
    assert seen == [(w.data_ptr(), w.data_ptr(), torch.float32)]
    assert w.grad.dtype == torch.float32
