"""Fused linear KD loss, one op in four layers (the same layout as `e3kernels.ops.gumbel_topk`):

* `triton_kernels` - Triton kernels and launchers (imported only when a Triton op runs)
* `cpp`            - the C++ dispatcher ops torch.ops.e3kernels.fused_kd_* (csrc/fused_kd.cpp)
* `op`             - custom ops for Triton, fakes and the autograd formula for both backends
* `functional`     - `fused_linear_kd_loss`, `FusedLinearKDLoss` and the top-K (offline
                     teacher cache) loss, whose plain-torch pieces are in `topk`
"""

from e3kernels.ops.fused_kd.op import (
    SUPPORTED_DTYPES,
    FusedKDConfig,
    FusedKDStats,
    LaunchOptions,
    fused_kd_stats,
)

__all__ = ["SUPPORTED_DTYPES", "FusedKDConfig", "FusedKDStats", "LaunchOptions",
           "fused_kd_stats"]
