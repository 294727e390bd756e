"""Benchmark Gumbel-TopK forward+backward: kernel backend vs the torch reference.

    python bench/bench_gumbel_topk.py [--reps N] [--k K] [--threads T] [--out PATH]

On a CUDA machine it times the Triton kernels against the reference on the GPU; otherwise
the C++ (e3kernels._C) kernels against the reference on the CPU. Shapes B x L in
{1 x 64, 4096 x 64, 65536 x 64}, k = L / 4, tau = 0.5, both relaxations. Writes JSON to
bench/results/gumbel_topk_<cpu|cuda>.json naming the device; ratios come from the same run.
--threads sets torch's intra-op threads, which the C++ kernels share (same OpenMP runtime);
on a CPU shared with other jobs, --threads 1 gives the steadiest comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import cpu_name  # noqa: E402

import e3kernels  # noqa: E402
from e3kernels import gumbel_topk  # noqa: E402

SHAPES = [(1, 64), (4096, 64), (65536, 64)]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev: torch.device, reps: int, min_time: float = 0.3) -> dict:
    fn()  # warm-up (JIT compile, caches)
    times = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start < min_time and len(times) < 50):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "reps": len(times)}


def _count_launches(fn, dev: torch.device) -> dict | None:
    """Kernels launched by one fwd+bwd call whose name says gumbel_topk (CUDA only)."""
    if dev.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(dev)
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    ours = [n for n in names if "gumbel_topk" in n]
    return {"gumbel_topk_kernels": len(ours), "all_cuda_kernels": len(names),
            "names": sorted(set(ours))}


def _call(x, k, gout, relaxation, backend):
    """One forward (+ backward when gout is given) of gumbel_topk as a closure."""
    def fn():
        if gout is None:
            with torch.no_grad():
                gumbel_topk(x, k, tau=0.5, seed=1234, offset=7, relaxation=relaxation,
                            backend=backend)
            return
        m = gumbel_topk(x, k, tau=0.5, seed=1234, offset=7, relaxation=relaxation,
                        backend=backend)
        torch.autograd.backward(m, gout)
        x.grad = None
    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--k", type=int, default=None, help="k per row (default L // 4)")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP CPU threads")
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # also the OpenMP threads of e3kernels._C

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "triton" if dev.type == "cuda" else "cpp"
    info = {
        "op": "gumbel_topk forward+backward",
        "device_type": dev.type,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "backend": backend,
        "baseline": "reference (e3kernels.reference.gumbel_topk_ref, autograd)",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dev.type == "cpu":
        ext = e3kernels.cpp_extension()
        info["cpp_build"] = dict(ext.build_info()) if ext is not None else None
    print(json.dumps(info, indent=1), flush=True)

    results = []
    gen = torch.Generator().manual_seed(0)
    for relaxation in ("softmax", "sigmoid"):
        for b, n in SHAPES:
            k = args.k if args.k is not None else n // 4
            x = torch.randn(b, n, generator=gen).to(dev).requires_grad_()
            gout = torch.randn(b, n, generator=gen).to(dev)
            row = {"relaxation": relaxation, "B": b, "L": n, "k": k, "tau": 0.5}
            for name, be in (("kernel", backend), ("reference", "reference")):
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)
                row[f"{name}_fwd_bwd"] = _time(_call(x, k, gout, relaxation, be), dev, args.reps)
                if dev.type == "cuda":
                    row[f"{name}_peak_mem_bytes"] = torch.cuda.max_memory_allocated(dev) - base
                row[f"{name}_fwd"] = _time(_call(x, k, None, relaxation, be), dev, args.reps)
            row["speedup_fwd_bwd"] = (row["reference_fwd_bwd"]["median_ms"]
                                      / row["kernel_fwd_bwd"]["median_ms"])
            row["speedup_fwd"] = row["reference_fwd"]["median_ms"] / row["kernel_fwd"]["median_ms"]
            # min over repetitions: the least disturbed estimate on a shared machine
            row["speedup_fwd_bwd_min"] = (row["reference_fwd_bwd"]["min_ms"]
                                          / row["kernel_fwd_bwd"]["min_ms"])
            if dev.type == "cuda":
                row["launches"] = _count_launches(_call(x, k, gout, relaxation, backend), dev)
            results.append(row)
            print(f"{relaxation:8s} {b:6d} x {n:3d} k={k:3d}  {backend}: "
                  f"{row['kernel_fwd_bwd']['median_ms']:9.3f} ms  reference: "
                  f"{row['reference_fwd_bwd']['median_ms']:9.3f} ms  "
                  f"speedup {row['speedup_fwd_bwd']:6.2f}x (min/min {row['speedup_fwd_bwd_min']:.2f}x, "
                  f"fwd only {row['speedup_fwd']:.2f}x)",
                  flush=True)

    tag = dev.type if args.threads is None or dev.type == "cuda" else f"cpu_{args.threads}thread"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gumbel_topk_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "results": results}, indent=1) + "\n")
    print(f"wrote {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
