"""e3pruner: layer pruning of causal LMs (search, distillation, export). Calls e3kernels."""

__version__ = "0.1.0"
