"""The interface every layer-selection method implements, and the registry.

    select(model, data, n_prune, budget) -> Selection

`model` is a supported causal LM (weights are not modified), `data` a PruneData (a
calibration batch plus the token blocks to search/train on), `n_prune` the number of
layers to remove, `budget` the token budget and seeds. Methods register a name with
`@register("name", config=TheConfig)`; `e3pruner.methods.get_method(name)` returns
the callable (the lookups live in the package, which imports every method first).

A method that defines its own recovery registers it as RecoveryConfig overrides:
`@register("clp", recovery={"scope": "endpoints"})`; `method_recovery(name)` returns them
(an empty dict: the default full-model KD recovery).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from e3pruner.data import PruneData
from e3pruner.distributed import SINGLE, DistContext
from e3pruner.models.gates import _STATE, remove_gates


@dataclass
class Budget:
    search_tokens: int = 0
    batch_size: int = 4
    seed: int = 0
    progress: bool = True
    run_dir: str | None = None  # where a method may checkpoint and log
    resume: bool = False
    checkpoint_every: int = 50
    dist: DistContext = SINGLE  # torchrun data parallelism (methods that support it)


@dataclass
class Selection:
    keep: list[int]
    num_layers: int
    scores: list[float] | None = None  # per-layer importance, higher = more important
    info: dict = field(default_factory=dict)
    tokens: int = 0  # tokens processed by the selection itself

    @property
    def removed(self) -> list[int]:
        kept = set(self.keep)
        return [i for i in range(self.num_layers) if i not in kept]

    def mask(self, device=None) -> torch.Tensor:
        m = torch.zeros(self.num_layers, device=device)
        m[self.keep] = 1.0
        return m


_METHODS: dict[str, Callable[..., Selection]] = {}
_RECOVERY: dict[str, dict] = {}
_CONFIGS: dict[str, tuple[type | None, tuple[str, ...]]] = {}


def register(name: str, *, config: type | None = None, shared: tuple[str, ...] = (),
             recovery: dict | None = None):
    """Register a method under `name` with its config class, the fields of that config
    that take the run's shared settings of the same name (`shared`), and its
    RecoveryConfig overrides."""
    def deco(fn):
        _METHODS[name] = fn
        _RECOVERY[name] = dict(recovery or {})
        _CONFIGS[name] = (config, tuple(shared))
        return fn

    return deco


def check_n_prune(n_prune: int, num_layers: int) -> None:
    if not isinstance(n_prune, int) or not 1 <= n_prune < num_layers:
        raise ValueError(f"n_prune must be an integer in [1, {num_layers - 1}] for a model "
                         f"with {num_layers} layers, got {n_prune!r}")


def check_calib_len(data: PruneData, method: str) -> None:
    """Next-token losses need calibration blocks of at least 2 tokens."""
    if data.calib.shape[1] < 2:
        raise ValueError(f"{method} needs calibration blocks of at least 2 tokens")


def keep_lowest_removed(scores: torch.Tensor, n_prune: int) -> list[int]:
    """Keep all but the n_prune layers with the lowest score (ties: higher index removed
    first is arbitrary but fixed: stable sort on (score, -index))."""
    order = sorted(range(scores.numel()), key=lambda i: (float(scores[i]), -i))
    removed = set(order[:n_prune])
    return [i for i in range(scores.numel()) if i not in removed]


@contextmanager
def preserved_model_state(model):
    """Run a selection without leaving a trace on the model: restores every parameter's
    requires_grad and .grad, whether layer gates were installed, and their mask."""
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    gate_state = getattr(model, _STATE, None)
    mask = None if gate_state is None else gate_state.mask
    try:
        yield model
    finally:
        for p, (flag, grad) in zip(params, saved):
            p.requires_grad_(flag)
            p.grad = grad
        if gate_state is None:
            remove_gates(model)
        else:
            gate_state.mask = mask
