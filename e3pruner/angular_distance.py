"""Angular distance between hidden states n layers apart (Gromov et al. 2024): the last-token
state at the input of every decoder layer, and d(l, n) = mean_b arccos(cos) / pi. Used by
the angular method and by CLP's init."""

from __future__ import annotations

import math

import torch

from e3pruner.models.activations import final_hidden, on_inputs
from e3pruner.models.families import decoder_layers, final_norm
from e3pruner.models.gates import gated


@torch.no_grad()
def last_token_states(model, calib: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """[L + 1, n_calib, D] fp32 last-token hidden states: the input of every decoder layer,
    then the input of the final norm."""
    layers = decoder_layers(model)
    n = len(layers)
    device = next(model.parameters()).device
    box: dict[int, torch.Tensor] = {}
    rows = []
    with (on_inputs([*layers, final_norm(model)],
                    lambda i, h: box.__setitem__(i, h[:, -1].float().cpu())),
          gated(model, None)):
        for i in range(0, calib.shape[0], batch_size):
            final_hidden(model, calib[i:i + batch_size].to(device))
            rows.append(torch.stack([box[j] for j in range(n + 1)]))
    return torch.cat(rows, 1)


def angular_distances(states: torch.Tensor, n: int) -> torch.Tensor:
    """d [L - n + 1]: d[l] = mean_b arccos(cos(states[l, b], states[l + n, b])) / pi, from
    states [L + 1, B, D]."""
    if not 1 <= n < states.shape[0]:
        raise ValueError(f"block size must be in [1, {states.shape[0] - 1}], got {n}")
    cos = torch.nn.functional.cosine_similarity(states[:-n].double(), states[n:].double(), dim=-1)
    return (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).mean(1).float()
