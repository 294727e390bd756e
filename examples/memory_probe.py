"""Peak-memory probe shared by the examples (not part of the package API)."""

from __future__ import annotations

from pathlib import Path

import torch


def _mmap_large_allocations() -> None:
    """glibc: serve allocations >= 64 KiB with fresh mmap'd pages, so that memory the heap
    kept from earlier steps cannot hide an allocation from the resident-set high-water mark."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_bytes(fn, device) -> int | None:
    """Peak memory growth while fn() runs: CUDA allocator stats, or the Linux resident-set
    high-water mark (reset through /proc/self/clear_refs). None where neither is available."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    try:
        _mmap_large_allocations()
        Path("/proc/self/clear_refs").write_text("5")
        base = status("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return status("VmHWM") - base
