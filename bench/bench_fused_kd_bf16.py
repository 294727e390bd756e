"""The C++ fused KD kernel on bf16 inputs: bf16 GEMM route vs fp32 route, whole kernel.

    python bench/bench_fused_kd_bf16.py [--ns 1024,4096] [--v 49152] [--d 576] [--threads 2]
                                        [--repeats 2] [--rounds 2] [--out PATH]

Calls e3kernels._C.fused_kd_forward / fused_kd_backward directly (no autograd, no Python-side
reductions) on bf16 hs, ws, ht, wt (Ds = Dt = D, T = 1, forward KL, no labels, grad_ws
requested) and times, for each N, the forward alone and forward + backward, once with the bf16
GEMM route (oneDNN brgemm, bf16 x bf16 -> fp32: `fused_kd_set_bf16_gemm(True)`) and once with
the fp32 route (`fused_kd_set_bf16_gemm(False)`: bf16 rows converted to fp32, MKL sgemm, the
kernel's only route before the bf16 one). The two routes alternate within each round so that
load from other processes hits both alike. Per (route, N, pass): min wall time over all timed
runs, and the CPU seconds (process time, steadier on a shared machine) of that run; the
1-minute load average is recorded. Executed GFLOP per CPU second uses 4 N V D (forward: two
logit GEMMs) and 12 N V D (forward + backward: forward, recompute, grad_h and grad_W).
JSON: bench/results/fused_kd_bf16_gemm_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from e3kernels.dispatch import cpp_extension  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="1024,4096")
    ap.add_argument("--v", type=int, default=49152)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per round (after a warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fused_kd_bf16_gemm_cpu.json")
    a = ap.parse_args()

    C = cpp_extension()
    if C is None or not hasattr(C, "fused_kd_set_bf16_gemm"):
        raise SystemExit("e3kernels._C lacks fused_kd_set_bf16_gemm: rebuild (tools/build_cpp.sh)")
    torch.set_num_threads(a.threads)
    prev = C.fused_kd_set_bf16_gemm(True)
    route = C.fused_kd_info()["gemm_bf16"]
    if not route.startswith("cpublas::brgemm"):
        raise SystemExit(f"no bf16 GEMM route on this machine: {route}")

    V, D = a.v, a.d
    none = torch.empty(0, dtype=torch.long)
    best: dict = {}
    loads = []
    for rnd in range(a.rounds):
        for n in map(int, a.ns.split(",")):
            g = torch.Generator().manual_seed(n)
            hs = torch.randn(n, D, generator=g).bfloat16()
            ht = torch.randn(n, D, generator=g).bfloat16()
            ws = (torch.randn(V, D, generator=g) * (3.0 / D ** 0.5)).bfloat16()
            wt = (torch.randn(V, D, generator=g) * (3.0 / D ** 0.5)).bfloat16()
            gkl = torch.ones(n)

            def fwd():
                return C.fused_kd_forward(hs, ws, ht, wt, none, 1.0, False, -100, V, False)

            def fwd_bwd():
                o = fwd()
                return C.fused_kd_backward(gkl, torch.empty(0), hs, ws, ht, wt, none, o[2], o[3],
                                           o[0], o[5], 1.0, False, -100, V, True)

            for bf16 in (False, True):
                C.fused_kd_set_bf16_gemm(bf16)
                for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    fn()  # warm-up (and the brgemm kernels' JIT)
                    for _ in range(a.repeats):
                        loads.append(os.getloadavg()[0])
                        t0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                        key = ("bf16" if bf16 else "fp32", n, name)
                        if key not in best or wall < best[key][0]:
                            best[key] = (wall, cpu)
                    r = best[("bf16" if bf16 else "fp32", n, name)]
                    print(f"round {rnd} N={n} {name:8s} {'bf16' if bf16 else 'fp32'} route: "
                          f"best wall {r[0]:.3f} s, cpu {r[1]:.3f} s (load {loads[-1]:.1f})",
                          flush=True)
    C.fused_kd_set_bf16_gemm(prev)

    rows = []
    for n in map(int, a.ns.split(",")):
        for name, units in (("fwd", 4), ("fwd+bwd", 12)):
            gflop = units * n * V * D / 1e9
            f32, b16 = best[("fp32", n, name)], best[("bf16", n, name)]
            rows.append({
                "N": n, "V": V, "D": D, "pass": name, "executed_gflop": round(gflop, 1),
                "fp32_route": {"wall_s": round(f32[0], 3), "cpu_s": round(f32[1], 3),
                               "gflop_per_cpu_s": round(gflop / f32[1], 1)},
                "bf16_route": {"wall_s": round(b16[0], 3), "cpu_s": round(b16[1], 3),
                               "gflop_per_cpu_s": round(gflop / b16[1], 1)},
                "speedup_wall": round(f32[0] / b16[0], 2), "speedup_cpu": round(f32[1] / b16[1], 2),
            })
    info = {k: str(v) for k, v in C.fused_kd_info().items()}
    payload = {
        "what": "e3kernels._C fused KD, bf16 inputs: bf16 GEMM route vs fp32 route",
        "method": __doc__.strip(),
        "threads": a.threads, "repeats_per_round": a.repeats, "rounds": a.rounds,
        "kernel_info": info, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "load1_min_max": [round(min(loads), 2), round(max(loads), 2)],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(payload, indent=2) + "\n")
    for r in rows:
        print(f"N={r['N']} {r['pass']:8s} fp32 {r['fp32_route']['wall_s']:.2f} s "
              f"({r['fp32_route']['cpu_s']:.2f} cpu) -> bf16 {r['bf16_route']['wall_s']:.2f} s "
              f"({r['bf16_route']['cpu_s']:.2f} cpu): {r['speedup_wall']}x wall, "
              f"{r['speedup_cpu']}x cpu")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
