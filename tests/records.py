"""Comparison of metric records (dicts from metrics.jsonl / report.json) key by key."""

from __future__ import annotations

import math
from numbers import Real


def assert_records_close(a: dict, b: dict, *, rel: float, abs: float, path: str = "") -> None:
    """a and b have the same keys; numbers agree within rel/abs, everything else exactly.

    A key present on one side must be present on the other (None is a value like any other:
    it only equals None). Nested dicts and lists are compared element by element.
    """
    assert isinstance(a, dict) and isinstance(b, dict), f"{path or 'record'}: not two dicts"
    assert a.keys() == b.keys(), (f"{path or 'record'}: keys differ: only left "
                                  f"{sorted(a.keys() - b.keys())}, only right "
                                  f"{sorted(b.keys() - a.keys())}")
    for k in a:
        _assert_close(a[k], b[k], rel=rel, abs=abs, path=f"{path}.{k}" if path else str(k))


def _assert_close(x, y, *, rel: float, abs: float, path: str) -> None:
    if isinstance(x, dict):
        assert_records_close(x, y, rel=rel, abs=abs, path=path)
    elif isinstance(x, (list, tuple)):
        assert isinstance(y, (list, tuple)) and len(x) == len(y), f"{path}: {x!r} vs {y!r}"
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_close(u, v, rel=rel, abs=abs, path=f"{path}[{i}]")
    elif isinstance(x, Real) and not isinstance(x, bool):
        assert isinstance(y, Real) and not isinstance(y, bool), f"{path}: {x!r} vs {y!r}"
        assert math.isclose(x, y, rel_tol=rel, abs_tol=abs), f"{path}: {x!r} vs {y!r}"
    else:
        assert x == y, f"{path}: {x!r} vs {y!r}"
