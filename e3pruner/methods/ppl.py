"""Drop-one perplexity: remove the n layers whose removal alone raises calibration NLL least.

    NLL(m) = - (1 / N) sum_{b, t} log p_m(x_{b, t+1} | x_{b, <=t})      (N = B (T - 1) tokens)
    s_l    = NLL(all layers but l) - NLL(all layers)                      scores [L]

and the n layers with the smallest s_l are removed (Kim et al. 2024 "Shortened LLaMA",
PPL criterion). Cost: per calibration batch one full forward that records every layer's
input, then for each l a forward of layers l+1..L-1 only (restarted from the recorded
input of l), i.e. about (L + 1) / 2 full forwards plus L + 1 LM-head passes.

Also the calibration-loss helpers SLEB and Taylor share: `lm_nll` (per-token NLL from
final hidden states, chunked so [N, V] logits are never held) and `hidden_from` (final
hidden state of a model restarted at some layer with some layers gated off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from e3pruner.gates import gated
from e3pruner.hidden import final_hidden, replace_layer_input
from e3pruner.methods.base import (
    Budget,
    PruneData,
    Selection,
    check_calib_len,
    check_n_prune,
    keep_lowest_removed,
    preserved_model_state,
    register,
)
from e3pruner.models.families import decoder_layers, final_norm, lm_head


def _chunk_nll(h: torch.Tensor, weight: torch.Tensor, bias, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight.to(h.dtype), bias).float(), y, reduction="none")


def lm_nll(model, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-token NLL [B, T-1] (fp32) of ids[:, 1:] given normed final hidden [B, T, D].

    Logits are formed `chunk` tokens at a time; under grad each chunk is checkpointed, so
    memory stays O(chunk * V) in the backward too. Differentiable w.r.t. `hidden`.
    """
    if hidden.shape[:2] != ids.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match ids {tuple(ids.shape)}")
    head = lm_head(model)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = ids[:, 1:].reshape(-1).to(h.device)
    grad = torch.is_grad_enabled() and h.requires_grad
    out = []
    for i in range(0, h.shape[0], chunk):
        args = (h[i:i + chunk], head.weight, head.bias, y[i:i + chunk])
        out.append(checkpoint(_chunk_nll, *args, use_reentrant=False) if grad else _chunk_nll(*args))
    return torch.cat(out).reshape(ids.shape[0], ids.shape[1] - 1)


def layer_inputs(model, ids: torch.Tensor, removed=()) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward with the layers in `removed` gated off: (inputs [L] of [B, T, D], the
    input of every decoder layer, and the normed final hidden [B, T, D])."""
    layers = decoder_layers(model)
    n = len(layers)
    box: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(
        lambda _m, a, k, idx=idx: box.__setitem__(idx, a[0] if a else k["hidden_states"]),
        with_kwargs=True) for idx, layer in enumerate(layers)]
    mask = None
    if removed:
        mask = torch.ones(n, device=ids.device)
        mask[list(removed)] = 0
    try:
        with gated(model, mask):
            out = final_hidden(model, ids)
    finally:
        for h in handles:
            h.remove()
    return [box[i] for i in range(n)], out


def hidden_from(model, ids: torch.Tensor, start_layer: int, start_hidden: torch.Tensor,
                removed=()) -> torch.Tensor:
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
        return final_hidden(model, ids)


@torch.no_grad()
def drop_one_nll(model, calib: torch.Tensor, batch_size: int = 4) -> tuple[torch.Tensor, float]:
    """(NLL [L] of the model without layer l, NLL of the full model), mean per token."""
    n = len(decoder_layers(model))
    device = next(model.parameters()).device
    sums = torch.zeros(n, dtype=torch.float64)
    base = 0.0
    count = 0
    for i in range(0, calib.shape[0], batch_size):
        ids = calib[i:i + batch_size].to(device)
        inputs, out = layer_inputs(model, ids)
        base += lm_nll(model, out, ids).double().sum().item()
        for idx in range(n):
            hs = hidden_from(model, ids, idx + 1, inputs[idx])
            sums[idx] += lm_nll(model, hs, ids).double().sum().item()
        count += ids.shape[0] * (ids.shape[1] - 1)
    return (sums / count).float(), base / count


@register("ppl")
def select(model, data: PruneData, n_prune: int, budget: Budget | None = None,
           config=None) -> Selection:
    budget = budget or Budget()
    n = len(decoder_layers(model))
    check_n_prune(n_prune, n)
    check_calib_len(data, "ppl")
    with preserved_model_state(model):
        nll, base = drop_one_nll(model, data.calib, budget.batch_size)
    scores = nll - base
    return Selection(keep=keep_lowest_removed(scores, n_prune), num_layers=n,
                     scores=scores.tolist(), tokens=int(data.calib.numel()),
                     info={"score": "calibration NLL increase when the layer alone is removed",
                           "base_nll": base, "drop_one_nll": nll.tolist()})
