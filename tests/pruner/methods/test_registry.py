import ast
from pathlib import Path

import pytest

from e3pruner.methods import available_methods, method_config
from e3pruner.methods.clp import CLPConfig
from e3pruner.methods.e3 import E3Config
from e3pruner.methods.self_pruner import SelfPrunerConfig

SETTINGS = {"weighting": "confidence", "amp": None, "population": 7, "generations": 3,
            "operator": "classic", "lr": 123.0}


def test_each_method_builds_its_registered_config_from_the_shared_settings():
    e3 = method_config("e3", SETTINGS)
    assert isinstance(e3, E3Config) and (e3.weighting, e3.amp) == ("confidence", None)
    assert e3.lr == E3Config().lr  # a shared setting the method did not register stays out
    clp = method_config("clp", SETTINGS)
    assert isinstance(clp, CLPConfig) and clp.weighting == CLPConfig().weighting
    for name in ("self-pruner", "self-pruner-width"):
        sp = method_config(name, SETTINGS)
        assert isinstance(sp, SelfPrunerConfig)
        assert (sp.population, sp.generations, sp.operator) == (7, 3, "classic")
    for name in set(available_methods()) - {"e3", "clp", "self-pruner", "self-pruner-width"}:
        assert method_config(name, SETTINGS) is None
    with pytest.raises(ValueError, match="unknown method"):
        method_config("nope", SETTINGS)


def test_the_interface_module_imports_nothing_inside_a_function():
    tree = ast.parse(Path(__file__).resolve().parents[3].joinpath(
        "e3pruner/methods/base.py").read_text())
    nested = [n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert nested == []
