"""Gumbel-TopK with a straight-through gradient, one op in four layers (the same layout as
`e3kernels.ops.fused_kd`): `triton_kernels` (Triton kernels + launchers, imported only when a
Triton op runs), `cpp` (the C++ dispatcher ops, csrc/gumbel_topk.cpp), `op` (custom ops for
Triton, fakes and the autograd formula) and `functional` (`gumbel_topk`, `GumbelTopK`).

Semantics (defined by `e3kernels.reference.gumbel_topk_ref`, matched by every backend), for
logits alpha [B, L], k (int or [B]) in [0, L], tau > 0:

    g[r, c] = -log(-log(u)),  u = (2 (x >> 9) + 1) 2^-24,
    x = Philox4x32-10(counter = (c >> 2, r, offset_lo, offset_hi), key = (seed_lo, seed_hi))[c & 3]
    z = alpha + g,  y = z / tau,  m = top-k of z per row (ties -> lower column index)
    "softmax" (default, successive softmax / relaxed top-k):
        a^0 = y,  p^j = softmax(a^{j-1}),  a^j = a^{j-1} + log(max(1 - p^j, 2^-126)) / tau,
        s = sum_{j<=k} p^j  (Xie & Ermon 2019: the penalty accumulates on the unscaled z, so
        s -> m as tau -> 0; 1 - p of a unique row max is computed as (sum of the other exps)/Z);
        s = 1 if k = L. sum(s) = k but single s_i may exceed 1 (more so for tau > 1).
    "sigmoid": s = sigmoid(y - t), t = (y_(k) + y_(k+1)) / 2 (k-th and (k+1)-th largest y,
        differentiable through those two entries); s = 0 if k = 0, s = 1 if k = L
    output m_st = m + s - stopgrad(s): forward value exactly m (k ones per row),
    backward d alpha = J_s(y)^T (d m_st + d s) / tau.

The noise is computed in fp32 with IEEE +, -, * only (log by a fixed Cephes polynomial, no
FMA: Triton is launched with enable_fp_fusion=False) so the mask is bit-identical on the
reference, C++ and Triton. z is fp32 (fp64 for fp64 logits); y and s use the same dtype.

Backward: regenerates the noise from (seed, offset) instead of saving it. Saved for
backward: the logits (already held by autograd: the mask-search alpha is a leaf), k per row
([B] int32) and, for "sigmoid", the two pivot columns ([B, 2] int32). No [B, L] activation
is kept; Philox + two logs per element cost less than writing and re-reading y on a GPU.
"softmax" backward re-runs the k-step recursion; the Triton kernel keeps nothing in memory
and recomputes p^j for each reverse step (O(k^2 L) per row), the C++ kernel stores the k
steps of one row in a per-thread scratch (O(k L)).
"""

from e3kernels.ops.gumbel_topk.functional import (
    MAX_TRITON_L,
    GumbelTopK,
    GumbelTopKOutput,
    gumbel_from_bits,
    gumbel_noise,
    gumbel_topk,
    topk_mask,
)

__all__ = ["MAX_TRITON_L", "GumbelTopK", "GumbelTopKOutput", "gumbel_from_bits", "gumbel_noise",
           "gumbel_topk", "topk_mask"]
