"""Tensor parallelism on two GPUs (NCCL): float32 greedy parity with one GPU, CUDA graphs with
the all-reduces inside them against eager, and a dead worker on the GPU.

Plain (synchronous) tests: the bare GPU machine has no pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm import LLM, AsyncEngine, SamplingParams, errors
from tests.models import write_random_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

# 8 query heads and 4 KV heads: 4 and 2 per rank.
TP_SHAPE = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
)  # fmt: skip
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tp-gpu-model")
    write_random_model(directory, seed=5, **TP_SHAPE)
    return directory


def prompts_of(count: int, seed: int, max_len: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = TP_SHAPE["vocab_size"]
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def greedy_tokens(model_dir: Path, prompts: list[list[int]], **overrides: Any) -> list[list[int]]:
    settings: dict[str, Any] = dict(device="cuda", num_kv_blocks=2048, max_num_seqs=64)
    settings.update(overrides)
    with LLM(str(model_dir), **settings) as llm:
        runner = llm.engine._core.runner
        assert runner is not None
        assert (runner.graphs is not None) == (not settings.get("enforce_eager", False))
        return [out.token_ids for out in llm.generate(prompts, GREEDY)]


def test_two_gpus_give_the_same_greedy_tokens_as_one_in_float32(tp_model_dir: Path) -> None:
    """Crowded and chunked (64-token steps), with CUDA graphs and overlapped scheduling."""
    prompts = prompts_of(48, seed=1)
    one = greedy_tokens(tp_model_dir, prompts, dtype="float32", max_num_batched_tokens=256)
    two = greedy_tokens(tp_model_dir, prompts, dtype="float32", max_num_batched_tokens=256,
                        tensor_parallel_size=2)  # fmt: skip
    assert two == one


# Run where no engine has mapped peer memory yet: a fresh interpreter.
_PEER_SCRIPT = """
import json, os, sys
from asyncllm import LLM
from tests.gpu.test_tp_gpu import GREEDY, prompts_of

def run(**overrides):
    # Prefill chunks of 3,000 tokens: sums of 3 MB, which peer memory takes two-shot.
    with LLM(sys.argv[1], device="cuda", dtype="float32", tensor_parallel_size=2,
             num_kv_blocks=2048, max_num_seqs=64, max_num_batched_tokens=3000,
             **overrides) as llm:
        tokens = [o.token_ids for o in llm.generate(prompts_of(48, seed=3), GREEDY)]
        return tokens, llm.engine._core.runner.tp.peer is not None

first, first_peer = run(peer_all_reduce=True)
nccl, nccl_peer = run()
second, second_peer = run(peer_all_reduce=True)
print(json.dumps(dict(first=first, first_peer=first_peer, nccl=nccl, nccl_peer=nccl_peer,
                      second=second, second_peer=second_peer)), flush=True)
os._exit(0)  # torch 2.11 aborts at exit after symmetric memory (EngineConfig.peer_all_reduce)
"""


@pytest.fixture(scope="module")
def peer_runs(tp_model_dir: Path) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}
    done = subprocess.run([sys.executable, "-c", _PEER_SCRIPT, str(tp_model_dir)], env=env,
                          capture_output=True, text=True, timeout=240, check=True)  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_sums_over_peer_memory_give_the_same_tokens_as_nccl(peer_runs: dict[str, Any]) -> None:
    """Two H200s of one host reach each other's memory: decode steps' sums (up to 64 x 256
    floats) go over it one-shot, prefill chunks' (3,000 x 256 floats, 3 MB) two-shot; in
    float32 every path rounds once."""
    assert peer_runs["first_peer"] and not peer_runs["nccl_peer"]
    assert peer_runs["first"] == peer_runs["nccl"]


def test_a_later_engine_of_the_process_takes_nccl_and_still_works(
    peer_runs: dict[str, Any],
) -> None:
    """Its fresh workers could not match the process's symmetric-memory exchange count."""
    assert not peer_runs["second_peer"]
    assert peer_runs["second"] == peer_runs["first"]


def test_cuda_graphs_with_nccl_inside_give_the_same_tokens_as_eager(tp_model_dir: Path) -> None:
    prompts = prompts_of(48, seed=2)
    graphed = greedy_tokens(tp_model_dir, prompts, dtype="bfloat16", tensor_parallel_size=2)
    eager = greedy_tokens(tp_model_dir, prompts, dtype="bfloat16", tensor_parallel_size=2,
                          enforce_eager=True)  # fmt: skip
    assert graphed == eager


def worker_children() -> list[int]:
    """Pids of this process's children (from /proc: the GPU machine has no psutil)."""
    me, children = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                children.append(int(entry.name))
    return children


def test_a_killed_gpu_worker_fails_the_streams_and_shutdown_frees_both_gpus(
    tp_model_dir: Path,
) -> None:
    free_before = [torch.cuda.mem_get_info(i)[0] for i in (0, 1)]

    async def run() -> None:
        engine = AsyncEngine.from_pretrained(
            str(tp_model_dir), device="cuda", num_kv_blocks=2048, tensor_parallel_size=2
        )
        async with engine:
            pool = engine._core.runner.workers  # type: ignore[union-attr]
            assert pool is not None
            params = SamplingParams(max_tokens=900, ignore_eos=True)  # max_model_len is 1024
            streams = [engine.stream([1, 2, i], params) for i in range(8)]
            await streams[0].__anext__()
            os.kill(pool.pids[0], signal.SIGKILL)
            for stream in streams:
                with pytest.raises(errors.EngineError, match="rank 1"):
                    async for _ in stream:
                        pass
            with pytest.raises(errors.EngineDeadError):
                engine.stream([1])

    started = time.monotonic()
    asyncio.run(asyncio.wait_for(run(), timeout=120))
    assert time.monotonic() - started < 120
    assert worker_children() == []
    gc.collect()
    torch.cuda.synchronize(0)  # nothing left waiting on the dead rank (its NCCL was aborted)
    torch.cuda.empty_cache()
    free_after = [torch.cuda.mem_get_info(i)[0] for i in (0, 1)]
    for before, after in zip(free_before, free_after):  # within 1 GiB of where it started
        assert after > before - (1 << 30), (free_before, free_after)
