"""Angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
Layers"): remove the contiguous block of n layers whose input and output point the most
alike on the last token.

    d(l, n) = mean_b arccos(clamp(cos(h_l[b, -1], h_{l+n}[b, -1]), -1, 1)) / pi,  l = 0..L-n
    l* = argmin_l d(l, n)   (ties: the lowest l);  removed = [l*, l* + n)

h_l [B, T, D] is the input of decoder layer l, h_L the final hidden state before the norm.
The clamp matters: an identity block gives cos = 1 that rounds to 1 + eps, and arccos of
that is NaN. Cost: one forward over the calibration set, no gradients.

scores[i] = min over the blocks [l, l+n) that contain layer i of d(l, n) (higher = more
important; every removed layer scores the minimum). info["distances"] holds d(l, n) for
each start l.
"""

from __future__ import annotations

import math

import torch

from e3pruner.gates import gated
from e3pruner.hidden import final_hidden
from e3pruner.methods.base import (
    Budget,
    PruneData,
    Selection,
    check_n_prune,
    preserved_model_state,
    register,
)
from e3pruner.models.families import decoder_layers, final_norm


@torch.no_grad()
def last_token_states(model, calib: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """[L + 1, n_calib, D] fp32 last-token hidden states: the input of every decoder layer,
    then the input of the final norm."""
    layers = decoder_layers(model)
    n = len(layers)
    device = next(model.parameters()).device
    box: dict[int, torch.Tensor] = {}

    def grab(idx):
        return lambda _m, a, k: box.__setitem__(
            idx, (a[0] if a else k["hidden_states"])[:, -1].float().cpu())

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    handles.append(final_norm(model).register_forward_pre_hook(grab(n), with_kwargs=True))
    rows = []
    try:
        with gated(model, None):
            for i in range(0, calib.shape[0], batch_size):
                final_hidden(model, calib[i:i + batch_size].to(device))
                rows.append(torch.stack([box[j] for j in range(n + 1)]))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(rows, 1)


def angular_distances(states: torch.Tensor, n: int) -> torch.Tensor:
    """d [L - n + 1]: d[l] = mean_b arccos(cos(states[l, b], states[l + n, b])) / pi, from
    states [L + 1, B, D]."""
    if not 1 <= n < states.shape[0]:
        raise ValueError(f"block size must be in [1, {states.shape[0] - 1}], got {n}")
    cos = torch.nn.functional.cosine_similarity(states[:-n].double(), states[n:].double(), dim=-1)
    return (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).mean(1).float()


@register("angular")
def select(model, data: PruneData, n_prune: int, budget: Budget | None = None,
           config=None) -> Selection:
    budget = budget or Budget()
    n = len(decoder_layers(model))
    check_n_prune(n_prune, n)
    with preserved_model_state(model):
        states = last_token_states(model, data.calib, budget.batch_size)
    d = angular_distances(states, n_prune)
    start = int(torch.argmin(d))  # first minimum: the lowest start on ties
    scores = [min(float(d[s]) for s in range(max(0, i - n_prune + 1), min(i, n - n_prune) + 1))
              for i in range(n)]
    keep = [i for i in range(n) if not start <= i < start + n_prune]
    return Selection(keep=keep, num_layers=n, scores=scores, tokens=int(data.calib.numel()),
                     info={"start": start, "distances": d.tolist(),
                           "score": "least angular distance of a removable block containing the layer"})
