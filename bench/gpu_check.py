"""Triton kernels on a real device against the fp64 reference, before any GPU benchmark.

    python bench/gpu_check.py [--device cuda] [--small] [--out PATH]

The CPU tests run Triton under TRITON_INTERPRET=1, which cannot see GPU-only faults (tensor
cores, bf16 `tl.dot`, autotuned block sizes, real parallelism). This script runs the same
checks on the device, on fresh random inputs:
  fused KD (FusedLinearKDFunction, backend "triton"): per-token kl, teacher entropy, student
    log-sum-exp, ce and the gradients wrt hs and Ws of sum(g1 kl) + sum(g2 ce), for ragged N,
    odd D, V not a multiple of any block, Ds != Dt, forward/reverse KL, T != 1, ignored
    labels, fp32/bf16/fp16. Rule of tests/kernels/test_fused_kd.py: max|ours - truth| <=
    2 max|ref - truth| + 1e-6 (1 + max|truth|), truth = fp64 reference, ref = reference at the
    input dtype.
  Gumbel-TopK (backend "triton" vs the reference): identical hard masks and indices (the
    noise is counter-based and bit-exact); relaxed scores and the straight-through gradient
    by the rule of tests/kernels/test_gumbel_topk.py (fp32: error to the fp64 reference no
    worse than twice the fp32 reference's, + 2e-5; bf16/fp16: within the dtype's rounding of
    the fp32-compute values, + atol).
Writes JSON (device named, every case's errors and verdict) and exits 1 if any case fails.
--small: tiny shapes, for a CPU run under TRITON_INTERPRET=1 (what the test suite does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OUTPUTS = ("kl", "teacher_entropy", "student_lse", "ce", "grad_hs", "grad_ws")

# name: (N, V, Ds, Dt, dtype, kl, T, compute_ce, ignore_every)
KD_CASES = {
    "N1-V1000-fp32": (1, 1000, 63, 63, "fp32", "forward", 1.0, False, 0),
    "N300-V4097-Ds63-Dt40-fp32-ce": (300, 4097, 63, 40, "fp32", "forward", 0.7, True, 7),
    "N37-V4097-fp32-reverse": (37, 4097, 63, 63, "fp32", "reverse", 2.0, True, 5),
    "N300-V4097-bf16-ce": (300, 4097, 63, 63, "bf16", "forward", 1.5, True, 4),
    "N300-V4097-fp16": (300, 4097, 64, 64, "fp16", "forward", 1.0, False, 3),
    "N1000-V49152-D576-bf16": (1000, 49152, 576, 576, "bf16", "forward", 1.0, True, 11),
    "N2049-V151936-D1024-bf16": (2049, 151936, 1024, 1024, "bf16", "forward", 1.0, False, 0),
}
SMALL_KD_CASES = {
    "N1-V300-fp32": (1, 300, 17, 17, "fp32", "forward", 1.0, False, 0),
    "N37-V1000-Ds33-Dt20-fp32-ce": (37, 1000, 33, 20, "fp32", "reverse", 0.7, True, 5),
    "N37-V1000-bf16-ce": (37, 1000, 33, 33, "bf16", "forward", 1.5, True, 4),
}
# name: (B, L, dtype, relaxation)
GUMBEL_CASES = {f"B{b}-L{n}-{dt}-{rx}": (b, n, dt, rx) for b, n in ((1, 30), (37, 64), (4096, 80))
                for dt in ("fp32", "bf16") for rx in ("softmax", "sigmoid")}
SMALL_GUMBEL_CASES = {f"B{b}-L{n}-{dt}-softmax": (b, n, dt, "softmax")
                      for b, n in ((1, 30), (5, 17)) for dt in ("fp32", "bf16")}


def kd_inputs(n, v, ds, dt, dtype, ignore_every, seed, device):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, ds, generator=g)
    ws = torch.randn(v, ds, generator=g) * (2.0 / ds ** 0.5)
    ht = torch.randn(n, dt, generator=g)
    wt = torch.randn(v, dt, generator=g) * (2.0 / dt ** 0.5)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    g1, g2 = torch.rand(n, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(hs), cast(ws), cast(ht), cast(wt), labels.to(device), g1.to(device),
            g2.to(device))


def kd_reference(hs, ws, ht, wt, labels, g1, g2, *, kl, temperature, compute_ce, cd=None):
    from e3kernels.reference import fused_linear_kd_ref

    conv = (lambda t: t.to(cd)) if cd is not None else (lambda t: t)  # noqa: E731
    h, w = conv(hs).detach().requires_grad_(), conv(ws).detach().requires_grad_()
    out = fused_linear_kd_ref(h, w, conv(ht), conv(wt), labels, temperature=temperature, kl=kl,
                              compute_ce=compute_ce)
    loss = (out.kl * g1.to(out.kl.dtype)).sum()
    if compute_ce:
        loss = loss + (out.ce * g2.to(out.kl.dtype)).sum()
    loss.backward()
    return {"kl": out.kl, "teacher_entropy": out.teacher_entropy,
            "student_lse": out.student_lse, "ce": out.ce if compute_ce else None,
            "grad_hs": h.grad, "grad_ws": w.grad}


def kd_triton(hs, ws, ht, wt, labels, g1, g2, *, kl, temperature, compute_ce):
    from e3kernels.ops.fused_kd import FusedKDConfig, FusedLinearKDFunction, LaunchOptions

    h, w = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    cfg = FusedKDConfig(inv_temperature=1.0 / temperature, reverse=kl == "reverse",
                        ignore_index=-100, vocab_size=ws.shape[0], compute_ce=compute_ce,
                        backend="triton", launch=LaunchOptions())
    kl_i, ent, lse_s, _, ce, _ = FusedLinearKDFunction.apply(h, w, ht, wt, labels, cfg)
    loss = (kl_i * g1).sum()
    if compute_ce:
        loss = loss + (ce * g2).sum()
    loss.backward()
    return {"kl": kl_i, "teacher_entropy": ent, "student_lse": lse_s,
            "ce": ce if compute_ce else None, "grad_hs": h.grad, "grad_ws": w.grad}


def check_kd(name, case, seed, device) -> dict:
    n, v, ds, dt, dtype, kl, temperature, compute_ce, ignore_every = case
    inputs = kd_inputs(n, v, ds, dt, DTYPES[dtype], ignore_every, seed, device)
    kw = dict(kl=kl, temperature=temperature, compute_ce=compute_ce)
    t0 = time.time()
    ours = kd_triton(*inputs, **kw)
    truth = kd_reference(*inputs, cd=torch.float64, **kw)
    ref = kd_reference(*inputs, **kw)
    errors, ok = {}, True
    for key in OUTPUTS:
        if truth[key] is None:
            continue
        t, o, r = truth[key].double(), ours[key].double(), ref[key].double()
        err_o, err_r = (o - t).abs().max().item(), (r - t).abs().max().item()
        bound = 2 * err_r + 1e-6 * (1 + t.abs().max().item())
        passed = bool(torch.isfinite(o).all().item()) and o.shape == t.shape and err_o <= bound
        errors[key] = {"ours": err_o, "reference": err_r, "bound": bound, "pass": passed}
        ok &= passed
    return {"name": name, "case": dict(zip(("N", "V", "Ds", "Dt", "dtype", "kl", "T", "ce",
                                            "ignore_every"), case)),
            "errors": errors, "pass": ok, "seconds": time.time() - t0}


ATOL = {"fp32": 2e-5, "fp16": 2e-3, "bf16": 1.6e-2}  # tests/kernels/test_gumbel_topk.py


def _gumbel_run(x, k, up, seed, relaxation, backend=None, compute_dtype=None):
    from e3kernels import gumbel_topk
    from e3kernels.reference import gumbel_topk_ref

    xi = x.detach().clone().requires_grad_()
    if backend is None:
        out = gumbel_topk_ref(xi, k, 0.7, seed, 3, relaxation, compute_dtype=compute_dtype)
        indices = None
    else:
        out = gumbel_topk(xi, k, tau=0.7, seed=seed, offset=3, relaxation=relaxation,
                          return_soft=True, return_indices=True, backend=backend)
        indices = out.indices
    (out.mask.to(up.dtype) * up).sum().backward()
    return out.mask.detach(), indices, out.soft.detach().double(), xi.grad.double()


def check_gumbel(name, case, seed, device) -> dict:
    """Triton against the reference: same hard mask as the fp32-compute reference; soft
    values and straight-through gradient within the rule of the CPU tests (fp32: no worse
    than twice the fp32 reference's error to fp64, + atol; bf16/fp16: within the dtype's
    rounding of the fp32-compute values)."""
    from e3kernels import gumbel_topk

    b, n, dtype, relaxation = case
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, n, generator=g) * 2).to(device=device, dtype=DTYPES[dtype])
    k = torch.randint(0, n + 1, (b,), generator=g).to(device)
    up = torch.randn(b, n, generator=g, dtype=torch.float64).to(device)
    m_t, idx_t, s_t, g_t = _gumbel_run(x, k, up, seed, relaxation, backend="triton")
    m_32, _, s_32, g_32 = _gumbel_run(x, k, up.float(), seed, relaxation,
                                      compute_dtype=torch.float32)
    idx_ref = gumbel_topk(x, k, tau=0.7, seed=seed, offset=3, relaxation=relaxation,
                          return_indices=True, backend="reference").indices
    atol = ATOL[dtype]
    if dtype == "fp32":
        _, _, s_64, g_64 = _gumbel_run(x.double(), k, up, seed, relaxation,
                                       compute_dtype=torch.float64)
        err = {"soft": ((s_t - s_64).abs().max().item(), 2 * (s_32 - s_64).abs().max().item() + atol),
               "grad": ((g_t - g_64).abs().max().item(), 2 * (g_32 - g_64).abs().max().item() + atol)}
    else:
        eps = torch.finfo(DTYPES[dtype]).eps
        err = {"soft": ((s_t - s_32).abs().max().item(), eps * s_32.abs().max().item() + atol),
               "grad": ((g_t - g_32).abs().max().item(), 2 * eps * g_32.abs().max().item() + atol)}
    res = {"mask_equal": bool(torch.equal(m_t, m_32)),
           "indices_equal": bool(torch.equal(idx_t, idx_ref)),
           "soft_err": err["soft"][0], "soft_bound": err["soft"][1],
           "grad_err": err["grad"][0], "grad_bound": err["grad"][1]}
    res["pass"] = (res["mask_equal"] and res["indices_equal"] and err["soft"][0] <= err["soft"][1]
                   and err["grad"][0] <= err["grad"][1])
    return {"name": name, "case": dict(zip(("B", "L", "dtype", "relaxation"), case)), **res}


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from common import cpu_name

    return f"{cpu_name()} (Triton interpreter)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU interpreter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON (default bench/results/gpu_check_<dev>.json)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    kd_cases = SMALL_KD_CASES if a.small else KD_CASES
    gumbel_cases = SMALL_GUMBEL_CASES if a.small else GUMBEL_CASES
    rows = {"fused_kd": [], "gumbel_topk": []}
    for i, (name, case) in enumerate(kd_cases.items()):
        rows["fused_kd"].append(check_kd(name, case, a.seed + i, device))
        print(f"fused_kd    {name:<30} {'ok' if rows['fused_kd'][-1]['pass'] else 'FAIL'}",
              flush=True)
    for i, (name, case) in enumerate(gumbel_cases.items()):
        rows["gumbel_topk"].append(check_gumbel(name, case, a.seed + 100 + i, device))
        print(f"gumbel_topk {name:<30} {'ok' if rows['gumbel_topk'][-1]['pass'] else 'FAIL'}",
              flush=True)
    ok = all(r["pass"] for group in rows.values() for r in group)
    out = Path(a.out or ROOT / f"bench/results/gpu_check_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_label(device), "torch": torch.__version__,
                               "small": a.small, "pass": ok, **rows}, indent=2))
    print(f"{'all passed' if ok else 'FAILURES'}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
