"""The KV-cache argument of transformers models, across the versions pyproject.toml admits.

transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`
(the old name warns: removed in 5.40); earlier 4.56+ / 5.x releases know only the old name.
Our code passes and reads the cache only through these helpers.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=None)
def _forward_takes_cache(cls: type) -> bool:
    try:
        return "cache" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_kwargs(model, cache) -> dict[str, Any]:
    """{name: cache} for `model(...)`: `cache` where its forward takes it, else `past_key_values`."""
    name = "cache" if _forward_takes_cache(type(model)) else "past_key_values"
    return {name: cache}


def output_cache(out):
    """The cache a forward returned (`out.cache`, or `out.past_key_values` before 5.24)."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    return getattr(out, "cache" if "cache" in fields else "past_key_values")


def layer_cache(kwargs: dict):
    """The cache a decoder layer was called with (None when it runs without one)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")
