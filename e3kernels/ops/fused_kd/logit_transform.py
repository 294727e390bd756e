"""The elementwise head transform of the KD logits: logit scale and final-logit softcapping.

Per side, from the raw head product raw = h W[:V]^T:

    u = s raw                                  (Cohere logit_scale s; Granite s = 1 / logits_scaling)
    z = c tanh(u / c)  if softcap c else  u    (Gemma 2 / 3 final_logit_softcapping c)
    dz / d raw = s (1 - tanh^2(u / c))  (or s)

The KD uses z / T, the CE the student's z. s = 1, c = None is the identity: every backend then
runs exactly the code it runs without a transform (a compile-time flag), so the results are
bit-identical to the untransformed loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    """One side's z = c tanh(s raw / c) (softcap c) or s raw; validated by `logit_transforms`."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """z from raw logits [..., V] in raw's dtype (plain torch, differentiable)."""
        z = raw
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


IDENTITY = LogitTransform()


def _scale(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (1.0: no scaling), got {x!r}")
    return float(x)


def _softcap(name: str, x) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be None (no capping) or a finite number > 0, got {x!r}")
    return float(x)


def _pair(name: str, x) -> tuple:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{name} must be a scalar (both sides) or a (student, teacher) "
                             f"pair, got {x!r}")
        return tuple(x)
    return x, x


def logit_transforms(logit_scale=1.0, softcap=None) -> tuple[LogitTransform, LogitTransform]:
    """(student, teacher) transforms from the public arguments: a scalar applies to both sides,
    a 2-tuple is (student, teacher). ValueError naming the argument on bad values."""
    ss, st = _pair("logit_scale", logit_scale)
    cs, ct = _pair("softcap", softcap)
    return (LogitTransform(_scale("logit_scale (student)", ss), _softcap("softcap (student)", cs)),
            LogitTransform(_scale("logit_scale (teacher)", st), _softcap("softcap (teacher)", ct)))


__all__ = ["IDENTITY", "LogitTransform", "logit_transforms"]
