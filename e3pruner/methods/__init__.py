"""Layer-selection methods under one interface (base.py). Importing this package registers
every method; the lookups below see them all."""

from __future__ import annotations

from collections.abc import Callable

from e3pruner.methods import (  # noqa: F401
    angular,
    clp,
    e3,
    ppl,
    replaceme,
    reverse_order,
    self_pruner,
    shortgpt,
    sleb,
    taylor,
)
from e3pruner.methods.base import _CONFIGS, _METHODS, _RECOVERY, Budget, PruneData, Selection, register


def get_method(name: str) -> Callable[..., Selection]:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(_METHODS)}")
    return _METHODS[name]


def available_methods() -> list[str]:
    return sorted(_METHODS)


def method_recovery(name: str) -> dict:
    """RecoveryConfig field overrides the method defines (e.g. CLP: endpoint tuning)."""
    get_method(name)
    return dict(_RECOVERY[name])


def method_config(name: str, settings: dict):
    """The method's config built from the run's shared `settings` (the fields it registered
    as `shared`), or None for a method without a config."""
    get_method(name)
    cls, shared = _CONFIGS[name]
    if cls is None:
        return None
    return cls(**{k: settings[k] for k in shared})


__all__ = ["Budget", "PruneData", "Selection", "available_methods", "get_method", "method_config",
           "method_recovery", "register"]
