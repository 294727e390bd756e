"""e3kernels: fused kernels for layer pruning and distillation. Knows nothing of models.

Public API (each op dispatches CUDA -> Triton, CPU -> C++ (e3kernels._C), else the
plain-PyTorch reference; see `e3kernels.dispatch`).
"""

from e3kernels.dispatch import available_backends, cpp_extension, resolve_backend

__all__ = ["available_backends", "cpp_extension", "resolve_backend"]

# --- gumbel-topk exports (issue 3) ---
# --- fused-kd exports (issue 4) ---
