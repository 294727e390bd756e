"""Student and teacher final hidden states that share the forward up to the first
gated-off layer.

While the weights are frozen, the teacher is the same model with every gate on. A student
whose first gated-off layer is p computes exactly the teacher's hidden state at the input
of layer p; `teacher_hidden` restarts the teacher there (activations.hidden_from).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from e3pruner.models.activations import capture_layer_input, final_hidden, hidden_from
from e3pruner.models.families import decoder_layers
from e3pruner.models.gates import gated


def first_off_layer(mask: torch.Tensor) -> int:
    """Smallest layer index whose gate is 0 for some sample (L when none is)."""
    m = mask.detach()
    off = (m == 0) if m.dim() == 1 else (m == 0).any(0)
    idx = torch.nonzero(off)
    return int(idx[0]) if idx.numel() else m.shape[-1]


@torch.no_grad()
def teacher_hidden(model: nn.Module, input_ids: torch.Tensor, *, start_layer: int = 0,
                   start_hidden: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """All-gates-on final hidden state; with `start_hidden` (the input of `start_layer`,
    e.g. stashed from a student forward) the layers before `start_layer` are skipped."""
    n = len(decoder_layers(model))
    if start_hidden is None or start_layer == 0:
        with gated(model, None):
            return final_hidden(model, input_ids, attention_mask)
    if start_layer >= n:  # the student kept every layer: its output is the teacher's
        raise ValueError("start_layer >= num_layers: use the student's own output")
    return hidden_from(model, input_ids, start_layer, start_hidden,
                       attention_mask=attention_mask)


def student_and_teacher_hidden(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor,
                               attention_mask: torch.Tensor | None = None):
    """(student hidden with grad through `mask`, teacher hidden without grad), sharing the
    forward up to the first gated-off layer. mask: [L] or [B, L]."""
    p = first_off_layer(mask)
    n = mask.shape[-1]
    if p >= n:
        with gated(model, mask):
            hs = final_hidden(model, input_ids, attention_mask)
        return hs, hs.detach()
    with gated(model, mask), capture_layer_input(model, p) as box:
        hs = final_hidden(model, input_ids, attention_mask)
    ht = teacher_hidden(model, input_ids, start_layer=p, start_hidden=box["h"],
                        attention_mask=attention_mask)
    return hs, ht
