#!/usr/bin/env bash
# Regenerate constraints.txt: a throwaway venv gets the newest versions pyproject.toml admits
# (E3_UNLOCKED=1 ./install.sh), and its exact package set becomes the lock. Run the test
# suite on it before committing (the script prints the command).
#   tools/update_lock.sh [WORKDIR]      (WORKDIR is kept: its venv holds the new set)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/e3-lock.XXXXXX")}
E3_UNLOCKED=1 "$ROOT/tools/fresh_install.sh" "$WORK"
"$WORK/venv/bin/python" "$ROOT/tools/lock.py" freeze "$ROOT/constraints.txt"
(cd "$ROOT" && git --no-pager diff --stat -- constraints.txt || true)
echo "now test the new set: (cd $WORK/src && $WORK/venv/bin/python -m pytest -q)"
