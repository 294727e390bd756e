"""Import path kept for users: the fused KD loss lives in `e3kernels.ops.fused_kd.functional`."""

from e3kernels.ops.fused_kd.functional import *  # noqa: F401,F403
from e3kernels.ops.fused_kd.functional import (  # noqa: F401
    DEFAULT_WEIGHT_CLIP,
    KL_DIRECTIONS,
    REDUCTIONS,
    TEMPERATURE_RANGE,
    WEIGHTINGS,
    KDLossOutput,
)
