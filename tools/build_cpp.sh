#!/usr/bin/env bash
# Rebuild e3kernels._C in place (incremental, ~10-30 s). Serialized with a lock so that
# parallel sessions never build into the same tree at once.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/e3kernels-build.lock env E3_REQUIRE_CPP=1 python setup.py -q build_ext --inplace
