"""Statistics for telling methods apart: mean and spread over seeds, paired differences.

A paired comparison looks at the same items under two methods (held-out windows, zero-shot
items), d_i = a_i - b_i, i = 1..n:
  mean d = (1/n) sum d_i,  stderr = std(d) / sqrt(n),
  a percentile-bootstrap confidence interval of mean d (resampling items, seeded), and
  an exact two-sided sign test over the nonzero d_i.
"Outside the noise" means the interval excludes 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std" (sample, ddof 1; None for one value), "n", "values"}."""
    x = [float(v) for v in values]
    if not x:
        raise ValueError("mean_std needs at least one value")
    mean = sum(x) / len(x)
    std = (math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1)) if len(x) > 1 else None)
    return {"mean": mean, "std": std, "n": len(x), "values": x}


def sign_test(diffs: Sequence[float]) -> float:
    """Exact two-sided sign-test p-value of the nonzero `diffs` (1.0 when all are zero)."""
    pos = sum(1 for d in diffs if d > 0)
    neg = sum(1 for d in diffs if d < 0)
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95,
                      resamples: int = 10_000, seed: int = 0,
                      weights: Sequence[float] | None = None) -> dict:
    """Paired comparison of per-item values a_i and b_i of the same n items.

    weights: optional per-item weights (e.g. tokens per window): the mean is then
    sum w_i d_i / sum w_i, and the bootstrap resamples items with their weights.
    Returns {"mean_diff", "stderr", "ci": [lo, hi], "confidence", "n", "p_sign",
    "verdict": "a<b" | "a>b" | "tie"} (a verdict other than tie: the interval excludes 0).
    """
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_.ndim != 1 or a_.shape != b_.shape:
        raise ValueError(f"paired values need two 1-D sequences of one length, got shapes "
                         f"{a_.shape} and {b_.shape}")
    n = a_.size
    if n < 2:
        raise ValueError(f"a paired comparison needs at least 2 items, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not (np.isfinite(a_).all() and np.isfinite(b_).all()):
        raise ValueError("paired values must be finite")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be n non-negative numbers, not all zero")
    d = a_ - b_
    mean = float((w * d).sum() / w.sum())
    resid = d - mean
    # stderr of a weighted mean (ratio estimator); the plain std/sqrt(n) for equal weights
    stderr = float(math.sqrt(n / (n - 1) * ((w * resid) ** 2).sum()) / w.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    ws = w[idx]
    boot = (ws * d[idx]).sum(1) / np.maximum(ws.sum(1), 1e-300)
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    verdict = "a<b" if hi < 0 else "a>b" if lo > 0 else "tie"
    return {"mean_diff": mean, "stderr": stderr, "ci": [float(lo), float(hi)],
            "confidence": confidence, "n": int(n), "p_sign": sign_test(d.tolist()),
            "verdict": verdict}
