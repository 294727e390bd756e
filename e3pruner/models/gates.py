"""Layer gates: every decoder layer becomes a gated residual  h <- h + m_l (f_l(h) - h).

m_l = 1 is the original layer, m_l = 0 removes it exactly (the output is the input, bit
for bit), and a fractional or straight-through m_l (from Gumbel-TopK) passes a gradient to
the mask. Gates are installed by overriding each layer instance's `forward`, so no weight
is copied, module names and state_dict keys stay the same, and `generate()` still works.

Mask shapes: `[L]` (one mask for the batch) or `[B, L]` (one mask per sample).
A layer whose gate is exactly 0 for the whole batch and needs no gradient is skipped
(not computed at all), which is what makes gated-off search steps cheap; when a KV cache
is passed (generation) it still runs so that the cache stays consistent.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn as nn

from e3pruner.models.families import decoder_layers
from e3pruner.models.kv_cache import layer_cache

_STATE = "_e3_gate_state"


class GateState:
    """Holds the current mask of one model; shared by its gated layers."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.mask: torch.Tensor | None = None  # None == all gates on

    def gate(self, idx: int) -> torch.Tensor | None:
        if self.mask is None:
            return None
        return self.mask[..., idx]


def _gated_forward(layer: nn.Module, idx: int, state: GateState, original):
    def forward(self, hidden_states, *args, **kwargs):
        m = state.gate(idx)
        if (m is not None and not m.requires_grad and layer_cache(kwargs) is None
                and bool((m == 0).all())):
            return hidden_states  # skipped; with a KV cache we still run it to fill the cache
        out = original(hidden_states, *args, **kwargs)
        if m is None or (not m.requires_grad and bool((m == 1).all())):
            return out
        rest = None
        if isinstance(out, tuple):
            out, rest = out[0], out[1:]
        if m.dim() == 1:  # per-sample gates [B]
            m = m.view(-1, *([1] * (out.dim() - 1)))
        m = m.to(out.dtype)
        out = hidden_states + m * (out - hidden_states)
        return out if rest is None else (out, *rest)

    return types.MethodType(forward, layer)


def install_gates(model: nn.Module) -> GateState:
    """Install gates on every decoder layer (idempotent). Returns the shared GateState."""
    state = getattr(model, _STATE, None)
    if state is not None:
        return state
    layers = decoder_layers(model)
    state = GateState(len(layers))
    for idx, layer in enumerate(layers):
        original = layer.forward  # bound method of the class
        layer._e3_original_forward = original
        layer.forward = _gated_forward(layer, idx, state, original)
    object.__setattr__(model, _STATE, state)
    return state


def remove_gates(model: nn.Module) -> None:
    """Restore the original forward of every decoder layer."""
    if getattr(model, _STATE, None) is None:
        return
    for layer in decoder_layers(model):
        if "forward" in layer.__dict__:
            del layer.forward
        layer.__dict__.pop("_e3_original_forward", None)
    object.__delattr__(model, _STATE)


def _check_mask(mask: torch.Tensor, num_layers: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask, dtype=torch.float32)
    if mask.dtype == torch.bool:
        mask = mask.float()
    if not mask.is_floating_point():
        mask = mask.float()
    if mask.dim() not in (1, 2) or mask.shape[-1] != num_layers:
        raise ValueError(f"mask must have shape [L] or [B, L] with L={num_layers} layers, "
                         f"got {tuple(mask.shape)}")
    return mask


def set_mask(model: nn.Module, mask: torch.Tensor | None) -> None:
    """Set the gates (installing them first if needed). None turns every gate on."""
    state = install_gates(model)
    state.mask = None if mask is None else _check_mask(mask, state.num_layers)


def get_mask(model: nn.Module) -> torch.Tensor | None:
    state = getattr(model, _STATE, None)
    return None if state is None else state.mask


@contextmanager
def gated(model: nn.Module, mask: torch.Tensor | None):
    """Run a block with `mask` set; restores the previous mask afterwards."""
    state = install_gates(model)
    previous = state.mask
    set_mask(model, mask)
    try:
        yield model
    finally:
        state.mask = previous


@contextmanager
def all_gates_on(model: nn.Module):
    """Run a block with every gate on, without installing gates on a model that has none."""
    state = getattr(model, _STATE, None)
    if state is None:
        yield model
        return
    previous, state.mask = state.mask, None
    try:
        yield model
    finally:
        state.mask = previous


def keep_mask(num_layers: int, keep_layers, device=None) -> torch.Tensor:
    """Float 0/1 mask [L] with ones at `keep_layers`."""
    mask = torch.zeros(num_layers, device=device)
    keep = sorted(set(int(i) for i in keep_layers))
    if keep and (keep[0] < 0 or keep[-1] >= num_layers):
        raise ValueError(f"keep_layers must be in [0, {num_layers - 1}], got {keep}")
    mask[keep] = 1.0
    return mask
