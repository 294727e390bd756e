"""The C++ side of Gumbel-TopK: the dispatcher ops that e3kernels._C registers
(csrc/gumbel_topk.cpp) and their availability. Importing e3kernels._C registers them."""

from __future__ import annotations

from e3kernels.dispatch import cpp_ops_registered

OPS = ("gumbel_topk_forward", "gumbel_topk_backward", "gumbel_from_bits")


_HAS: bool | None = None  # found once (a module global: torch.compile reads it as a constant)


def has_gumbel_topk() -> bool:
    """True when e3kernels._C is built and registered torch.ops.e3kernels.gumbel_*."""
    global _HAS
    if _HAS is None:
        _HAS = cpp_ops_registered(OPS)
    return _HAS



def require_gumbel_topk() -> None:
    if not has_gumbel_topk():
        raise RuntimeError("e3kernels._C has no gumbel_topk ops: rebuild the extension "
                           "(`tools/build_cpp.sh` or `pip install --no-build-isolation -e .`)")
