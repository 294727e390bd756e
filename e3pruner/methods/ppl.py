"""Drop-one perplexity: remove the n layers whose removal alone raises calibration NLL least.

    NLL(m) = - (1 / N) sum_{b, t} log p_m(x_{b, t+1} | x_{b, <=t})      (N = B (T - 1) tokens)
    s_l    = NLL(all layers but l) - NLL(all layers)                      scores [L]

and the n layers with the smallest s_l are removed (Kim et al. 2024 "Shortened LLaMA",
PPL criterion). Cost: per calibration batch one full forward that records every layer's
input, then for each l a forward of layers l+1..L-1 only (restarted from the recorded
input of l), i.e. about (L + 1) / 2 full forwards plus L + 1 LM-head passes.
"""

from __future__ import annotations

import torch

from e3pruner.losses import lm_nll
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
from e3pruner.models.activations import hidden_from, layer_inputs
from e3pruner.models.families import decoder_layers


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
