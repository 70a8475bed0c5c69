#!/usr/bin/env bash
# The serving benchmark on an offline GPU machine whose python3 has CUDA torch:
# Qwen3-0.6B's shape (random bf16 weights), 256 requests of U[100, 1024] prompt and output
# tokens sent at once to `asyncllm serve` (a child process) as 256 concurrent streams, then
# the same load on an in-process AsyncEngine (the server paces its events: the default
# --max-event-rate); the burst again with one event per token; then a Poisson run for
# latencies. Target: output tok/s through HTTP >= 90% of the in-process
# streams. Takes about 5 minutes (four model loads).
#
#   bash scripts/gpu_serve.sh          # JSON and logs go to $OUT (default /tmp/asyncllm-out)
#
# The server's packages that machine lacks come as wheels in .whl/ (git-ignored), fetched
# beforehand where pip has network access (the machine already has anyio, click, h11,
# httpx, uvloop and prometheus-client):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl fastapi==0.165.0 starlette==1.10.0 \
#     pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing-extensions==4.16.0 annotated-doc==0.0.7 \
#     opentelemetry-api==1.45.2 uvicorn==0.54.0 httptools==0.9.0
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/asyncllm-out}
mkdir -p "$OUT"
# src/ and the wheels' folder on PYTHONPATH (scripts/gpu_env.sh): the server runs as a child
# process and inherits it.
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh
gpu_env_setup || exit 1
python3 -c "import fastapi, uvicorn" || { echo "fastapi/uvicorn missing: carry them in .whl/"; exit 1; }
MODEL=/tmp/asyncllm-qwen3-0.6b-random
python3 -c "from pathlib import Path; from asyncllm.bench.model import write_random_qwen3; \
write_random_qwen3(Path('$MODEL'))" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
status=0
# 1. All at once: 256 concurrent streams over HTTP, then the same in process.
python3 -m asyncllm bench serve --model "$MODEL" --num-requests 256 --request-rate inf \
  --prompt-len 100 1024 --output-len 100 1024 --temperature 0.6 --compare-in-process \
  --no-progress --out "$OUT/serve-burst.json" 2>&1 | tee "$OUT/serve-burst.log" || status=1
# 2. The same burst with one event per token whatever the load (--max-event-rate 0).
python3 -m asyncllm bench serve --model "$MODEL" --num-requests 256 --request-rate inf \
  --prompt-len 100 1024 --output-len 100 1024 --temperature 0.6 --max-event-rate 0 \
  --no-progress --out "$OUT/serve-burst-per-token.json" 2>&1 \
  | tee "$OUT/serve-burst-per-token.log" || status=1
# 3. Poisson arrivals at 16 requests/s: latencies below saturation.
python3 -m asyncllm bench serve --model "$MODEL" --num-requests 256 --request-rate 16 \
  --prompt-len 100 1024 --output-len 100 1024 --temperature 0.6 \
  --no-progress --out "$OUT/serve-poisson16.json" 2>&1 | tee "$OUT/serve-poisson16.log" || status=1
exit $status
