"""Reverse-order pruning + partial-layer fine-tuning (Lu et al., ICLR 2026, "Reassessing Layer
Pruning in LLMs: New Insights and Methods"; code yaolu-zjut/Navigation_LLM_layer_pruning).

No scoring: the n layers just before the last `keep_last` layers go,

    removed = [L - keep_last - n, L - keep_last)

keep_last = 1 (default: layers L-1-n .. L-2, the final layer stays, as issue 18 states it);
keep_last = 0 is the authors' code (`--pr_method tail`: the final n layers). scores (higher =
more important) follow the order of removal: scores[l] = stop - l for l < stop = L - keep_last
(layer stop-1 goes first), L + 1 for the final kept layers; the n lowest are the removed.

Recovery: registered with scope "last" (recovery.distill): only the last `last_layers`
(default 3) kept decoder layers, the final norm and the LM head train; a head tied to the
embedding trains the embedding with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from e3pruner.methods.base import Budget, PruneData, Selection, check_n_prune, register
from e3pruner.models.families import decoder_layers


@dataclass
class ReverseOrderConfig:
    keep_last: int = 1  # final layers that always stay (1: L-1-n .. L-2 go; 0: the tail)

    def __post_init__(self):
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) \
                or self.keep_last < 0:
            raise ValueError(f"keep_last must be an integer >= 0, got {self.keep_last!r}")


@register("reverse-order", recovery={"scope": "last", "last_layers": 3})
def select(model, data: PruneData, n_prune: int, budget: Budget | None = None,
           config: ReverseOrderConfig | None = None) -> Selection:
    cfg = config or ReverseOrderConfig()
    n = len(decoder_layers(model))
    check_n_prune(n_prune, n)
    if n_prune + cfg.keep_last > n:
        raise ValueError(f"cannot remove {n_prune} layers before the last {cfg.keep_last} of "
                         f"{n}: lower n_prune or keep_last")
    stop = n - cfg.keep_last
    keep = [i for i in range(n) if not stop - n_prune <= i < stop]
    scores = [float(stop - i if i < stop else n + 1) for i in range(n)]
    return Selection(keep=keep, num_layers=n, scores=scores, tokens=0,
                     info={"config": asdict(cfg), "segment": [stop - n_prune, stop],
                           "score": "reverse order of removal (stop - layer)"})
