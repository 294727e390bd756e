"""SLEB (Song et al. 2024, "SLEB: Streamlining LLMs through Redundancy Verification and
Elimination of Transformer Blocks"): greedy layer removal by calibration NLL.

    R_0 = {}
    R_r = R_{r-1} + {argmin_{c not in R_{r-1}} NLL(model without R_{r-1} + {c})},  r = 1..n

with NLL the mean per-token calibration loss (losses.lm_nll). Layers are removed through the
gates (no weight copy). Cost per round and calibration batch: one forward of the current
model recording every layer's input, then for each candidate c a forward of layers
c+1..L-1 only, restarted from the recorded input of c (the layers before c are unchanged
by removing c): about n (L + 1) / 2 full forwards plus n L LM-head passes, no gradients.

scores[l]: calibration NLL increase over the full model of the model at the round where
l was removed (removed layers), or of the final-round model with l removed as well (kept
layers: the price of removing it next). info["rounds"] holds every candidate's NLL.
"""

from __future__ import annotations

import torch

from e3pruner.methods.base import (
    Budget,
    PruneData,
    Selection,
    check_calib_len,
    check_n_prune,
    preserved_model_state,
    register,
)
from e3pruner.losses import lm_nll
from e3pruner.models.activations import hidden_from, layer_inputs
from e3pruner.models.families import decoder_layers


@torch.no_grad()
def candidate_nll(model, calib: torch.Tensor, removed: list[int],
                  batch_size: int = 4) -> tuple[dict[int, float], float]:
    """({c: NLL without removed + [c]} for every layer c not in `removed`, NLL without
    `removed`), mean per calibration token."""
    n = len(decoder_layers(model))
    device = next(model.parameters()).device
    cands = [c for c in range(n) if c not in removed]
    sums = dict.fromkeys(cands, 0.0)
    current = 0.0
    count = 0
    for i in range(0, calib.shape[0], batch_size):
        ids = calib[i:i + batch_size].to(device)
        inputs, out = layer_inputs(model, ids, removed)
        current += lm_nll(model, out, ids).double().sum().item()
        for c in cands:
            hs = hidden_from(model, ids, c + 1, inputs[c], removed)
            sums[c] += lm_nll(model, hs, ids).double().sum().item()
        count += ids.shape[0] * (ids.shape[1] - 1)
    return {c: s / count for c, s in sums.items()}, current / count


@register("sleb")
def select(model, data: PruneData, n_prune: int, budget: Budget | None = None,
           config=None) -> Selection:
    budget = budget or Budget()
    n = len(decoder_layers(model))
    check_n_prune(n_prune, n)
    check_calib_len(data, "sleb")
    removed: list[int] = []
    rounds = []
    scores = [0.0] * n
    base = None
    with preserved_model_state(model):
        for _ in range(n_prune):
            nll, current = candidate_nll(model, data.calib, removed, budget.batch_size)
            base = current if base is None else base
            best = min(nll, key=lambda c: (nll[c], c))  # ties: lower index
            removed.append(best)
            scores[best] = nll[best] - base
            rounds.append({"removed": best, "nll": nll[best],
                           "candidates": {str(c): v for c, v in nll.items()}})
    for c, v in nll.items():  # the last round's candidates: kept layers get their price
        if c != removed[-1]:
            scores[c] = v - base
    keep = [i for i in range(n) if i not in removed]
    return Selection(keep=keep, num_layers=n, scores=scores,
                     tokens=int(data.calib.numel()) * n_prune,
                     info={"order": removed, "base_nll": base, "rounds": rounds,
                           "score": "calibration NLL increase at removal (see sleb.py)"})
