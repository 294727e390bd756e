"""Benchmark the fused linear KD loss (forward + backward): ours vs eager vs Liger-Kernel.

    python bench/bench_fused_kd.py [--quick] [--repeats R] [--methods e3,eager,liger] [--out PATH]

Methods, timed in the same run on the same device (each case in a fresh subprocess, so that
peak memory is the case's own):
  e3     CPU: e3kernels.fused_linear_kd_loss(..., backend="cpp") (the C++ kernel; falls back to a
         minimal autograd wrapper around e3kernels._C if the public API is missing).
         CUDA: e3kernels.fused_linear_kd_loss(..., backend="triton").
  eager  torch eager, materialized logits in fp32: z = (h @ W^T).float() / T, F.log_softmax,
         F.kl_div(log_target=True) summed over the vocabulary, mean over tokens.
  liger  Liger-Kernel's chunked distillation loss, LigerFusedLinearJSDLoss(beta=0) = forward
         KL(p_t || p_s), weight_hard_loss=0 (chunk_size=1024; torch.compile on CUDA only). If it
         is not installed or cannot run here, the JSON records why.
  floor  the GEMM floor: the four bare N x V x D products (hs Ws^T, ht Wt^T, dz Ws, dz^T hs)
         with torch.mm in the input dtype; each method's time is also reported as a multiple
         of it (`<method>_over_floor`; `e3_over_floor_executed` counts the fused backward's
         two recomputed logit GEMMs).
All use T = 1, forward KL, no labels ignored, student head trainable (grad for hs and ws), the
teacher frozen. Loss scalings differ (mean vs per-token normalization) but not the work.

Sizes: CPU  N in {1024, 4096}, V in {49152, 151936}, D in {576, 1024}, fp32 (Ds = Dt = D).
       CUDA N in {1024, 8192}, V = 151936, D = 4096, bf16.
       --quick: CPU N=1024, V=49152, D=576; CUDA N=1024.
Cases whose estimated peak memory exceeds --mem-budget-gb (default: 70% of the available
memory, GPU memory on CUDA) are skipped and recorded as such.

Reported per case: fwd+bwd wall time (min over --repeats runs after a warm-up), then from one
more run the peak memory growth over the inputs, gradients included (CPU: resident-set
high-water mark via /proc/self/clear_refs + VmHWM; CUDA: torch.cuda.max_memory_allocated),
CPU seconds of the timed run (steadier than wall time when other jobs share the machine; the
1-minute load average at the start of each case is recorded too), TFLOP/s. FLOP count, stated: "model" FLOPs = forward 2 N V (Ds + Dt) (student + teacher logits)
+ backward 4 N V Ds (grad_h and grad_W of the student) -- the same count for every method, so
the TFLOP/s compare directly; the fused kernel also recomputes both logit GEMMs in its
backward, so it EXECUTES 4 N V (Ds + Dt) + 4 N V Ds ("executed" TFLOP/s, e3 only).
Ratios (eager / e3, liger / e3) come from the same run.
JSON: bench/results/fused_kd_<cpu|cuda-XXXX>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    device_info,
    fmt_bytes,
    mem_available_bytes,
    mmap_large_allocations,
    peak_memory,
    result_path,
    run_worker,
    sync,
    write_result,
)

CPU_CASES = [(n, v, d) for n in (1024, 4096) for v in (49152, 151936) for d in (576, 1024)]
CPU_QUICK = [(1024, 49152, 576)]
CUDA_CASES = [(1024, 151936, 4096), (8192, 151936, 4096)]
CUDA_QUICK = [(1024, 151936, 4096)]
METHODS = ("e3", "eager", "liger", "floor")
TARGET_CASE = (4096, 49152, 576)  # CPU target: >= 1.5x faster, >= 10x less peak memory than eager
LIGER_CHUNK = 1024


# ------------------------------------------------------------------------------------------
# The three losses: each returns a scalar; hs / ws require grad, ht / wt do not.
# ------------------------------------------------------------------------------------------
def _eager_loss(hs, ws, ht, wt, temperature):
    zs = (hs @ ws.T).float() / temperature
    with torch.no_grad():
        zt = (ht @ wt.T).float() / temperature
    kl = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), reduction="none",
                  log_target=True).sum(-1)
    return kl.mean()


def _e3_loss_fn(dev: torch.device):
    backend = "triton" if dev.type == "cuda" else "cpp"
    try:
        from e3kernels import fused_linear_kd_loss
    except ImportError:
        fused_linear_kd_loss = None
    if fused_linear_kd_loss is not None:
        def loss(hs, ws, ht, wt, temperature):
            return fused_linear_kd_loss(hs, ws, ht, wt, temperature=temperature, weighting="none",
                                        backend=backend).loss
        return loss, f"e3kernels.fused_linear_kd_loss(backend={backend!r}, weighting='none')"
    if dev.type == "cuda":
        raise RuntimeError("e3kernels.fused_linear_kd_loss is not available (needed for Triton)")
    from e3kernels.dispatch import cpp_extension
    C = cpp_extension()
    if C is None or not hasattr(C, "fused_kd_forward"):
        raise RuntimeError("e3kernels._C has no fused_kd_forward: build with tools/build_cpp.sh")

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hs, ws, ht, wt, temperature):
            none = torch.empty(0, dtype=torch.long)
            kl, _, lse_s, lse_t, _, _ = C.fused_kd_forward(hs, ws, ht, wt, none, 1.0 / temperature,
                                                           False, -100, ws.shape[0], False)
            ctx.save_for_backward(hs, ws, ht, wt, lse_s, lse_t, kl)
            ctx.inv_t = 1.0 / temperature
            return kl

        @staticmethod
        def backward(ctx, g):
            hs, ws, ht, wt, lse_s, lse_t, kl = ctx.saved_tensors
            none = torch.empty(0)
            dhs, dws = C.fused_kd_backward(g.float().contiguous(), none, hs, ws, ht, wt,
                                           none.long(), lse_s, lse_t, kl, none, ctx.inv_t, False,
                                           -100, ws.shape[0], True)
            return dhs, dws.to(ws.dtype), None, None, None

    def loss(hs, ws, ht, wt, temperature):
        return _Fn.apply(hs, ws, ht, wt, temperature).mean()
    return loss, "local autograd.Function over e3kernels._C (public API not importable)"


def _liger_loss_fn(dev: torch.device):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    compiled = dev.type == "cuda"
    mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                  temperature=1.0, compiled=compiled, chunk_size=LIGER_CHUNK)
    labels_cache: dict = {}

    def loss(hs, ws, ht, wt, temperature):
        mod.temperature = temperature
        n = hs.shape[0]
        if n not in labels_cache:
            labels_cache[n] = torch.randint(0, ws.shape[0], (n,), device=hs.device)
        return mod(hs, ws, ht, wt, labels_cache[n])
    import importlib.metadata as md
    return loss, (f"liger_kernel {md.version('liger-kernel')} LigerFusedLinearJSDLoss(beta=0, "
                  f"weight_hard_loss=0, chunk_size={LIGER_CHUNK}, compiled={compiled})")


def _floor_gemms(hs, ws, ht, wt, temperature):
    """The GEMM floor: the four [N, V, D] products every method must do, bare torch.mm in
    the input dtype, nothing else: z_s = hs Ws^T, z_t = ht Wt^T (forward), then with a dense
    dz [N, V] (z_s stands in for it) grad_hs = dz Ws and grad_ws = dz^T hs, stored as the
    inputs' .grad like a loss's backward would. Returns a scalar whose backward does nothing."""
    with torch.no_grad():
        zs = hs @ ws.T
        zt = ht @ wt.T
        hs.grad = zs @ ws
        ws.grad = zs.T @ hs
    return (zt[0, 0] + zs[0, 0]).float().requires_grad_()


def _make_loss(method: str, dev: torch.device):
    if method == "floor":
        return _floor_gemms, ("bare torch.mm GEMM floor: hs Ws^T, ht Wt^T, dz Ws, dz^T hs in "
                              "the input dtype (the work of every method; no softmax, no KL)")
    if method == "e3":
        return _e3_loss_fn(dev)
    if method == "eager":
        return _eager_loss, "torch eager: fp32 logits, F.log_softmax + F.kl_div(log_target=True)"
    if method == "liger":
        return _liger_loss_fn(dev)
    raise ValueError(method)


# ------------------------------------------------------------------------------------------
# Memory estimates (to skip cases that cannot fit) and FLOP counts
# ------------------------------------------------------------------------------------------
def _estimate_peak_bytes(method: str, n: int, v: int, d: int, itemsize: int) -> int:
    grads = (n * d + v * d) * 4
    if method == "eager":
        # logits + log-softmaxes + the KL's elementwise intermediates and their gradients
        return 8 * n * v * 4 + grads
    if method == "liger":
        return 8 * min(n, LIGER_CHUNK) * v * 4 + 2 * grads
    if method == "floor":
        return 2 * n * v * itemsize + grads
    return grads + 64 * 2**20


def _flops(n: int, v: int, ds: int, dt: int) -> dict:
    fwd = 2 * n * v * (ds + dt)
    bwd = 4 * n * v * ds
    return {"model": fwd + bwd, "executed_fused": 2 * fwd + bwd}


# ------------------------------------------------------------------------------------------
# Worker: one method on one case in this process; prints one JSON line.
# ------------------------------------------------------------------------------------------
def worker(args) -> dict:
    dev = torch.device(args.device)
    if dev.type == "cpu":
        # Every >= 64 KiB block gets fresh mmap'd pages for the whole worker, so that heap memory
        # kept from the warm-up / timed runs cannot hide allocations of the memory run.
        mmap_large_allocations()
    dtype = getattr(torch, args.dtype)
    n, v, d = args.n, args.v, args.d
    res: dict = {"method": args.method, "N": n, "V": v, "Ds": d, "Dt": d, "dtype": args.dtype}
    try:
        loss_fn, impl = _make_loss(args.method, dev)
    except Exception as err:  # noqa: BLE001 - recorded, not fatal
        res["error"] = f"unavailable: {type(err).__name__}: {err}"
        return res
    res["impl"] = impl
    res["threads"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):  # other processes on the machine skew CPU timings
        res["loadavg_1m_start"] = os.getloadavg()[0]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)

    hs = rand(n, d).requires_grad_()
    ws = rand(v, d, scale=1.0 / math.sqrt(d)).requires_grad_()
    ht = rand(n, d)
    wt = rand(v, d, scale=1.0 / math.sqrt(d))
    T = args.temperature

    def step(h=hs, ww=ws, hh=ht, wwt=wt):
        loss = loss_fn(h, ww, hh, wwt, T)
        loss.backward()
        return loss

    def clear():
        hs.grad = None
        ws.grad = None

    try:
        # Warm-up on a small slice (thread pools, BLAS, Triton JIT / torch.compile).
        nw = min(n, 128 if dev.type == "cpu" else n)
        hw = hs.detach()[:nw].clone().requires_grad_()
        step(hw, ws, ht[:nw], wt)
        sync(dev)
        if dev.type == "cuda":
            step()  # full-size warm-up: autotuning / compile for this shape
            sync(dev)
        clear()
        del hw
        times, cpu_times = [], []
        for _ in range(args.repeats):
            clear()
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            sync(dev)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        # Last, the memory run: peak growth over the inputs, INCLUDING the fp32 gradients
        # hs.grad and ws.grad that every method returns (also reported without them).
        clear()
        with peak_memory(dev) as mem:
            c0, t0 = time.process_time(), time.perf_counter()
            loss = step()
            sync(dev)
            mem_run_s = time.perf_counter() - t0
            mem_run_cpu_s = time.process_time() - c0
        grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in (hs, ws))
        # cpu_time_s: CPU seconds of all threads in the fastest timed run; on a machine shared
        # with other jobs it is the steadier measure of the work (wall time is what users see).
        best = min(range(len(times)), key=times.__getitem__) if times else None
        res.update(time_s=times[best] if times else mem_run_s, times_s=times,
                   cpu_time_s=cpu_times[best] if times else mem_run_cpu_s,
                   mem_run_time_s=mem_run_s,
                   peak_mem_bytes=mem["peak_delta_bytes"], mem_method=mem["method"],
                   grad_bytes=grad_bytes,
                   peak_mem_beyond_grads_bytes=max(0, mem["peak_delta_bytes"] - grad_bytes),
                   loss=float(loss.detach()))
        if hasattr(os, "getloadavg"):
            res["loadavg_1m_end"] = os.getloadavg()[0]
        fl = _flops(n, v, d, d)
        res["tflops_model"] = fl["model"] / res["time_s"] / 1e12
        if args.method == "floor":
            res["loss"] = None  # not a loss: the GEMMs only
        if args.method == "e3":
            res["tflops_executed"] = fl["executed_fused"] / res["time_s"] / 1e12
    except Exception as err:  # noqa: BLE001
        msg = f"{type(err).__name__}: {err}"
        res["error"] = msg.splitlines()[0][:500] if msg else type(err).__name__
        res["traceback_tail"] = traceback.format_exc().splitlines()[-4:]
    return res


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------
def _device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


def _liger_status() -> dict:
    try:
        import importlib.metadata as md
        ver = md.version("liger-kernel")
    except Exception:  # noqa: BLE001
        return {"installed": False,
                "why": "liger-kernel is not installed (`pip install liger-kernel --no-deps`)"}
    return {"installed": True, "version": ver}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="one small case")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs after the cold one (default: CPU 1, CUDA 5)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dtype", default=None, help="default: CPU float32, CUDA bfloat16")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--mem-budget-gb", type=float, default=None,
                    help="skip cases whose estimated peak exceeds this (default 70%% of available)")
    ap.add_argument("--cases", default=None, help="explicit cases 'N,V,D;N,V,D' (overrides sizes)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per-case worker timeout (s)")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--v", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--d", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    dev = _device(args.device)
    args.dtype = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if args.repeats is None:
        args.repeats = 5 if dev.type == "cuda" else 1
    if args.worker:
        args.device = str(dev)
        print(json.dumps(worker(args)), flush=True)
        return

    if args.cases:
        cases = [tuple(int(x) for x in c.split(",")) for c in args.cases.split(";") if c]
    elif dev.type == "cuda":
        cases = CUDA_QUICK if args.quick else CUDA_CASES
    else:
        cases = CPU_QUICK if args.quick else CPU_CASES
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    itemsize = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    if args.mem_budget_gb is not None:
        budget = args.mem_budget_gb * 2**30
    elif dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        budget = 0.7 * free
    else:
        budget = 0.7 * (mem_available_bytes() or 8 * 2**30)

    info = device_info(dev)
    payload = {
        "benchmark": "fused linear KD loss, forward + backward",
        "device_info": info,
        "dtype": args.dtype,
        "temperature": args.temperature,
        "repeats": args.repeats,
        "mem_budget_bytes": int(budget),
        "flop_count": "model = 2*N*V*(Ds+Dt) fwd + 4*N*V*Ds bwd (all methods); "
                      "executed_fused = model + 2*N*V*(Ds+Dt) recompute in the fused backward",
        "liger": _liger_status(),
        "results": [],
        "summary": [],
    }
    out_path = Path(args.out) if args.out else result_path("fused_kd", dev)
    print(f"device: {info['device_name']} ({dev}), torch {info['torch']}, "
          f"threads {info['torch_threads']}, dtype {args.dtype}; budget {fmt_bytes(budget)}")
    for (n, v, d) in cases:
        row = {}
        for m in methods:
            est = _estimate_peak_bytes(m, n, v, d, itemsize)
            if est > budget:
                r = {"method": m, "N": n, "V": v, "Ds": d, "Dt": d, "dtype": args.dtype,
                     "skipped": f"estimated peak {fmt_bytes(est)} > budget {fmt_bytes(budget)}"}
            else:
                wargs = ["--worker", "--device", str(dev), "--method", m, "--n", str(n),
                         "--v", str(v), "--d", str(d), "--dtype", args.dtype,
                         "--repeats", str(args.repeats), "--temperature", str(args.temperature)]
                t0 = time.perf_counter()
                r = run_worker(Path(__file__), wargs, timeout=args.timeout)
                r.setdefault("method", m)
                r.update(N=n, V=v, Ds=d, Dt=d, wall_case_s=round(time.perf_counter() - t0, 1))
            payload["results"].append(r)
            row[m] = r
            status = r.get("error") or r.get("skipped")
            if status:
                print(f"  N={n:5d} V={v:6d} D={d:4d} {m:5s}: {status}")
            else:
                print(f"  N={n:5d} V={v:6d} D={d:4d} {m:5s}: {r['time_s']:8.3f} s "
                      f"(cpu {r['cpu_time_s']:7.2f} s, load {r.get('loadavg_1m_start', -1):.1f})  "
                      f"peak {fmt_bytes(r['peak_mem_bytes']):>10s} "
                      f"({fmt_bytes(r['peak_mem_beyond_grads_bytes'])} beyond grads)  "
                      f"{r['tflops_model'] * 1e3:7.1f} GFLOP/s (model)", flush=True)
        e3 = row.get("e3", {})
        summ = {"N": n, "V": v, "D": d}
        for m in methods:
            if m in ("e3", "floor"):
                continue
            o = row.get(m, {})
            if "time_s" in e3 and "time_s" in o:
                summ[f"speedup_vs_{m}"] = o["time_s"] / e3["time_s"]
                if dev.type == "cpu":
                    summ[f"cpu_time_ratio_vs_{m}"] = o["cpu_time_s"] / e3["cpu_time_s"]
                summ[f"mem_ratio_vs_{m}"] = (o["peak_mem_bytes"] / e3["peak_mem_bytes"]
                                             if e3["peak_mem_bytes"] > 0 else math.inf)
                summ[f"mem_beyond_grads_ratio_vs_{m}"] = (
                    o["peak_mem_beyond_grads_bytes"] / e3["peak_mem_beyond_grads_bytes"]
                    if e3["peak_mem_beyond_grads_bytes"] > 0 else math.inf)
        fl = row.get("floor", {})
        if "time_s" in fl:
            # the kernel's time as a multiple of the bare GEMMs; "executed" counts the two
            # logit GEMMs the fused backward recomputes (1.5x the floor's work for Ds = Dt)
            ex = _flops(n, v, d, d)
            for m in methods:
                if m != "floor" and "time_s" in row.get(m, {}):
                    summ[f"{m}_over_floor"] = row[m]["time_s"] / fl["time_s"]
            if "time_s" in e3:
                summ["e3_over_floor_executed"] = e3["time_s"] / (
                    fl["time_s"] * ex["executed_fused"] / ex["model"])
        if dev.type == "cpu" and (n, v, d) == TARGET_CASE and "speedup_vs_eager" in summ:
            summ["target"] = {"speedup_ge_1.5": summ["speedup_vs_eager"] >= 1.5,
                              "cpu_time_ratio_ge_1.5": summ["cpu_time_ratio_vs_eager"] >= 1.5,
                              "mem_ratio_ge_10": summ["mem_ratio_vs_eager"] >= 10}
        payload["summary"].append(summ)
        write_result("fused_kd", dev, payload, out_path)  # partial results survive a crash
    print("\nsummary (ratios = other / e3; > 1 means e3 is faster / smaller):")
    for s in payload["summary"]:
        parts = [f"{k}={v:.2f}" for k, v in s.items() if isinstance(v, float)]
        print(f"  N={s['N']} V={s['V']} D={s['D']}: " + ", ".join(parts)
              + (f"  target: {s['target']}" if "target" in s else ""))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
