"""Choose the backend of an op: CUDA -> Triton, CPU -> C++ (e3kernels._C), else reference.

`backend` is always an explicit argument of the public ops ("auto" by default); nothing
here reads configuration deep inside the code. The one environment fact we look at is
Triton's own `TRITON_INTERPRET=1` (it must be set before `import triton`), which is what
makes Triton kernels runnable on CPU tensors for tests.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cpp", "reference")


@lru_cache(maxsize=1)
def _load_cpp() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("e3kernels._C"), ""
    except ImportError as err:
        return None, str(err)


def cpp_extension() -> ModuleType | None:
    """The compiled C++ module, or None when it was not built."""
    return _load_cpp()[0]


def cpp_import_error() -> str:
    return _load_cpp()[1]


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter_active() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    out = ["reference"]
    if device.type == "cuda" and triton_importable():
        out.append("triton")
    if device.type == "cpu":
        if cpp_extension() is not None:
            out.append("cpp")
        if triton_importable() and triton_interpreter_active():
            out.append("triton")
    return out


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def resolve_backend(device: torch.device | str, backend: str = "auto") -> str:
    """Return the backend that will run an op on `device` ("triton", "cpp" or "reference").

    Raises ValueError when an explicitly requested backend cannot run there.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    avail = available_backends(device)
    if backend == "auto":
        if device.type == "cuda":
            if "triton" in avail:
                return "triton"
            _warn_once("cuda-no-triton", "triton is not importable: CUDA ops use the "
                       "slow PyTorch reference. `pip install triton`.")
            return "reference"
        if device.type == "cpu":
            if "cpp" in avail:
                return "cpp"
            _warn_once("cpu-no-cpp", "e3kernels._C (C++ CPU kernels) is not built "
                       f"({cpp_import_error()}): CPU ops use the slow PyTorch reference. "
                       "Rebuild with `pip install --no-build-isolation -e .`.")
        return "reference"
    if backend not in avail:
        hint = {
            "triton": ("on CPU tensors Triton needs TRITON_INTERPRET=1 set before "
                       "`import triton`" if device.type == "cpu" else "`pip install triton`"),
            "cpp": ("the C++ kernels run on CPU tensors only" if device.type != "cpu" else
                    f"e3kernels._C is not built ({cpp_import_error()}); "
                    "`pip install --no-build-isolation -e .`"),
        }.get(backend, "")
        raise ValueError(f"backend {backend!r} is not available on device {device}: {hint}. "
                         f"Available here: {avail}.")
    return backend
