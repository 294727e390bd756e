"""Self-Pruner: evolutionary layer (or width) search whose operators an LLM proposes
(search.py), with its private helpers: the LLM operators (llm_operator.py) and width
masking (width.py)."""

from e3pruner.methods.self_pruner.search import (
    CalibFitness,
    ClassicOperators,
    LayerSpace,
    SelfPrunerConfig,
    WidthSpace,
    evolve,
    select,
    select_width,
    tournament,
)

__all__ = ["CalibFitness", "ClassicOperators", "LayerSpace", "SelfPrunerConfig", "WidthSpace",
           "evolve", "select", "select_width", "tournament"]
