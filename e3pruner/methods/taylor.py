"""First-order Taylor importance of whole layers (Kim et al. 2024 "Shortened LLaMA",
Taylor+ criterion; Ma et al. 2023 LLM-Pruner):

    I_l = sum_{W in params(layer l)} sum_ij | W_ij * dL/dW_ij |,
    L   = mean per-token LM cross-entropy on the calibration set,

the first-order estimate of the loss change when layer l's weights are zeroed. The
gradient is accumulated over micro-batches of `budget.batch_size` blocks (each
micro-batch's token sum divided by the total token count, so it equals the full-batch
gradient); only decoder-layer parameters get gradients (not embeddings, final norm or
head). The n layers with the lowest I_l are removed; scores = I_l. Cost: one forward and
backward over the calibration set. Weights are untouched; requires_grad flags and any
existing .grad are restored afterwards.
"""

from __future__ import annotations

import torch

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
from e3pruner.losses import lm_nll
from e3pruner.models.activations import final_hidden
from e3pruner.models.families import decoder_layers
from e3pruner.models.gates import gated


def taylor_importance(model, calib: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """[L] sum over layer l's parameters of |W * dL/dW| (fp64 sums, returned fp32).
    Frees every .grad but leaves requires_grad changed (only the decoder layers'
    parameters on): call inside `preserved_model_state`."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in layers.parameters():
        p.requires_grad_(True)
    total = calib.shape[0] * (calib.shape[1] - 1)
    with gated(model, None):
        for i in range(0, calib.shape[0], batch_size):
            ids = calib[i:i + batch_size].to(device)
            loss = lm_nll(model, final_hidden(model, ids), ids).sum() / total
            loss.backward()
    out = torch.zeros(len(layers), dtype=torch.float64)
    with torch.no_grad():
        for idx, layer in enumerate(layers):
            for p in layer.parameters():
                if p.grad is not None:
                    out[idx] += (p.detach() * p.grad).abs().double().sum().item()
                p.grad = None
    return out.float()


@register("taylor")
def select(model, data: PruneData, n_prune: int, budget: Budget | None = None,
           config=None) -> Selection:
    budget = budget or Budget()
    n = len(decoder_layers(model))
    check_n_prune(n_prune, n)
    check_calib_len(data, "taylor")
    with preserved_model_state(model):
        imp = taylor_importance(model, data.calib, budget.batch_size)
    return Selection(keep=keep_lowest_removed(imp, n_prune), num_layers=n, scores=imp.tolist(),
                     tokens=int(data.calib.numel()),
                     info={"score": "sum over the layer's weights of |W * dL/dW|"})
