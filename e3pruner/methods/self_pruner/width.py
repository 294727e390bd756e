"""Structured width pruning by MASKING (Wanda-sp group scores), for Self-Pruner's "width" space.

Scores (group Wanda, "Wanda-sp"), from the calibration activations of every layer l:
* MLP channel c (of the I intermediate channels; X = the input of down_proj [N, I]):
      s_c = sum_rows |W_down[:, c]| * ||X[:, c]||_2                               [I]
* attention head h (X = the input of o_proj [N, H * d], columns of head h: C_h):
      s_h = sum_{c in C_h} sum_rows |W_o[:, c]| * ||X[:, c]||_2                   [H]

A pruning rate r_l removes the round(r_l I) lowest-scoring channels and round(r_l H)
lowest-scoring query heads of layer l. Removal is simulated by forward pre-hooks that zero
those inputs of down_proj / o_proj: exactly the output of the physically pruned layer
(zeroed down_proj inputs contribute nothing; a zeroed head contributes nothing to o_proj).
There is no weight surgery, so nothing gets faster or smaller.

NOT EXPORTABLE: the masks live in hooks only; export.py (and vLLM) see the dense model.
The width variant exists to compare quality with layer removal at the same mean rate.
With GQA the k/v projections are shared by several query heads and are not pruned, so the
removed parameter fraction is a bit below the mean rate (`masked_param_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from e3pruner.models.activations import final_hidden, on_inputs
from e3pruner.models.families import decoder_layers
from e3pruner.models.gates import gated


def _parts(layer: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """(mlp.down_proj, self_attn.o_proj) of a decoder layer."""
    try:
        return layer.mlp.down_proj, layer.self_attn.o_proj
    except AttributeError as err:
        raise ValueError(f"{type(layer).__name__}: width pruning needs mlp.down_proj and "
                         "self_attn.o_proj (Llama/Mistral/Qwen layout)") from err


def num_heads(model) -> tuple[int, int]:
    """(query heads H, head dim d) with H * d = o_proj.in_features."""
    cfg = model.config
    H = cfg.num_attention_heads
    o_in = _parts(decoder_layers(model)[0])[1].in_features
    if o_in % H:
        raise ValueError(f"o_proj input {o_in} is not a multiple of {H} heads")
    return H, o_in // H


@dataclass
class WidthStats:
    """Per layer: mlp [I] channel scores, heads [H] head scores (higher = more important),
    their ascending orders (pruning order), and the calibration tokens seen."""

    mlp: list[torch.Tensor]
    heads: list[torch.Tensor]
    head_dim: int
    tokens: int

    def __post_init__(self):
        self.mlp_order = [torch.argsort(s, stable=True) for s in self.mlp]
        self.head_order = [torch.argsort(s, stable=True) for s in self.heads]


@torch.no_grad()
def activation_norms(model, calib: torch.Tensor, batch_size: int = 4
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """(||X_down[:, c]||_2 per layer [I], ||X_o[:, c]||_2 per layer [H d], tokens) over all
    calibration tokens of the full model (all gates on)."""
    layers = decoder_layers(model)
    sq_down: list[torch.Tensor | None] = [None] * len(layers)
    sq_o: list[torch.Tensor | None] = [None] * len(layers)

    def add_squares(store):
        def fn(idx, x):
            x = x.detach().float()
            s = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
            store[idx] = s if store[idx] is None else store[idx] + s
        return fn

    parts = [_parts(layer) for layer in layers]
    device = next(model.parameters()).device
    tokens = 0
    with (on_inputs([down for down, _ in parts], add_squares(sq_down)),
          on_inputs([o for _, o in parts], add_squares(sq_o)), gated(model, None)):
        for i in range(0, calib.shape[0], batch_size):
            ids = calib[i:i + batch_size].to(device)
            final_hidden(model, ids)
            tokens += ids.numel()
    return [s.sqrt() for s in sq_down], [s.sqrt() for s in sq_o], tokens


@torch.no_grad()
def collect_width_stats(model, calib: torch.Tensor, batch_size: int = 4) -> WidthStats:
    """Wanda-sp channel and head scores (module docstring) from calibration data."""
    if calib.dim() != 2 or calib.shape[0] == 0:
        raise ValueError(f"calib must be [n_blocks, T] token ids, got {tuple(calib.shape)}")
    norm_down, norm_o, tokens = activation_norms(model, calib, batch_size)
    H, d = num_heads(model)
    mlp, heads = [], []
    for layer, nd, no in zip(decoder_layers(model), norm_down, norm_o):
        down, o = _parts(layer)
        mlp.append((down.weight.detach().float().abs() * nd[None, :]).sum(0).cpu())
        col = (o.weight.detach().float().abs() * no[None, :]).sum(0)  # [H d]
        heads.append(col.view(H, d).sum(1).cpu())
    return WidthStats(mlp=mlp, heads=heads, head_dim=d, tokens=tokens)


def pruned_counts(rate: float, stats: WidthStats, layer: int) -> tuple[int, int]:
    """(channels, heads) removed from `layer` at `rate`: round(r I), round(r H)."""
    return (int(round(rate * stats.mlp[layer].numel())),
            int(round(rate * stats.heads[layer].numel())))


def _check_rates(rates, num_layers: int) -> list[float]:
    rates = [float(r) for r in rates]
    if len(rates) != num_layers:
        raise ValueError(f"need one rate per layer ({num_layers}), got {len(rates)}")
    if any(not 0.0 <= r <= 1.0 for r in rates):
        raise ValueError(f"rates must be in [0, 1], got {rates}")
    return rates


def width_keep_masks(rates, stats: WidthStats) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (channel keep [I] bool, head keep [H] bool): the lowest-score
    round(r I) channels and round(r H) heads are False."""
    rates = _check_rates(rates, len(stats.mlp))
    out = []
    for i, r in enumerate(rates):
        kc, kh = pruned_counts(r, stats, i)
        ch = torch.ones(stats.mlp[i].numel(), dtype=torch.bool)
        ch[stats.mlp_order[i][:kc]] = False
        hd = torch.ones(stats.heads[i].numel(), dtype=torch.bool)
        hd[stats.head_order[i][:kh]] = False
        out.append((ch, hd))
    return out


class WidthHandle:
    """Removable set of masking hooks (`.remove()`, or use as a context manager)."""

    def __init__(self, handles):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_width_masks(model, rates, stats: WidthStats) -> WidthHandle:
    """Zero the pruned down_proj input channels and o_proj input columns (heads) of every
    layer with a positive rate, through forward pre-hooks. Returns the removable handle."""
    layers = decoder_layers(model)
    masks = width_keep_masks(_check_rates(rates, len(layers)), stats)
    handles = []

    def scale(keep: torch.Tensor):
        cache: dict = {}

        def fn(_m, args):
            x = args[0]
            key = (x.device, x.dtype)
            if key not in cache:
                cache[key] = keep.to(device=x.device, dtype=x.dtype)
            return (x * cache[key], *args[1:])
        return fn

    try:
        for layer, (ch, hd) in zip(layers, masks):
            down, o = _parts(layer)
            if not ch.all():
                handles.append(down.register_forward_pre_hook(scale(ch)))
            if not hd.all():
                cols = hd.repeat_interleave(stats.head_dim)
                handles.append(o.register_forward_pre_hook(scale(cols)))
    except BaseException:
        WidthHandle(handles).remove()
        raise
    return WidthHandle(handles)


def masked_param_fraction(model, rates, stats: WidthStats) -> float:
    """Fraction of decoder-layer parameters the masks remove: per channel a row of gate and
    up and a column of down; per head its rows of q_proj and columns of o_proj."""
    layers = decoder_layers(model)
    rates = _check_rates(rates, len(layers))
    total = sum(p.numel() for p in layers.parameters())
    removed = 0
    for i, (layer, r) in enumerate(zip(layers, rates)):
        kc, kh = pruned_counts(r, stats, i)
        down, o = _parts(layer)
        per_channel = sum(m.weight.shape[1] for m in (layer.mlp.gate_proj, layer.mlp.up_proj)) \
            + down.weight.shape[0]
        q = layer.self_attn.q_proj
        per_head = stats.head_dim * (q.weight.shape[1] + o.weight.shape[0])
        removed += kc * per_channel + kh * per_head
    return removed / total
