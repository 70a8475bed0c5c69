#!/usr/bin/env bash
# Tensor parallelism on a bare two-GPU machine (nvidia-h200-x2): the GPU TP tests and
# `asyncllm bench tp` (TP=1 vs TP=2 on a Qwen3-8B-shaped random model). Nothing to install:
# the project runs from src/, the tests are plain pytest (no pytest-asyncio).
#
#   bash scripts/gpu_tp.sh                 # broadcast tests bench  (about 6-8 minutes)
#   bash scripts/gpu_tp.sh tests           # one step (or several, in the order given)
#
# Steps: broadcast  step-input broadcast alone, two processes over gloo   -> broadcast.json
#        tests      tests/gpu/test_tp_gpu.py (parity, graphs with NCCL, dead worker)  -> tests.log
#        allreduce  all-reduce per call, NCCL and peer memory, eager and in a graph -> allreduce.json
#        bench      asyncllm bench tp (ITL, tok/s, NCCL per step, parity) -> bench_tp.json/.log
# TP_BENCH_ARGS adds options to `bench tp` (e.g. --skip-parity). Everything lands in $OUT (default /tmp/asyncllm-out); the trace of this script in $OUT/log.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/asyncllm-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
set -x

# NVLink multicast stays off on these machines (see the device notes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=${WORK:-/tmp/asyncllm-bench}
PY=${PYTHON:-python3}  # an interpreter with CUDA torch
mkdir -p "$WORK"

gpus() {  # what holds the GPUs now (nothing, between steps)
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader || true
}

{
  date -u
  nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv
  nvidia-smi topo -m
  "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
  env | grep -E '^(NCCL|TORCH|NVSHMEM)' | sort
} > "$OUT/env.txt" 2>&1

status=0
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(broadcast tests bench)
for step in "${steps[@]}"; do
  start=$(date +%s)
  case "$step" in
    broadcast)
      timeout -k 10 90 "$PY" -m asyncllm bench tp --broadcast-only \
        --out "$OUT/broadcast.json" || status=1 ;;
    allreduce)
      timeout -k 10 120 "$PY" -c "import json, sys; from asyncllm.bench.tensor_parallel import allreduce_probe; r = allreduce_probe(4096, 36); json.dump(r, sys.stdout, indent=1); sys.exit('error' in r)" \
        > "$OUT/allreduce.json" || status=1
      cat "$OUT/allreduce.json" ;;
    tests)
      timeout -k 10 270 "$PY" -m pytest -m gpu tests/gpu/test_tp_gpu.py -v \
        -p no:cacheprovider --durations=10 > "$OUT/tests.log" 2>&1 || status=1
      tail -n 30 "$OUT/tests.log" ;;
    bench)
      timeout -k 10 560 "$PY" -m asyncllm bench tp --model-shape qwen3-8b --work-dir "$WORK" \
        --out "$OUT/bench_tp.json" ${TP_BENCH_ARGS:-} > "$OUT/bench_tp.log" 2>&1 || status=1
      tail -n 80 "$OUT/bench_tp.log" ;;
    *) echo "unknown step: $step" >&2; status=2 ;;
  esac
  echo "step $step: $(( $(date +%s) - start )) s, status so far $status"
  gpus
done
exit $status
