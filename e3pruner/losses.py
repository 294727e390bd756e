"""Losses from final hidden states: `kd_from_hidden` (the fused KD loss of student and
teacher hidden states through their heads) and `lm_nll` (per-token next-token NLL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from e3pruner.amp import head_input
from e3pruner.models.families import apply_head_transform, config_head_transform, lm_head


def flat_head_input(hidden: torch.Tensor, amp: str | None) -> torch.Tensor:
    """Hidden states [..., D] as [N, D] rows, in the dtype the head sees under `amp`."""
    return head_input(hidden.reshape(-1, hidden.shape[-1]), amp)


def kd_from_hidden(student_hidden: torch.Tensor, student_head: torch.Tensor,
                   teacher_hidden: torch.Tensor, teacher_head: torch.Tensor | None = None, *,
                   amp: str | None = None, logit_scale: float | tuple = 1.0,
                   softcap: float | None | tuple = None, **kd):
    """`e3kernels.fused_linear_kd_loss` of student and teacher final hidden states [..., D]
    through the heads [V, D] (the teacher's defaults to the student's); `kd` are its
    keyword arguments (weighting, temperature, reduction, labels, ...).

    logit_scale s, softcap c: the heads' transform z = c tanh(s h W^T / c) (or s h W^T), as
    `families.kd_head_kwargs(model)` gives them (a pair: (student, teacher)); passed to the
    kernel only when not the default, so a plain head calls it exactly as before."""
    from e3kernels import fused_linear_kd_loss

    if logit_scale != 1.0:
        kd["logit_scale"] = logit_scale
    if softcap is not None:
        kd["softcap"] = softcap
    return fused_linear_kd_loss(flat_head_input(student_hidden, amp), student_head,
                                flat_head_input(teacher_hidden, amp),
                                student_head if teacher_head is None else teacher_head, **kd)


def _chunk_nll(h: torch.Tensor, weight: torch.Tensor, bias, y: torch.Tensor, scale: float,
               softcap: float | None) -> torch.Tensor:
    logits = apply_head_transform(F.linear(h, weight.to(h.dtype), bias).float(), scale, softcap)
    return F.cross_entropy(logits, y, reduction="none")


def lm_nll(model, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-token NLL [B, T-1] (fp32) of ids[:, 1:] given normed final hidden [B, T, D].

    Logits z = transform(h W^T + b) with the transform the config gives the head
    (families.config_head_transform: logit scale, final softcap), as the model's own forward
    forms them; no check forward here (it would fire the callers' hooks), the KD path checks.
    Logits are formed `chunk` tokens at a time; under grad each chunk is checkpointed, so
    memory stays O(chunk * V) in the backward too. Differentiable w.r.t. `hidden`.
    """
    if hidden.shape[:2] != ids.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match ids {tuple(ids.shape)}")
    head = lm_head(model)
    scale, softcap = config_head_transform(model.config)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = ids[:, 1:].reshape(-1).to(h.device)
    grad = torch.is_grad_enabled() and h.requires_grad
    out = []
    for i in range(0, h.shape[0], chunk):
        args = (h[i:i + chunk], head.weight, head.bias, y[i:i + chunk], scale, softcap)
        out.append(checkpoint(_chunk_nll, *args, use_reentrant=False) if grad else _chunk_nll(*args))
    return torch.cat(out).reshape(ids.shape[0], ids.shape[1] - 1)
