#!/usr/bin/env bash
# The canary for tomorrow's releases: a throwaway venv with the newest versions that
# pyproject.toml admits (no lock), then the fast suite (-m "not slow") on a copy of this tree.
# Prints which packages differ from constraints.txt, and the pytest result. Exit code: pytest's.
#   tools/check_latest.sh [WORKDIR]     (default: a new temp dir, removed at the end)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ $# -ge 1 ]]; then WORK=$1; KEEP=1; else WORK=$(mktemp -d "${TMPDIR:-/tmp}/e3-latest.XXXXXX"); KEEP=0; fi
cleanup() { [[ $KEEP == 1 ]] || rm -rf "$WORK"; }
trap cleanup EXIT
t0=$(date +%s)
E3_UNLOCKED=1 E3_REQUIRE_CPP=1 "$ROOT/tools/fresh_install.sh" "$WORK"
"$WORK/venv/bin/python" "$ROOT/tools/lock.py" freeze "$WORK/latest.txt" >/dev/null
echo "== newer than the lock (lock -> latest):"
diff <(grep -v '^#' "$ROOT/constraints.txt") <(grep -v '^#' "$WORK/latest.txt") \
  | sed -n 's/^> /  now: /p; s/^< /  lock: /p' || true
echo "== fast suite on the newest versions"
set +e
(cd "$WORK/src" && "$WORK/venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider)
rc=$?
set -e
echo "== canary: pytest exit code $rc, $(( $(date +%s) - t0 )) s in all"
exit $rc
