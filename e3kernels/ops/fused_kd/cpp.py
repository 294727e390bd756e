"""The C++ side of the fused KD op: the dispatcher ops that e3kernels._C registers
(csrc/fused_kd.cpp) and their availability. Importing e3kernels._C registers them."""

from __future__ import annotations

from e3kernels.dispatch import cpp_extension, cpp_ops_registered

OPS = ("fused_kd_forward", "fused_kd_backward")


_HAS: bool | None = None  # found once (a module global: torch.compile reads it as a constant)


def has_fused_kd() -> bool:
    """True when e3kernels._C is built and registered torch.ops.e3kernels.fused_kd_*."""
    global _HAS
    if _HAS is None:
        _HAS = cpp_ops_registered(OPS)
    return _HAS



def require_fused_kd() -> None:
    if not has_fused_kd():
        raise RuntimeError("e3kernels._C has no fused_kd_forward/fused_kd_backward ops: rebuild "
                           "with `pip install --no-build-isolation -e .`")


def kernel_info() -> dict:
    """Tile sizes and GEMM routes of the C++ kernel (e3kernels._C.fused_kd_info)."""
    return cpp_extension().fused_kd_info()
