"""The search objective of a hard layer mask: the KD loss of the model with those layers
gated off against the same model with every layer on, weights frozen.

    loss(keep) = sum_i w_i KL(p_teacher,i || p_student,i) / n_tokens

on fixed token blocks `ids` [B, T], with w_i the teacher-entropy weighting of the fused KD
loss (`kd_from_hidden`, the head's logit transform included), normalized within each chunk
of `batch_size` blocks as in a search batch. One teacher pass records the
input of every decoder layer; a mask whose first removed layer is p then runs only layers
p..L-1 from the recorded input of p, so a score costs (L - p) / L of a forward at most.
E3 minimizes exactly this in expectation; `compare` reports it for every method's mask,
and E3's swap polish scores its moves with it.
"""

from __future__ import annotations

import torch

from e3pruner.amp import autocast
from e3pruner.losses import kd_from_hidden
from e3pruner.models.activations import hidden_from, layer_inputs
from e3pruner.models.families import decoder_layers, kd_head_kwargs, lm_head


class MaskKDScorer:
    """Scores hard masks (kept layer indices) on fixed blocks `ids` [B, T], in chunks of
    `batch_size` blocks (the teacher's layer inputs of every chunk are kept: L x B x T x D)."""

    def __init__(self, model, ids: torch.Tensor, *, amp: str | None = None,
                 weighting: str = "entropy", temperature: float = 1.0, batch_size: int = 4):
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise ValueError(f"ids must be [B, T] token blocks with B >= 1, got "
                             f"{tuple(ids.shape)}")
        self.model, self.amp = model, amp
        self.kd = dict(weighting=weighting, temperature=temperature, **kd_head_kwargs(model))
        self.num_layers = len(decoder_layers(model))
        self.device = next(model.parameters()).device
        self.chunks = []
        with torch.no_grad(), autocast(self.device, amp):
            for i in range(0, ids.shape[0], batch_size):
                chunk = ids[i:i + batch_size].to(self.device)
                inputs, ht = layer_inputs(model, chunk)
                self.chunks.append((chunk, inputs, ht))
        self.tokens = int(ids.numel())
        self.evaluations = 0
        self._cache: dict[tuple[int, ...], float] = {}

    @torch.no_grad()
    def loss(self, keep) -> float:
        """Token-mean weighted KD loss of the model keeping only `keep` (cached per mask)."""
        key = tuple(sorted(int(i) for i in keep))
        if key in self._cache:
            return self._cache[key]
        if not key or key[0] < 0 or key[-1] >= self.num_layers or len(set(key)) != len(key):
            raise ValueError(f"keep must be distinct layer indices in [0, {self.num_layers}), "
                             f"got {list(keep)}")
        removed = [i for i in range(self.num_layers) if i not in set(key)]
        weight = lm_head(self.model).weight
        total, count = 0.0, 0
        for chunk, inputs, ht in self.chunks:
            if removed:
                p = removed[0]
                with autocast(self.device, self.amp):
                    hs = hidden_from(self.model, chunk, p, inputs[p], removed=removed)
                out = kd_from_hidden(hs, weight, ht, amp=self.amp, reduction="sum", **self.kd)
                total += float(out.loss)
            count += chunk.numel()
        self.evaluations += 1
        self._cache[key] = total / count
        return self._cache[key]
