"""Small shared helpers for the benchmark scripts: device facts, timing, peak memory, JSON.

Nothing here knows about a particular op. Typical use:

    from common import device_info, time_fn, cpu_peak_rss, cuda_peak, write_result

    info = device_info(dev)                      # device name, CPU model, versions, threads
    t = time_fn(fn, dev, repeats=3)              # {"min_s", "median_s", "times_s", ...}
    with cpu_peak_rss() as mem: fn()             # mem["peak_delta_bytes"] (Linux: VmHWM reset)
    with cuda_peak(dev) as mem: fn()             # mem["peak_delta_bytes"] (max_memory_allocated)
    write_result("fused_kd", info, payload)      # bench/results/fused_kd_<device>.json

CPU peak memory is the process's resident-set high-water mark (VmHWM) after resetting it
through /proc/self/clear_refs, minus the RSS when the block starts. Run each case in a fresh
process (`run_worker`) so that memory the allocator kept from an earlier case does not hide
a later case's peak. Where VmHWM cannot be reset, ru_maxrss is used and `exact` is False.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from e3pruner.hardware import cpu_name  # noqa: E402,F401 (re-exported)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------
# Device facts
# ------------------------------------------------------------------------------------------
def native_amp() -> str | None:
    """bf16 where this CPU runs it natively, else None (fp32): what `--amp auto` picks."""
    from e3pruner.amp import resolve_amp

    return None if resolve_amp("auto") == "none" else "bf16"


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_name()


def device_slug(dev: torch.device) -> str:
    """Short file-name-safe tag: 'cpu' or e.g. 'cuda-h100' (from the GPU name)."""
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev).lower()
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)  # h100, a100, l40s, h200, b200...
    tag = m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"cuda-{tag}"


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001 - absent or odd metadata: report None
        return None


def device_info(dev: torch.device) -> dict:
    info = {
        "device": str(dev),
        "device_name": device_name(dev),
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1m_5m_15m"] = [round(x, 2) for x in os.getloadavg()]
    if dev.type == "cuda":
        info["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(dev)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    try:
        from e3kernels.dispatch import cpp_extension
        ext = cpp_extension()
        if ext is not None and hasattr(ext, "build_info"):
            info["e3kernels_C"] = dict(ext.build_info())
    except Exception:  # noqa: BLE001 - the benchmark still runs without the extension
        pass
    return info


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(fn, dev: torch.device, repeats: int = 3, warmup: int = 1) -> dict:
    """Wall time of fn() (synchronized on CUDA): min / median over `repeats` runs."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(max(1, repeats)):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times), "times_s": times,
            "repeats": len(times), "warmup": warmup}


# ------------------------------------------------------------------------------------------
# Peak memory
# ------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def mmap_large_allocations(threshold: int = 64 * 1024) -> bool:
    """glibc only: serve allocations >= threshold with fresh mmap'd pages (M_MMAP_THRESHOLD),
    so that heap memory kept from earlier work cannot hide an allocation from VmHWM."""
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)) == 1
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def cpu_peak_rss():
    """Peak resident memory growth inside the block, in bytes (dict filled on exit)."""
    out: dict = {}
    exact = False
    mmap_large_allocations()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        exact = _status_kib("VmHWM") is not None
    except OSError:
        pass
    base_kib = _status_kib("VmRSS")
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        yield out
    finally:
        if exact and base_kib is not None:
            peak_kib = _status_kib("VmHWM")
            out["peak_delta_bytes"] = max(0, (peak_kib - base_kib) * 1024)
        else:  # ru_maxrss (KiB on Linux) never resets: only growth past the old maximum shows
            out["peak_delta_bytes"] = max(
                0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_maxrss) * 1024)
        out["exact"] = exact
        out["method"] = "VmHWM after clear_refs" if exact else "ru_maxrss growth"


@contextlib.contextmanager
def cuda_peak(dev: torch.device):
    """Peak torch.cuda.max_memory_allocated growth inside the block, in bytes."""
    out: dict = {}
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    try:
        yield out
    finally:
        torch.cuda.synchronize(dev)
        out["peak_delta_bytes"] = torch.cuda.max_memory_allocated(dev) - base
        out["exact"] = True
        out["method"] = "torch.cuda.max_memory_allocated"


@contextlib.contextmanager
def peak_memory(dev: torch.device):
    ctx = cuda_peak(dev) if dev.type == "cuda" else cpu_peak_rss()
    with ctx as out:
        yield out


# ------------------------------------------------------------------------------------------
# Worker subprocesses and results
# ------------------------------------------------------------------------------------------
def run_worker(script: str | Path, args: list[str], timeout: float | None = None,
               env: dict | None = None) -> dict:
    """Run `python script *args` in a fresh process; it must print one JSON object as its last
    stdout line. Returns that object, or {"error": ...} when the worker fails."""
    cmd = [sys.executable, str(script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-6:]
        return {"error": f"worker exit {proc.returncode}: " + " | ".join(tail)}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": "worker printed no JSON: " + lines[-1][:300]}


def result_path(name: str, dev: torch.device, out_dir: Path | None = None) -> Path:
    return (out_dir or RESULTS_DIR) / f"{name}_{device_slug(dev)}.json"


def write_result(name: str, dev: torch.device, payload: dict, path: Path | None = None) -> Path:
    path = Path(path) if path is not None else result_path(name, dev)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
