# shellcheck shell=bash
# Sourced by scripts/gpu_*.sh, from the repository root: readies a bare, offline GPU machine
# (python3 with CUDA torch, no network, nothing of ours installed) and is harmless to run
# again on a warm one.
#
#   source scripts/gpu_env.sh && gpu_env_setup || exit 1
#
# - The project runs from src/, put first on PYTHONPATH: no install, so pip never looks for
#   torch or any other dependency.
# - Wheels carried in .whl/ (git-ignored: flash-attn, pytest-asyncio, fastapi, uvicorn, ...;
#   see the README's GPU section) go into $ASYNCLLM_SITE with --no-index; --upgrade makes a
#   second run replace them where pip would otherwise keep the old copy.
# - nano-vllm's source carried in .peers/nano-vllm is found by `asyncllm bench throughput`.
# Afterwards: PYTHONPATH=$PWD/src:$ASYNCLLM_SITE[:what it was], PYTHONUNBUFFERED=1, and $PY
# the interpreter (python3, or $PYTHON).

ASYNCLLM_SITE=${ASYNCLLM_SITE:-/tmp/asyncllm-site}
PY=${PYTHON:-python3}

gpu_env_setup() {
  local wheels
  wheels=(.whl/*.whl)
  if [[ -e ${wheels[0]} ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$ASYNCLLM_SITE" "${wheels[@]}" || return 1
    echo "gpu_env: installed ${#wheels[@]} wheels from .whl/ into $ASYNCLLM_SITE"
  else
    echo "gpu_env: no .whl/ wheels: flash-attn tests skip, pytest-asyncio/server steps fail"
  fi
  export PYTHONPATH="$PWD/src:$ASYNCLLM_SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  "$PY" - <<'PY' || return 1
import importlib.util

import asyncllm
import torch

print("gpu_env: asyncllm from", asyncllm.__file__, "| torch", torch.__version__,
      "| cuda", torch.cuda.is_available())
for name in ("flash_attn", "pytest_asyncio", "fastapi", "uvicorn", "nox"):
    print(f"gpu_env: {name}:", "yes" if importlib.util.find_spec(name) else "no")
PY
}
