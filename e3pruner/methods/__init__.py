"""Layer-selection methods under one interface (see base.py). Importing this package
registers every method."""

from e3pruner.methods import angular, clp, e3, ppl, self_pruner, shortgpt, sleb, taylor  # noqa: F401
from e3pruner.methods.base import (
    Budget,
    PruneData,
    Selection,
    available_methods,
    get_method,
    method_recovery,
    register,
)

__all__ = ["Budget", "PruneData", "Selection", "available_methods", "get_method", "method_recovery",
           "register"]
