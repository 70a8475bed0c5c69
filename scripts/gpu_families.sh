#!/usr/bin/env bash
# The model families on a bare GPU machine (python3 with CUDA torch, Triton, transformers;
# no network, nothing installed): results as JSON plus logs in $OUT.
#
#   bash scripts/gpu_families.sh            # all steps, in this order (about 10 minutes)
#   bash scripts/gpu_families.sh dense      # ~6 min: nano-vllm workload, Llama-3.2-1B and
#                                           #   Qwen2.5-0.5B shapes, vs transformers
#   bash scripts/gpu_families.sh moe tests  # ~4 min: Qwen3-30B-A3B shape (8 of 48 layers)
#                                           #   decode tok/s, fused MoE kernel vs loop; tests
#
# Steps:
#   dense  asyncllm bench throughput --model-shape llama-3.2-1b / qwen2.5-0.5b (random bf16,
#          the nano-vllm workload, transformers generate_batch in the same run)
#   moe    asyncllm bench decode on a Qwen3-30B-A3B-shaped model cut to 8 layers (~11 GB):
#          batch 1, 64, 256 with the fused kernel and CUDA graphs; batch 64 with the
#          per-expert torch loop (eager: it syncs the host) for the model-level ratio; then
#          benchmarks/moe.py (one MoE layer, fused vs per-expert loop, batch 1..512)
#   tests  the families' GPU tests and the fused MoE kernel tests (no pytest-asyncio needed)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/asyncllm-out}
MODELS=${MODELS:-/tmp/asyncllm-models}   # random checkpoints (about 15 GB in all)
mkdir -p "$OUT" "$MODELS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(dense moe tests)
status=0

run() {  # run NAME COMMAND...: log to $OUT/NAME.log, keep going on failure
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$OUT/steps.log"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/steps.log"
  [ "$rc" -eq 0 ] || status=1
}

for step in "${steps[@]}"; do
  case "$step" in
    dense)
      for shape in llama-3.2-1b qwen2.5-0.5b; do
        run "throughput-$shape" python3 -m asyncllm bench throughput --model-shape "$shape" \
          --work-dir "$MODELS" --out "$OUT/throughput-$shape.json"
      done ;;
    moe)
      moe=(--model-shape qwen3-30b-a3b --num-layers 8 --work-dir "$MODELS")
      run decode-qwen3-30b-a3b-8l python3 -m asyncllm bench decode "${moe[@]}" \
        --batches 1,64,256 --out "$OUT/decode-qwen3-30b-a3b-8l.json"
      run decode-qwen3-30b-a3b-8l-loop python3 -m asyncllm bench decode "${moe[@]}" \
        --batches 64 --moe-impl loop --output-len 64 --out "$OUT/decode-qwen3-30b-a3b-8l-loop.json"
      run moe-kernel python3 benchmarks/moe.py --out "$OUT/moe-kernel.json" ;;
    tests)
      run gpu-families-tests python3 -m pytest -m gpu -q -p no:cacheprovider --durations=10 \
        tests/gpu/test_families_gpu.py tests/gpu/test_fused_moe.py ;;
    *) echo "unknown step: $step (dense, moe, tests)" >&2; status=2 ;;
  esac
done
exit $status
