"""The blocking facade, submitting from foreign threads, and the command line."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from asyncllm import LLM, AsyncEngine, SamplingParams, errors

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def test_llm_generates_in_prompt_order(random_model_dir: Path) -> None:
    prompts = [[1, 2, 3], [4] * 30, [7, 8]]
    with LLM(str(random_model_dir), device="cpu", num_kv_blocks=64) as llm:
        outs = llm.generate(prompts, GREEDY)
        again = [llm.generate([p], GREEDY)[0] for p in prompts]
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [o.token_ids for o in outs] == [o.token_ids for o in again]


def test_llm_stream_iterates_from_a_plain_thread(random_model_dir: Path) -> None:
    with LLM(str(random_model_dir), device="cpu", num_kv_blocks=64) as llm:
        tokens = [t.token_id for t in llm.stream([5, 6], GREEDY)]
        assert tokens == llm.generate([[5, 6]], GREEDY)[0].token_ids
        iterator = llm.stream([5, 6], SamplingParams(max_tokens=500, ignore_eos=True))
        next(iterator)
        iterator.close()  # aborts
        stats = llm.stats()
        assert stats.kv_blocks_free + stats.kv_blocks_cached <= stats.kv_blocks_total


async def test_blocking_calls_inside_a_running_loop_raise(random_model_dir: Path) -> None:
    with pytest.raises(errors.BlockingCallError, match="AsyncEngine"):
        LLM(str(random_model_dir), device="cpu")


async def test_foreign_threads_stream_from_an_engine_in_this_loop(random_model_dir: Path) -> None:
    results: dict[int, list[int]] = {}

    def worker(index: int) -> None:
        results[index] = [t.token_id for t in engine.stream_threadsafe([index + 1] * 3, GREEDY)]

    async with AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", num_kv_blocks=64
    ) as engine:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:  # joined off the loop: it must keep running for the threads
            await anyio.to_thread.run_sync(t.join)
        direct = [(await engine.generate([i + 1] * 3, GREEDY)).token_ids for i in range(4)]
        with pytest.raises(errors.BlockingCallError):
            engine.generate_threadsafe([1], GREEDY)
    assert [results[i] for i in range(4)] == direct


def test_cli_generate_prints_the_prompt_and_a_continuation(random_model_dir: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asyncllm",
            "generate",
            "hello",
            "--model",
            str(random_model_dir),
            "--max-tokens",
            "8",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.startswith("hello")
    assert len(done.stdout.strip()) > len("hello")


def test_cli_generate_with_the_embedded_model() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "asyncllm", "generate", "Once upon a time", "--max-tokens", "40"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.startswith("Once upon a time")
    assert len(done.stdout.split()) > 12  # the embedded model tells a story
