"""Triton kernels on a real device against the fp64 reference, before any GPU benchmark.

    python bench/gpu_check.py [--device cuda] [--small] [--out PATH]

The CPU tests run Triton under TRITON_INTERPRET=1, which cannot see GPU-only faults (tensor
cores, bf16 `tl.dot`, autotuned block sizes, real parallelism). This script runs the same
checks on the device, with the case generators and accuracy rules of `e3kernels.testing`
(the CPU tests use the same):
  fused KD (`fused_kd_stats`, backend "triton"): per-token kl, teacher entropy, both
    log-sum-exps, ce, student_lse_t1 and the gradients wrt hs and Ws of
    sum(g_kl kl) + sum(g_ce ce), for ragged N, odd D, V not a multiple of any block,
    Ds != Dt, forward/reverse KL, T != 1, ignored labels, fp32/bf16/fp16:
    max|ours - truth| <= 2 max|ref - truth| + 1e-6 (1 + max|truth|), truth = fp64 reference,
    ref = reference at the input dtype.
  Gumbel-TopK (backend "triton" vs the reference): identical hard masks and indices (the
    noise is counter-based and bit-exact); relaxed scores and the straight-through gradient:
    fp32: error to the fp64 reference no worse than twice the fp32 reference's, + 2e-5;
    bf16/fp16: every element within c eps of the fp32-compute value, + atol (c = 1 soft,
    2 gradient; atol 1.6e-2 bf16, 2e-3 fp16).
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

from e3kernels.testing import (  # noqa: E402
    gumbel_accuracy,
    gumbel_k,
    gumbel_logits,
    gumbel_upstream,
    kd_accuracy,
    kd_case,
    kernel_outputs,
    reference_outputs,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

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


def kd_triton(case):
    """The fused KD op on Triton (the name the tests replace to check that a bad kernel fails)."""
    return kernel_outputs(case, "triton")


def check_kd(name, case, seed, device) -> dict:
    n, v, ds, dt, dtype, kl, temperature, compute_ce, ignore_every = case
    kd = kd_case(n, v, ds, dt, DTYPES[dtype], seed=seed, temperature=temperature, kl=kl,
                 compute_ce=compute_ce, ignore_every=ignore_every, device=device, name=name)
    t0 = time.time()
    ours = kd_triton(kd)
    truth = reference_outputs(kd, torch.float64)
    ref = reference_outputs(kd)
    errors = kd_accuracy(ours, ref, truth)
    return {"name": name, "case": dict(zip(("N", "V", "Ds", "Dt", "dtype", "kl", "T", "ce",
                                            "ignore_every"), case)),
            "errors": errors, "pass": all(e["pass"] for e in errors.values()),
            "seconds": time.time() - t0}


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
    return out.mask.detach(), indices, {"soft": out.soft.detach().double(),
                                        "grad": xi.grad.double()}


def check_gumbel(name, case, seed, device) -> dict:
    """Triton against the reference: the same hard mask as the fp32-compute reference, the
    same indices as the reference backend; soft values and the straight-through gradient by
    `e3kernels.testing.gumbel_accuracy`."""
    from e3kernels import gumbel_topk

    b, n, dtype, relaxation = case
    dt = DTYPES[dtype]
    x = gumbel_logits(b, n, dt, seed=seed, scale=2.0).to(device)
    k = gumbel_k(b, n, seed=seed).to(device)
    up = gumbel_upstream(b, n, seed=seed + 2).to(device)
    m_t, idx_t, ours = _gumbel_run(x, k, up, seed, relaxation, backend="triton")
    m_32, _, ref32 = _gumbel_run(x, k, up.float(), seed, relaxation, compute_dtype=torch.float32)
    idx_ref = gumbel_topk(x, k, tau=0.7, seed=seed, offset=3, relaxation=relaxation,
                          return_indices=True, backend="reference").indices
    truth = None
    if dt == torch.float32:
        _, _, truth = _gumbel_run(x.double(), k, up, seed, relaxation,
                                  compute_dtype=torch.float64)
    acc = gumbel_accuracy(ours, dt, truth=truth, ref32=ref32)
    res = {"mask_equal": bool(torch.equal(m_t, m_32)),
           "indices_equal": bool(torch.equal(idx_t, idx_ref)),
           "soft_err": acc["soft"]["err"], "soft_bound": acc["soft"]["bound"],
           "grad_err": acc["grad"]["err"], "grad_bound": acc["grad"]["bound"]}
    res["pass"] = (res["mask_equal"] and res["indices_equal"] and acc["soft"]["pass"]
                   and acc["grad"]["pass"])
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
