#!/usr/bin/env bash
# One prepared GPU measurement, run whole on a lent GPU machine (the `device` tool) in under
# 8 minutes on an H200, so a 15-minute lease can run it twice. It writes under $OUT:
#   bench_gpu.json      every case of benchmarks/bench_gpu.py (tokens/s, memory, FLOPs, fraction of peak)
#   bench_gpu.log       its table and ratios
#   gpu_check.json/.log the reference implementation's step beside e2edict's (../shared/tools/gpu_check.py)
#   profile-ours.txt    torch.profiler table of e2edict's bf16 step (top kernels)
#
# Before the call, here: `bash scripts/prepare_gpu_wheels.sh` (fills the ignored .dev/ with the
# wheels the GPU machine lacks and a copy of gpu_check.py). The call:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".dev"], timeout_s=540)
# A CPU dry run of every step on small shapes (no wheels needed when the venv has them):
#   SMOKE=1 OUT=out/gpu-smoke PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
# (gpu_check.py's own dry run also needs `pip install --no-deps e2e-sae==2.1.1` in that environment)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
if [[ "${SMOKE:-}" != 1 && -d .dev/whl ]] && ls .dev/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${SMOKE:-}" == 1 ]]; then
  DEVICE=cpu SHAPE=small STEPS=3 CASES="--cases tl-e2e-relu tl-local-relu hf-e2e-relu"
else
  DEVICE=cuda SHAPE=gpt2 STEPS=${STEPS:-20} CASES=""
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
step() {  # name, time limit (s), command...: each step bounded, the others still run if one fails
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}
# shellcheck disable=SC2086
step bench_gpu 270 $PY benchmarks/bench_gpu.py --device $DEVICE --shape $SHAPE --steps $STEPS $CASES --json "$OUT/bench_gpu.json"
if [[ -f .dev/gpu_check.py ]]; then
  step gpu_check 150 env OUT="$OUT" $PY .dev/gpu_check.py
  step profile 50 env OUT="$OUT" $PY .dev/gpu_check.py profile ours
else
  echo "== gpu_check skipped: run scripts/prepare_gpu_wheels.sh first (copies ../shared/tools/gpu_check.py to .dev/)"
fi
ls -la "$OUT"
