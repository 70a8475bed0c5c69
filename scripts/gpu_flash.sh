#!/usr/bin/env bash
# The flash-attn backend on the offline H200, in one run (about 6 minutes, 9 at most):
#
#   OUT=/some/dir bash scripts/gpu_flash.sh        # logs, JSON and summary.txt in $OUT
#
# Carried, git-ignored folders:
#   .whl/    flash_attn-2.8.3-*.whl (from ../shared/wheels) and pytest_asyncio-*.whl
#   .peers/  optional: a copy of ../shared/peers/nano-vllm, for the peer's number
#
# Steps, each under its own time limit inside one budget (BUDGET_S, default 530 s), each
# logged to $OUT/<step>.log; a step that fails does not stop the others:
#   env       versions, the flash-attn import, its kernel probe, what "auto" picks
#   tests     tests/gpu/test_flash_attn.py + tests/test_attention_backend_choice.py
#   bench-*   asyncllm bench throughput --block-size 256, flash_attn then triton
#   nanovllm  nano-vllm on the same workload (if .peers/nano-vllm is there)
#   kernels   benchmarks/attention_backends.py: decode/prefill kernels, Triton vs flash-attn
# and last a summary table (scripts/gpu_flash_summary.py, also in $OUT/summary.txt).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/asyncllm-flash}
BUDGET_S=${BUDGET_S:-530}
WORK=/tmp/asyncllm-bench
mkdir -p "$OUT" "$WORK"
: > "$OUT/steps.txt"
exec > >(tee "$OUT/gpu_flash.log") 2>&1

step() {  # step NAME CAP_S CMD...: run CMD for at most min(CAP_S, the budget left)
  local name=$1 cap=$2 left limit start rc
  shift 2
  left=$((BUDGET_S - SECONDS))
  limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    echo "### $name: SKIPPED, the time budget is spent"
    echo "$name skipped" >>"$OUT/steps.txt"
    return
  fi
  echo "### $name (limit ${limit}s, at ${SECONDS}s)"
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "### $name: exit $rc after $((SECONDS - start))s"
  echo "$name exit=$rc seconds=$((SECONDS - start))" >>"$OUT/steps.txt"
}

# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh
gpu_env_setup || exit 1
[[ -n $(compgen -G ".whl/flash_attn-*.whl") ]] || echo "!!! no flash_attn wheel in .whl/: flash-attn steps will fail"

step env 60 python3 - <<'PY'
import subprocess, sys

import torch, triton

print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "sm", torch.cuda.get_device_capability())
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
print("commit", rev.stdout.strip() or "unknown (no .git)")
try:
    import flash_attn
    print("flash_attn", flash_attn.__version__, "from", flash_attn.__file__)
except Exception as exc:  # report and go on: the Triton steps still run
    print("!!! flash_attn does not import:", repr(exc))
from asyncllm.kernels import choose_attention_backend
from asyncllm.kernels.flash_attn import FlashAttention

cuda = torch.device("cuda")
for head_dim in (128, 64):
    reason = FlashAttention.unsupported_reason(cuda, 256, head_dim, torch.bfloat16)
    print(f"flash_attn at block 256, head_dim {head_dim}, bf16:", reason or "runs")
for block, dtype in ((256, torch.bfloat16), (16, torch.bfloat16), (256, torch.float32)):
    print(f"auto at block {block}, head_dim 128, {dtype}:",
          choose_attention_backend("auto", cuda, block, 128, dtype))
PY

step tests 240 python3 -m pytest tests/gpu/test_flash_attn.py tests/test_attention_backend_choice.py \
  -q -p no:cacheprovider -rfEs --durations=15 --junitxml="$OUT/tests.xml"

for backend in flash_attn triton; do
  step "bench-$backend" 150 python3 -m asyncllm -v bench throughput --block-size 256 \
    --attention-backend "$backend" --skip-transformers --work-dir "$WORK" \
    --out "$OUT/throughput-$backend.json"
done

if [[ -d .peers/nano-vllm/nanovllm ]]; then
  step nanovllm 150 python3 benchmarks/nanovllm_peer.py --nano-vllm-path .peers/nano-vllm \
    --model "$WORK/asyncllm-qwen3-0.6b-random" --out "$OUT/nanovllm.json"
else
  echo "### nanovllm: SKIPPED, no .peers/nano-vllm (cp -r ../shared/peers/nano-vllm .peers/)"
fi

step kernels 90 python3 benchmarks/attention_backends.py --out "$OUT/attention-backends.json"

python3 scripts/gpu_flash_summary.py "$OUT" | tee "$OUT/summary.txt"
