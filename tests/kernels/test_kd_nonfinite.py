"""Non-finite inputs and the temperature range of the public KD losses (issue 14, items 6, 7).

Contract (docs in e3kernels/kd_loss.py): a NaN/inf in hs, ht, ws[:V] or wt[:V] makes the loss
NaN on every backend; the affected tokens report NaN kl / entropy / ce (every token when a head
is non-finite), the other tokens keep their clean values, and every gradient is NaN. The
temperature is accepted in TEMPERATURE_RANGE only, where each backend matches fp64.
"""

from __future__ import annotations

import math

import pytest
import torch

from e3kernels import (
    FusedLinearKDLoss,
    fused_linear_kd_loss,
    fused_linear_kd_loss_topk,
    teacher_topk,
)
from e3kernels.dispatch import available_backends
from e3kernels.kd_loss import TEMPERATURE_RANGE

BACKENDS = [b for b in ("reference", "cpp", "triton") if b in available_backends("cpu")]


def _case(seed, n=13, d=24, v=150, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d, generator=g)
    ws = torch.randn(v, d, generator=g) * (scale / d ** 0.5)
    ht = hs + 0.5 * torch.randn(n, d, generator=g)
    wt = ws + 0.3 * torch.randn(v, d, generator=g) * (scale / d ** 0.5)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return [t.to(dtype) for t in (hs, ws, ht, wt)] + [labels]


def _run(backend, hs, ws, ht, wt, labels, **kw):
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    out = fused_linear_kd_loss(h, w, ht, wt, labels, backend=backend, compute_ce=True,
                               ce_weight=0.3, **kw)
    out.loss.backward()
    return out, h.grad, w.grad


# where the bad value goes: (tensor index in the case, row, column); None row = a head
SPOTS = {
    "nan in ht": (2, 4, 3, float("nan")),
    "inf in hs": (0, 7, 1, float("inf")),
    "-inf in ht": (2, 0, 5, float("-inf")),
    "nan in an ignored token's hs": (0, 5, 2, float("nan")),  # labels[5] == -100
    "nan in ws": (1, 17, 4, float("nan")),
    "inf in wt": (3, 99, 0, float("inf")),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spot", list(SPOTS), ids=list(SPOTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_input_gives_nan_loss_and_grads_on_every_backend(backend, spot, dtype):
    case = _case(11, dtype=dtype)
    clean, _, _ = _run(backend, *case)
    which, row, col, val = SPOTS[spot]
    bad_case = [t.clone() for t in case]
    bad_case[which][row, col] = val
    out, g_hs, g_ws = _run(backend, *bad_case)
    assert math.isnan(out.loss.item())
    head = which in (1, 3)
    bad_tokens = torch.ones(13, dtype=torch.bool) if head else \
        torch.arange(13) == row
    for name in ("kl", "teacher_entropy", "ce"):
        got, ref = getattr(out, name), getattr(clean, name)
        assert torch.isnan(got[bad_tokens]).all(), f"{name}: bad tokens must read NaN"
        assert torch.isfinite(got[~bad_tokens]).all(), f"{name}: good tokens must stay finite"
        torch.testing.assert_close(got[~bad_tokens], ref[~bad_tokens], rtol=0, atol=0)
    assert torch.isnan(g_hs).all() and torch.isnan(g_ws).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_input_keeps_finite_grads(backend):
    out, g_hs, g_ws = _run(backend, *_case(3))
    assert math.isfinite(out.loss.item())
    assert torch.isfinite(g_hs).all() and torch.isfinite(g_ws).all()
    assert g_hs.abs().sum() > 0 and g_ws.abs().sum() > 0


def test_nonfinite_gives_nan_in_topk_loss_but_neg_inf_logprobs_are_allowed():
    hs, ws, ht, wt, labels = _case(5)
    ids, lp = teacher_topk(ht, wt, 8)
    lp = lp.clone()
    lp[2, -1] = float("-inf")  # a token outside the support: legitimate
    h = hs.clone().requires_grad_()
    out = fused_linear_kd_loss_topk(h, ws, ids, lp, labels)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and torch.isfinite(h.grad).all()
    for which, val in (("hs", float("nan")), ("lp", float("nan")), ("lp", float("inf"))):
        h2, lp2 = hs.clone(), lp.clone()
        (h2 if which == "hs" else lp2)[6, 1] = val
        h2.requires_grad_()
        out = fused_linear_kd_loss_topk(h2, ws, ids, lp2, labels)
        out.loss.backward()
        assert math.isnan(out.loss.item()), (which, val)
        assert torch.isnan(out.kl[6]) and torch.isfinite(out.kl[7]), (which, val)
        assert torch.isnan(h2.grad).all(), (which, val)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [TEMPERATURE_RANGE[0], 1.0, TEMPERATURE_RANGE[1]],
                         ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_range_matches_fp64(backend, temperature, kl):
    """Worst case for cancellation: small logits (scale 0.3) and a student close to the
    teacher, so T^2 KL is a small difference of large terms."""
    for scale in (0.3, 2.0):
        hs, ws, ht, wt, labels = _case(7, n=24, d=32, v=700, scale=scale)
        kw = dict(temperature=temperature, kl=kl, weighting="none")
        truth = fused_linear_kd_loss(hs.double(), ws.double(), ht.double(), wt.double(), labels,
                                     backend="reference", **kw).loss.item()
        got = fused_linear_kd_loss(hs, ws, ht, wt, labels, backend=backend, **kw).loss.item()
        assert abs(got - truth) <= 3e-3 * abs(truth) + 1e-7, (scale, got, truth)


@pytest.mark.parametrize("temperature", [5e-4, 20.5, 1e4, 1e6, 1e30])
def test_temperature_outside_verified_range_is_rejected(temperature):
    hs, ws, ht, wt, labels = _case(1)
    msg = "temperature must be in"
    with pytest.raises(ValueError, match=msg):
        fused_linear_kd_loss(hs, ws, ht, wt, labels, temperature=temperature)
    with pytest.raises(ValueError, match=msg):
        FusedLinearKDLoss(temperature=temperature)
    ids, lp = teacher_topk(ht, wt, 4)
    with pytest.raises(ValueError, match=msg):
        fused_linear_kd_loss_topk(hs, ws, ids, lp, labels, temperature=temperature)


@pytest.mark.parametrize("ce_weight", [-5.0, -1e-9, float("nan"), True])
def test_negative_or_bad_ce_weight_is_rejected(ce_weight):
    hs, ws, ht, wt, labels = _case(1)
    with pytest.raises(ValueError, match="ce_weight must be a finite number >= 0"):
        fused_linear_kd_loss(hs, ws, ht, wt, labels, compute_ce=True, ce_weight=ce_weight)
