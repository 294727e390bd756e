"""e3kernels: fused kernels for layer pruning and distillation. Knows nothing of models.

Public API (each op dispatches CUDA -> Triton, CPU -> C++ (e3kernels._C), else the
plain-PyTorch reference; see `e3kernels.dispatch`):

* `gumbel_topk`, `GumbelTopK`: straight-through Gumbel-TopK masks (docs/gumbel_topk.md)
* `fused_linear_kd_loss`, `FusedLinearKDLoss`, `teacher_topk`, `fused_linear_kd_loss_topk`:
  entropy-weighted KD from hidden states and LM heads, never materializing [N, V]
  (docs/fused_kd.md, docs/fused_kd_cpp.md)
"""

from e3kernels.dispatch import available_backends, cpp_extension, resolve_backend
from e3kernels.kd_loss import (
    FusedLinearKDLoss,
    KDLossOutput,
    fused_linear_kd_loss,
    fused_linear_kd_loss_topk,
    kd_token_weights,
    teacher_topk,
)
from e3kernels.ops.gumbel_topk import (
    GumbelTopK,
    GumbelTopKOutput,
    gumbel_noise,
    gumbel_topk,
    topk_mask,
)

__all__ = [
    "FusedLinearKDLoss", "GumbelTopK", "GumbelTopKOutput", "KDLossOutput",
    "available_backends", "cpp_extension", "fused_linear_kd_loss", "fused_linear_kd_loss_topk",
    "gumbel_noise", "gumbel_topk", "kd_token_weights", "resolve_backend", "teacher_topk",
    "topk_mask",
]
