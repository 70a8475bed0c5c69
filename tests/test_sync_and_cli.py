"""The blocking facade, submitting from foreign threads, and the command line."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncllm import LLM, AsyncEngine, SamplingParams, errors
from tests.models import all_blocks_unused
from tests.test_embedding import inject

GREEDY = SamplingParams(temperature=0, max_tokens=12)
LONG = SamplingParams(max_tokens=900, ignore_eos=True)  # far longer than any test waits


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


def test_llm_generate_takes_one_prompt_as_a_batch_of_one(random_model_dir: Path) -> None:
    with LLM(str(random_model_dir), device="cpu", num_kv_blocks=64) as llm:
        [text] = llm.generate("hello", GREEDY)
        [ids] = llm.generate([5, 6], GREEDY)
        [again] = llm.generate([[5, 6]], GREEDY)
    assert text.prompt_token_ids == llm.engine.tokenizer.encode("hello")
    assert ids.prompt_token_ids == [5, 6]
    assert ids.token_ids == again.token_ids


def test_a_closed_llm_refuses_every_call_the_same_way(random_model_dir: Path) -> None:
    llm = LLM(str(random_model_dir), device="cpu", num_kv_blocks=64)
    llm.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(errors.EngineNotRunningError, match="closed"):
            llm.generate([[1, 2]])
        with pytest.raises(errors.EngineNotRunningError, match="closed"):
            llm.stream([1, 2])
        llm.close()  # again: nothing to do
        gc.collect()  # a coroutine created and dropped unawaited would warn here
    assert [str(w.message) for w in caught] == []


async def test_blocking_calls_inside_a_running_loop_raise(random_model_dir: Path) -> None:
    with pytest.raises(errors.BlockingCallError, match="AsyncEngine"):
        LLM(str(random_model_dir), device="cpu")


def test_blocking_calls_inside_a_running_trio_loop_raise(random_model_dir: Path) -> None:
    trio = pytest.importorskip("trio")
    with LLM(str(random_model_dir), device="cpu", num_kv_blocks=64) as llm:

        async def inside_trio() -> None:
            with pytest.raises(errors.BlockingCallError, match="trio"):
                LLM(str(random_model_dir), device="cpu")
            with pytest.raises(errors.BlockingCallError, match="trio"):
                llm.generate([[1, 2]])
            with pytest.raises(errors.BlockingCallError, match="trio"):
                llm.stream([1, 2])
            with pytest.raises(errors.BlockingCallError, match="trio"):
                llm.engine.generate_threadsafe([1, 2])
            with pytest.raises(errors.BlockingCallError, match="trio"):
                llm.engine.stream_threadsafe([1, 2])

        trio.run(inside_trio)


def test_a_failing_step_raises_engine_error_from_llm_generate(random_model_dir: Path) -> None:
    with LLM(str(random_model_dir), device="cpu", num_kv_blocks=64) as llm:
        inject(llm.engine, "collect", after_calls=3)
        with pytest.raises(errors.EngineError) as caught:
            llm.generate([[1, 2], [3, 4], [5, 6]], SamplingParams(max_tokens=50))
    assert "injected failure" in repr(caught.value.__cause__)


# ---- Ctrl-C ------------------------------------------------------------------------------------


@pytest.fixture
def ctrl_c() -> Iterator[Callable[[Callable[[], bool]], threading.Thread]]:
    """`ctrl_c(when)`: a thread that sends SIGINT to this (the main) thread once `when()`."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threads: list[threading.Thread] = []

    def press_when(ready: Callable[[], bool]) -> threading.Thread:
        def wait_then_press() -> None:
            deadline = time.monotonic() + 60
            while not ready() and time.monotonic() < deadline:
                time.sleep(0.001)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

        thread = threading.Thread(target=wait_then_press)
        threads.append(thread)
        thread.start()
        return thread

    yield press_when
    for thread in threads:
        thread.join()
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_llm_generate_aborts_what_it_submitted(
    random_model_dir: Path, ctrl_c: Callable[[Callable[[], bool]], Any]
) -> None:
    with LLM(str(random_model_dir), device="cpu", num_kv_blocks=256) as llm:
        ctrl_c(lambda: llm.stats().running > 0)
        with pytest.raises(KeyboardInterrupt):
            llm.generate([[i + 1] * 4 for i in range(4)], LONG)
        generated = llm.stats().generated_tokens_total  # the interrupted requests are over
        [out] = llm.generate([[5, 6]], SamplingParams(max_tokens=4))
        stats = llm.stats()
    assert out.usage.completion_tokens == 4
    assert stats.generated_tokens_total == generated + 4  # nothing else ran meanwhile
    assert stats.waiting == 0
    assert all_blocks_unused(stats)


def test_ctrl_c_in_generate_threadsafe_aborts_its_request(
    random_model_dir: Path, ctrl_c: Callable[[Callable[[], bool]], Any]
) -> None:
    with LLM(str(random_model_dir), device="cpu", num_kv_blocks=256) as llm:
        ctrl_c(lambda: llm.stats().running > 0)
        with pytest.raises(KeyboardInterrupt):
            llm.engine.generate_threadsafe([1, 2], LONG, request_id="mine")
        # The abort reached the loop before this submission: the id is free again.
        out = llm.engine.generate_threadsafe([1, 2], GREEDY, request_id="mine")
    assert out.usage.completion_tokens == 12


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
