"""Choose the backend of an op: CUDA -> Triton, CPU -> C++ (e3kernels._C), else reference.

`backend` is always an explicit argument of the public ops ("auto" by default); nothing
here reads configuration deep inside the code. The one environment fact we look at is
Triton's own `TRITON_INTERPRET=1` (it must be set before `import triton`), which is what
makes Triton kernels runnable on CPU tensors for tests.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cpp", "reference")


# Facts about the install, found once and kept in module globals (not lru_cache / importlib
# calls) so that torch.compile traces `resolve_backend` as plain Python on constants.
_CPP: tuple[ModuleType | None, str] | None = None
_TRITON: bool | None = None
_INTERPRET: bool | None = None


def _load_cpp() -> tuple[ModuleType | None, str]:
    global _CPP
    if _CPP is None:
        try:
            _CPP = importlib.import_module("e3kernels._C"), ""
        except ImportError as err:
            _CPP = None, str(err)
    return _CPP


def cpp_extension() -> ModuleType | None:
    """The compiled C++ module (importing it registers the torch.ops.e3kernels C++ ops), or
    None when it was not built."""
    return _load_cpp()[0]


def cpp_ops_registered(names) -> bool:
    """True when e3kernels._C is built and has CPU kernels for torch.ops.e3kernels.<name>."""
    if cpp_extension() is None:
        return False
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"e3kernels::{name}", "CPU")
                   for name in names)
    except RuntimeError:  # an older build: the ops do not exist
        return False


def cpp_import_error() -> str:
    return _load_cpp()[1]


def triton_importable() -> bool:
    """True when triton is installed (found without importing it)."""
    global _TRITON
    if _TRITON is None:
        _TRITON = importlib.util.find_spec("triton") is not None
    return _TRITON


def triton_interpreter_active() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1 before import; read
    once, as Triton does)."""
    global _INTERPRET
    if _INTERPRET is None:
        _INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _INTERPRET


def _init() -> None:
    """Resolve the install facts now (at import of the ops), never inside a traced function."""
    _load_cpp()
    triton_importable()
    triton_interpreter_active()


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
