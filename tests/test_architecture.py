"""The import rules of docs/architecture.md, checked on the source (ast, nothing imported):

* a method never imports another method (e3pruner/methods/<name>.py or methods/<name>/);
* only the orchestration (pipeline, cli, compare) imports a method;
* e3kernels never imports e3pruner; nothing in e3pruner/ imports bench/ (the one
  exception, eval/decode.py, loads bench/common.py by path when the checkout has it, for
  device names in decode reports, and works without it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = {"e3pruner.pipeline", "e3pruner.cli", "e3pruner.compare"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str) -> set[str]:
    """Every module `source` (the text of `module`) imports, at any depth, absolute names."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            out.update(f"{prefix}.{alias.name}" for alias in node.names)
    return out


def method_of(module: str) -> str | None:
    """The method a module belongs to (e3pruner.methods.<name>...), None for the rest."""
    parts = module.split(".")
    if len(parts) < 3 or parts[:2] != ["e3pruner", "methods"] or parts[2] == "base":
        return None
    return parts[2]


def violations(modules: dict[str, str]) -> list[str]:
    """The broken rules in {module name: source}, one line each."""
    bad: set[str] = set()
    for mod, src in modules.items():
        own = method_of(mod)
        for imp in imported_modules(src, mod):
            target = method_of(imp)
            if target is not None and own is not None and target != own:
                bad.add(f"{mod} (method {own}) imports method {target}")
            if (target is not None and own is None and mod not in ORCHESTRATION
                    and mod != "e3pruner.methods" and mod.startswith("e3pruner")):
                bad.add(f"{mod} imports method {target}: only {sorted(ORCHESTRATION)} may")
            if mod.startswith("e3kernels") and imp.split(".")[0] == "e3pruner":
                bad.add(f"{mod} imports e3pruner: e3kernels must not depend on it")
            if mod.startswith("e3pruner") and imp.split(".")[0] in ("bench", "common"):
                bad.add(f"{mod} imports from bench/")
    return sorted(bad)


def repo_modules() -> dict[str, str]:
    return {module_name(p): p.read_text() for pkg in ("e3pruner", "e3kernels")
            for p in sorted((ROOT / pkg).rglob("*.py"))}


def test_the_repository_keeps_the_import_rules():
    mods = repo_modules()
    assert "e3pruner.methods.e3" in mods and "e3kernels" in mods
    assert violations(mods) == []


def test_every_rule_catches_a_bad_import():
    bad = {
        "e3pruner.methods.clp": "from e3pruner.methods.e3 import batch_at\n",
        "e3pruner.recovery.distill": "def f():\n    from e3pruner.methods import e3\n",
        "e3pruner.methods.self_pruner.search": "from .width import x\nfrom ..ppl import lm_nll\n",
        "e3kernels.kd_loss": "import e3pruner.models\n",
        "e3pruner.eval.decode": "from bench.common import device_info\n",
    }
    found = violations(bad)
    assert any("clp (method clp) imports method e3" in v for v in found)
    assert any("recovery.distill imports method e3" in v for v in found)
    assert any("self_pruner) imports method ppl" in v for v in found)
    assert not any("imports method width" in v for v in found)  # its own helper
    assert any("e3kernels must not depend" in v for v in found)
    assert any("from bench/" in v for v in found)
    assert len(found) == 5


def test_the_orchestration_and_the_interface_may_import_methods():
    ok = {"e3pruner.pipeline": "from e3pruner.methods.e3 import E3Config\n",
          "e3pruner.methods.taylor": "from e3pruner.methods.base import register\n",
          "e3pruner.methods": "from e3pruner.methods import e3, clp\n"}
    assert violations(ok) == []


def test_only_the_decode_benchmark_reads_bench_files():
    readers = sorted(mod for mod, src in repo_modules().items()
                     if mod.startswith("e3pruner") and '/ "bench"' in src)
    assert readers == ["e3pruner.eval.decode"]
