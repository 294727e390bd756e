#!/usr/bin/env bash
# One lent-GPU call (device tool): correctness first, then the GPU benchmarks, each under its
# own time limit so the whole script stays under the 10-minute per-call cap (about 8 min at
# most). JSON lands in bench/results/ (device named inside) and is copied to $OUT.
#   run(command="bash bench/gpu_session.sh", timeout_s=600)
set -u
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
OUT=${OUT:-/tmp/e3-gpu-out}
mkdir -p "$OUT"
PY=${PY:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "/tmp/e3-$name.log" 2>&1
  local rc=$?
  { echo "== $name: $*"; cat "/tmp/e3-$name.log"; } >> "$OUT/steps.log"
  tail -30 "/tmp/e3-$name.log"
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
}

step gpu_check 90 "$PY" bench/gpu_check.py
step fused_kd 150 "$PY" bench/bench_fused_kd.py --timeout 70 --repeats 5
step gumbel_topk 40 "$PY" bench/bench_gumbel_topk.py
step decode 200 "$PY" bench/decode_gpu.py --models qwen3-8b --batch-sizes 1,8 --repeats 3
cp bench/results/*cuda*.json bench/results/gpu_check_*.json bench/results/decode_gpu_*.json \
  "$OUT"/ 2>/dev/null || true
ls -l "$OUT"
