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

import torch

from e3pruner.methods.base import (
    Budget,
    PruneData,
    Selection,
    check_n_prune,
    preserved_model_state,
    register,
)
from e3pruner.angular_distance import angular_distances, last_token_states
from e3pruner.models.families import decoder_layers


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
