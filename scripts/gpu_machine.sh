#!/usr/bin/env bash
# Run asyncllm's GPU checks on a bare, offline machine whose python3 already has CUDA torch
# (scripts/gpu_env.sh readies it: src/ on PYTHONPATH, wheels from .whl/; safe to run twice).
#
#   bash scripts/gpu_machine.sh tests       # the GPU suite (kernel tests in parallel, then the rest)
#   bash scripts/gpu_machine.sh throughput  # asyncllm bench throughput vs nano-vllm and transformers
#   bash scripts/gpu_machine.sh bench       # throughput, then benchmarks/attention.py
#   bash scripts/gpu_machine.sh trace       # one asyncllm-only run with --trace: where its time went
#   bash scripts/gpu_machine.sh soak        # asyncllm bench soak: 10,000 requests, float32
#
# Carried, git-ignored folders (see the README's GPU section):
#   .whl/             wheels the machine lacks: pytest-asyncio for the tests, flash-attn
#                     (../shared/wheels) for its tests and for nano-vllm
#   .peers/nano-vllm  a copy of ../shared/peers/nano-vllm: the nano-vllm peer of `throughput`
#                     (another folder: NANO_VLLM_PATH=...); without it that peer is skipped
# Results and logs go to $OUT (default /tmp/asyncllm-out).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/asyncllm-out}
WORK=${WORK:-/tmp/asyncllm-bench}  # the random checkpoint, written on first use
mkdir -p "$OUT" "$WORK"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh
gpu_env_setup || exit 1

bench_throughput() {  # $1: the log's name in $OUT; the rest: options (then THROUGHPUT_ARGS)
  local log=$1
  shift
  # shellcheck disable=SC2086  # word splitting of THROUGHPUT_ARGS intended
  "$PY" -m asyncllm bench throughput --block-size 256 --work-dir "$WORK" "$@" \
    ${THROUGHPUT_ARGS:-} 2>&1 | tee "$OUT/$log"
}

throughput() {  # the issue-11 run: block 256, both peers, the floor; JSON in $OUT
  # THROUGHPUT_ARGS adds options (e.g. --num-decode-steps 4).
  bench_throughput throughput.log --peers nano-vllm,transformers \
    --nano-vllm-path "${NANO_VLLM_PATH:-.peers/nano-vllm}" --out "$OUT/throughput-h200.json"
}

status=0
for what in "$@"; do
  case "$what" in
    tests)
      # Kernel tests spread over 8 processes; engine tests alone (they size pools from
      # free GPU memory).
      "$PY" -m pytest -m gpu tests/gpu/test_triton_attention.py -q -n 8 -p no:cacheprovider \
        2>&1 | tee "$OUT/gpu-kernel-tests.log" || status=1
      "$PY" -m pytest -m gpu tests/gpu -q --ignore=tests/gpu/test_triton_attention.py \
        -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/gpu-engine-tests.log" || status=1 ;;
    throughput)
      throughput || status=1 ;;
    trace)
      # The same workload and THROUGHPUT_ARGS, no peers; trace_summary in the JSON gives each
      # run's stream busy fraction and each kind of step's stream and launch time.
      bench_throughput traced.log --peers none --trace "$OUT/trace.json" \
        --out "$OUT/traced.json" || status=1 ;;
    bench)
      throughput || status=1
      "$PY" benchmarks/attention.py --out "$OUT/attention.json" 2>&1 \
        | tee "$OUT/attention.log" || status=1 ;;
    soak)
      "$PY" -m asyncllm bench soak --device cuda --dtype float32 --tie-margin 1e-4 \
        --no-progress --out "$OUT/soak.json" 2>&1 | tee "$OUT/soak.log" || status=1 ;;
    *) echo "unknown step: $what (tests, throughput, trace, bench, soak)" >&2; status=2 ;;
  esac
done
exit $status
