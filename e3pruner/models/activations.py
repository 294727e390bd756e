"""Layer activations: the final hidden state, the hidden-state input of every decoder layer,
and the forward restarted at layer p from a given hidden state.

Every method, the E3 init and the teacher-prefix sharing (teacher_prefix.py) record and
restart through this module: `on_inputs` / `on_outputs` call a function with what a
module receives / returns, `layer_inputs` records the input of every decoder layer in one
forward, `hidden_from` runs layers p..L-1 (skipping the earlier ones through their gates)
on a given input of layer p.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from e3pruner.models.families import base_model, decoder_layers, final_norm
from e3pruner.models.gates import gated


def final_hidden(model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, D] normed last hidden state under the model's current gates."""
    return base_model(model)(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=False).last_hidden_state


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state argument of a module call (positional or `hidden_states=`)."""
    return args[0] if args else kwargs["hidden_states"]


def hidden_output(out) -> torch.Tensor:
    """The hidden state a decoder layer returns (alone or first of a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def on_inputs(modules: Sequence[nn.Module], fn: Callable[[int, torch.Tensor], None]):
    """Call fn(i, hidden input of modules[i]) at every forward of modules[i]."""
    handles = [m.register_forward_pre_hook(
        lambda _m, a, k, i=i: fn(i, hidden_input(a, k)), with_kwargs=True)
        for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def on_outputs(modules: Sequence[nn.Module], fn: Callable[[int, torch.Tensor], None]):
    """Call fn(i, hidden output of modules[i]) at every forward of modules[i]."""
    handles = [m.register_forward_hook(
        lambda _m, _a, _k, out, i=i: fn(i, hidden_output(out)), with_kwargs=True)
        for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_layer_input(model: nn.Module, layer_idx: int):
    """Stash the hidden-state input of decoder layer `layer_idx` (detached) in a dict."""
    box: dict[str, torch.Tensor] = {}
    with on_inputs([decoder_layers(model)[layer_idx]], lambda _i, h: box.__setitem__("h", h.detach())):
        yield box


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


def removal_mask(num_layers: int, removed, device) -> torch.Tensor | None:
    """Gate mask [L] with the layers in `removed` off (None when nothing is removed)."""
    if not removed:
        return None
    mask = torch.ones(num_layers, device=device)
    mask[list(removed)] = 0
    return mask


def layer_inputs(model, ids: torch.Tensor, removed=()) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward with the layers in `removed` gated off: (inputs [L] of [B, T, D], the
    input of every decoder layer, and the normed final hidden [B, T, D])."""
    layers = decoder_layers(model)
    box: dict[int, torch.Tensor] = {}
    with on_inputs(layers, box.__setitem__), gated(model, removal_mask(len(layers), removed,
                                                                       ids.device)):
        out = final_hidden(model, ids)
    return [box[i] for i in range(len(layers))], out


def hidden_from(model, ids: torch.Tensor, start_layer: int, start_hidden: torch.Tensor,
                removed=(), attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normed final hidden [B, T, D] of the model that feeds `start_hidden` [B, T, D] into
    layer `start_layer` and gates off the layers in `removed` (layers < start_layer are not
    run). start_layer = L means the final norm of `start_hidden`."""
    n = len(decoder_layers(model))
    if not 0 <= start_layer <= n:
        raise ValueError(f"start_layer must be in [0, {n}], got {start_layer}")
    if start_layer == n:
        return final_norm(model)(start_hidden)
    mask = torch.ones(n, device=ids.device)
    mask[:start_layer] = 0
    if removed:
        mask[list(removed)] = 0
    with gated(model, mask), replace_layer_input(model, start_layer, start_hidden):
        return final_hidden(model, ids, attention_mask)
