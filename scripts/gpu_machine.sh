#!/usr/bin/env bash
# Run asyncllm's GPU checks on an offline machine whose python3 already has CUDA torch.
#
#   bash scripts/gpu_machine.sh tests        # nox -s gpu_tests
#   bash scripts/gpu_machine.sh bench        # throughput (vs transformers) + attention
#   bash scripts/gpu_machine.sh soak         # asyncllm bench soak: 10,000 requests, float32
#
# Test tools that machine lacks (nox, pytest-asyncio and their needs) come from wheels in
# .whl/, fetched beforehand on a machine with network access:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 -d .whl nox pytest-asyncio argcomplete colorlog \
#     dependency-groups virtualenv distlib platformdirs humanize python-discovery packaging filelock
# A flash-attn wheel put in .whl/ too (../shared/wheels) is installed with them, so the GPU
# suite runs tests/gpu/test_flash_attn.py; without it those tests skip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/asyncllm-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/asyncllm-site .whl/*.whl
export PYTHONPATH=/tmp/asyncllm-site PYTHONUNBUFFERED=1
python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__, 'installed')" 2>/dev/null \
  || echo "flash_attn not installed: its tests will skip"
status=0
for what in "$@"; do
  case "$what" in
    tests)
      # Kernel tests spread over 8 processes; engine tests alone (they size pools from
      # free GPU memory).
      python3 -m nox -s gpu_tests -- tests/gpu/test_triton_attention.py -q -n 8 \
        -p no:cacheprovider 2>&1 | tee "$OUT/gpu-kernel-tests.log" || status=1
      python3 -m nox -s gpu_tests -- tests/gpu -q --ignore=tests/gpu/test_triton_attention.py \
        -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/gpu-engine-tests.log" || status=1 ;;
    bench)
      python3 -m asyncllm bench throughput --out "$OUT/throughput.json" 2>&1 \
        | tee "$OUT/throughput.log" || status=1
      python3 benchmarks/attention.py --out "$OUT/attention.json" 2>&1 \
        | tee "$OUT/attention.log" || status=1 ;;
    soak)
      PYTHONPATH=src:$PYTHONPATH python3 -m asyncllm bench soak --device cuda \
        --dtype float32 --tie-margin 1e-4 --no-progress --out "$OUT/soak.json" 2>&1 \
        | tee "$OUT/soak.log" || status=1 ;;
    *) echo "unknown step: $what" >&2; status=2 ;;
  esac
done
exit $status
