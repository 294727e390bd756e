"""Final hidden states (the lm_head input) of gated students and the shared-weight teacher.

While the weights are frozen, the teacher is the same model with every gate on. A student
whose first gated-off layer is p computes exactly the teacher's hidden state at the input
of layer p; `teacher_hidden` restarts the teacher there (layers < p are skipped through
their gates, and a pre-hook swaps in the student's stashed input of layer p), so the
teacher and student share the forward up to the first gated-off layer.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from e3pruner.gates import gated
from e3pruner.models.families import decoder_layers, get_adapter


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack without the head (e.g. LlamaModel), whose output is normed."""
    obj = model
    for part in get_adapter(model).layers_path.split(".")[:-1]:
        obj = getattr(obj, part)
    return obj


def final_hidden(model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, D] normed last hidden state under the model's current gates."""
    return base_model(model)(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=False).last_hidden_state


@contextmanager
def capture_layer_input(model: nn.Module, layer_idx: int):
    """Stash the hidden-state input of decoder layer `layer_idx` (detached) in a dict."""
    box: dict[str, torch.Tensor] = {}

    def hook(_mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        box["h"] = h.detach()

    handle = decoder_layers(model)[layer_idx].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def replace_layer_input(model: nn.Module, layer_idx: int, hidden: torch.Tensor):
    """Make decoder layer `layer_idx` see `hidden` as its input."""

    def hook(_mod, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = hidden
        return args, kwargs

    handle = decoder_layers(model)[layer_idx].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


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
    mask = torch.ones(n, device=input_ids.device)
    mask[:start_layer] = 0
    with gated(model, mask), replace_layer_input(model, start_layer, start_hidden):
        return final_hidden(model, input_ids, attention_mask)


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
