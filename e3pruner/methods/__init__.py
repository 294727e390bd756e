"""Layer-selection methods under one interface (see base.py). Importing this package
registers every method."""

from e3pruner.methods import e3, shortgpt  # noqa: F401
from e3pruner.methods.base import (
    Budget,
    PruneData,
    Selection,
    available_methods,
    get_method,
    register,
)

__all__ = ["Budget", "PruneData", "Selection", "available_methods", "get_method", "register"]
