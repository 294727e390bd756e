"""ShortGPT block influence (Men et al., 2024): BI_l = 1 - E_tokens cos(x_l, x_{l+1}),
where x_l is layer l's input hidden state and x_{l+1} its output, on calibration data.
The n layers with the lowest BI are removed."""

from __future__ import annotations

import torch

from e3pruner.methods.base import (
    Budget,
    PruneData,
    Selection,
    check_n_prune,
    keep_lowest_removed,
    register,
)
from e3pruner.models.activations import final_hidden, on_inputs, on_outputs
from e3pruner.models.families import decoder_layers
from e3pruner.models.gates import gated


@torch.no_grad()
def block_influence(model, calib: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """[L] mean over calibration tokens of 1 - cos(layer input, layer output)."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    current: dict[int, torch.Tensor] = {}

    def grab_input(idx, h):
        current[idx] = h.float()

    def add_influence(idx, h_out):
        cos = torch.nn.functional.cosine_similarity(current.pop(idx), h_out.float(), dim=-1)
        sums[idx] += (1 - cos.clamp(-1, 1)).double().sum().cpu()

    device = next(model.parameters()).device
    with on_inputs(layers, grab_input), on_outputs(layers, add_influence), gated(model, None):
        for i in range(0, calib.shape[0], batch_size):
            ids = calib[i:i + batch_size].to(device)
            final_hidden(model, ids)
            count += ids.numel()
    return (sums / count).float()


@register("shortgpt")
def select(model, data: PruneData, n_prune: int, budget: Budget | None = None) -> Selection:
    budget = budget or Budget()
    n = len(decoder_layers(model))
    check_n_prune(n_prune, n)
    bi = block_influence(model, data.calib, budget.batch_size)
    return Selection(keep=keep_lowest_removed(bi, n_prune), num_layers=n,
                     scores=bi.tolist(), info={"score": "block influence 1 - cos"},
                     tokens=int(data.calib.numel()))
