#!/usr/bin/env bash
# Copy this work tree (tracked + untracked, not ignored files) to DIR/src, make a venv DIR/venv
# and run install.sh there. Used by update_lock.sh and check_latest.sh; the environment
# (E3_UNLOCKED, E3_TORCH_VERSION, ...) passes through to install.sh.
#   tools/fresh_install.sh DIR
set -euo pipefail
DIR=${1:?usage: tools/fresh_install.sh DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE_PY=${BASE_PYTHON:-python3}
mkdir -p "$DIR/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
   | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
   | tar --null -T - -cf -) | tar -xf - -C "$DIR/src"
"$BASE_PY" -m venv "$DIR/venv"
echo "fresh install in $DIR (python: $("$DIR/venv/bin/python" --version))"
(cd "$DIR/src" && PYTHON="$DIR/venv/bin/python" ./install.sh)
