"""The engine as a well-mannered library inside someone else's application: loops, foreign
threads, backpressure, failures, shutdown and observability."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asyncllm import LLM, AsyncEngine, EngineStats, SamplingParams, errors
from tests.models import all_blocks_unused

GREEDY = SamplingParams(temperature=0, max_tokens=16)


def engine_for(model_dir: Path, **overrides: Any) -> AsyncEngine:
    settings: dict[str, Any] = dict(device="cpu", num_kv_blocks=256)
    settings.update(overrides)
    return AsyncEngine.from_pretrained(str(model_dir), **settings)


async def until_idle(engine: AsyncEngine) -> EngineStats:
    with anyio.fail_after(30):
        await engine.idle()
    return engine.stats()


async def exercise(engine: AsyncEngine) -> list[int]:
    """Start, stream, cancel one reader and generate: the same on every event loop."""
    async with engine:
        tokens = [t.token_id async for t in engine.stream([3, 4, 5], GREEDY)]
        with anyio.move_on_after(0.01):
            async for _ in engine.stream([6, 7], SamplingParams(max_tokens=500)):
                pass
        out = await engine.generate([3, 4, 5], GREEDY)
        assert out.token_ids == tokens
        assert all_blocks_unused(await until_idle(engine))
    return tokens


# ---- event loops -----------------------------------------------------------------------------


def test_works_under_asyncio_uvloop_and_trio(random_model_dir: Path) -> None:
    uvloop = pytest.importorskip("uvloop")
    trio = pytest.importorskip("trio")
    on_asyncio = asyncio.run(exercise(engine_for(random_model_dir)))
    on_uvloop = uvloop.run(exercise(engine_for(random_model_dir)))
    on_trio = trio.run(exercise, engine_for(random_model_dir))
    assert on_asyncio == on_uvloop == on_trio


def test_a_different_event_loop_gets_a_clear_error(random_model_dir: Path) -> None:
    with LLM(str(random_model_dir), device="cpu", num_kv_blocks=64) as llm:  # its own loop

        async def from_another_loop() -> None:
            with pytest.raises(errors.WrongEventLoopError, match="another event loop"):
                llm.engine.stream([1, 2])
            with pytest.raises(errors.WrongEventLoopError):
                await llm.engine.generate([1, 2])

        asyncio.run(from_another_loop())


def test_a_thread_without_a_loop_gets_a_clear_error(random_model_dir: Path) -> None:
    with (
        LLM(str(random_model_dir), device="cpu", num_kv_blocks=64) as llm,
        pytest.raises(errors.WrongEventLoopError, match="stream_threadsafe"),
    ):
        llm.engine.stream([1, 2])


def test_importing_asyncllm_has_no_global_side_effects() -> None:
    probe = """
import asyncio, gc, logging, signal, sys, threading
def snapshot():
    return (type(asyncio.get_event_loop_policy()).__name__, signal.getsignal(signal.SIGINT),
            signal.getsignal(signal.SIGTERM), list(logging.getLogger().handlers),
            logging.getLogger().level, threading.active_count(), sys.getswitchinterval(),
            gc.get_threshold(), sys.getrecursionlimit())
before = snapshot()
import asyncllm
assert snapshot() == before, (before, snapshot())
assert "triton" not in sys.modules and "transformers" not in sys.modules, "heavy imports"
print("clean")
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"


# ---- backpressure ------------------------------------------------------------------------------


async def test_a_reader_that_never_reads_blocks_nobody(random_model_dir: Path) -> None:
    async with engine_for(random_model_dir) as engine:
        ignored = engine.stream([9, 9, 9], SamplingParams(max_tokens=40, temperature=0))
        busy = [t async for t in engine.stream([1, 2], SamplingParams(max_tokens=40))]
        assert len(busy) == 40
        await until_idle(engine)  # the ignored request ran to the end meanwhile
        [chunk] = [c async for c in ignored.chunks()]  # everything arrives as one chunk
        assert len(chunk) == 40
        assert ignored.output().finish_reason == "length"


async def test_a_slow_reader_gets_fewer_larger_chunks(random_model_dir: Path) -> None:
    async with engine_for(random_model_dir) as engine:
        stream = engine.stream([5, 6], SamplingParams(max_tokens=60, temperature=0))
        chunks = []
        async for chunk in stream.chunks():
            chunks.append(chunk)
            await anyio.sleep(0.02)  # a slow client (this sleep is workload, not sync)
        tokens = [t for chunk in chunks for t in chunk]
        assert [t.index for t in tokens] == list(range(60))
        assert len(chunks) < 60
        assert "".join(t.text for t in tokens) == stream.output().text


async def test_a_thousand_idle_streams_keep_memory_flat(random_model_dir: Path) -> None:
    async with engine_for(random_model_dir, num_kv_blocks=2048) as engine:
        await engine.generate([1], SamplingParams(max_tokens=2))  # warm up allocations
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        streams = [engine.stream([i % 300 + 1, 7], SamplingParams(max_tokens=8, ignore_eos=True))
                   for i in range(1000)]  # fmt: skip
        await until_idle(engine)
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert all(s.output().usage.completion_tokens == 8 for s in streams)
        # Each idle stream holds its request and 8 tokens, nothing that grows per event.
        assert held / len(streams) < 16_000, f"{held / len(streams):.0f} bytes per idle stream"


# ---- failures ----------------------------------------------------------------------------------


def inject(engine: AsyncEngine, stage: str, after_calls: int) -> None:
    """Make `stage` of a step raise on its `after_calls`-th call."""
    owner: Any = engine._core.runner if stage in ("launch", "collect") else engine._core
    name = {"process": "apply"}.get(stage, stage)
    original = getattr(owner, name)
    calls = [0]

    def failing(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] >= after_calls:
            raise RuntimeError(f"injected failure in {stage}")
        return original(*args)

    setattr(owner, name, failing)


@pytest.mark.parametrize("stage", ["schedule", "prepare", "launch", "collect", "process"])
async def test_a_failing_step_reaches_every_stream_and_kills_the_engine(
    random_model_dir: Path, stage: str
) -> None:
    engine = engine_for(random_model_dir)
    async with engine:
        streams = [engine.stream([i + 1, 2, 3], SamplingParams(max_tokens=50)) for i in range(5)]
        inject(engine, stage, after_calls=3)
        engine._wakeup.set()
        for stream in streams:
            with anyio.fail_after(30), pytest.raises(errors.EngineError) as caught:
                async for _ in stream:
                    pass
            assert "injected failure" in repr(caught.value.__cause__)
        with pytest.raises(errors.EngineDeadError):
            engine.stream([1])
        with pytest.raises(errors.EngineDeadError):
            await engine.generate([1])
    assert worker_threads() == []  # shutting a dead engine down stopped its worker too


async def test_a_failing_step_raises_engine_error_from_generate_many(
    random_model_dir: Path,
) -> None:
    async with engine_for(random_model_dir) as engine:
        inject(engine, "collect", after_calls=3)
        with anyio.fail_after(30), pytest.raises(errors.EngineError) as caught:
            await engine.generate_many([[1, 2], [3, 4], [5, 6]], SamplingParams(max_tokens=50))
    assert "injected failure" in repr(caught.value.__cause__)


async def test_generate_many_submits_nothing_when_one_prompt_is_bad(random_model_dir: Path) -> None:
    async with engine_for(random_model_dir) as engine:
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        with pytest.raises(errors.InvalidRequestError, match="prompt is empty"):
            await engine.generate_many([[1, 2], [3, 4], []], long)
        with pytest.raises(errors.InvalidRequestError, match="list of prompts"):
            await engine.generate_many("Once upon a time", long)  # one prompt, not 16
        stats = await until_idle(engine)
    assert stats.num_steps == 0  # the two good prompts were withdrawn before any step
    assert stats.num_finished == 2
    assert all_blocks_unused(stats)


async def test_a_bad_request_does_not_disturb_a_running_one(random_model_dir: Path) -> None:
    async with engine_for(random_model_dir) as engine:
        good = engine.stream([4, 5], SamplingParams(max_tokens=30, temperature=0))
        for bad in ([], [10**9], "", [-1]):
            with pytest.raises(errors.InvalidRequestError):
                engine.stream(bad)  # type: ignore[arg-type]
        assert len([t async for t in good]) == 30


# ---- shutdown ----------------------------------------------------------------------------------


def worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("asyncllm-worker")]


async def test_leaving_async_with_aborts_in_flight_requests_and_frees_everything(
    random_model_dir: Path,
) -> None:
    engine = engine_for(random_model_dir)
    async with engine:
        streams = [engine.stream([i + 1], SamplingParams(max_tokens=400)) for i in range(4)]
        await streams[0].__anext__()
    assert [s.output().finish_reason for s in streams] == ["abort"] * 4
    assert engine._core.runner is None  # model and KV pool released
    assert worker_threads() == []
    with pytest.raises(errors.EngineNotRunningError):
        engine.stream([1])
    async with engine_for(random_model_dir) as second:  # a new engine starts in this process
        assert (await second.generate([1], GREEDY)).usage.completion_tokens == 16


async def test_shutdown_with_drain_lets_in_flight_requests_finish(random_model_dir: Path) -> None:
    engine = engine_for(random_model_dir)
    await engine.start()
    streams = [engine.stream([i + 1], SamplingParams(max_tokens=30)) for i in range(4)]
    async with anyio.create_task_group() as group:
        group.start_soon(functools.partial(engine.shutdown, drain=True))
        await anyio.lowlevel.checkpoint()
        with pytest.raises(errors.EngineNotRunningError, match="stopping"):
            engine.stream([1])  # no new work once shutdown began
    assert [s.output().finish_reason for s in streams] == ["length"] * 4
    assert worker_threads() == []


# ---- observability -----------------------------------------------------------------------------


async def test_outputs_carry_metrics_and_logs_name_the_request(
    random_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncllm")
    async with engine_for(random_model_dir) as engine:
        out = await engine.generate([1, 2, 3], GREEDY, request_id="abc-123")
        stats = engine.stats()
    metrics = out.metrics
    assert 0 <= metrics.queue_time <= metrics.ttft <= metrics.e2e_latency  # type: ignore[operator]
    assert len(metrics.itl) == 15
    assert all(gap >= 0 for gap in metrics.itl)
    assert stats.num_finished == 1
    assert stats.generated_tokens_total == 16
    assert stats.steps_per_second > 0
    assert 0 <= stats.kv_usage <= 1
    assert "request abc-123 added" in caplog.text
    assert "request abc-123 finished (length)" in caplog.text


caller = contextvars.ContextVar("caller", default="-")
"""What an application might keep per task: here, which client a task serves."""


class TagWithCaller(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.caller = caller.get()
        return True


async def serve_three_clients(engine: AsyncEngine) -> None:
    caller.set("starter")  # the task that starts the engine has values of its own
    async with engine:

        async def client(name: str) -> None:
            caller.set(name)
            await engine.generate([1, 2], SamplingParams(max_tokens=4), request_id=name)

        async with anyio.create_task_group() as group:
            for name in ("alice", "bob", "carol"):
                group.start_soon(client, name)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_log_records_name_their_request_and_never_carry_another_callers_context(
    random_model_dir: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncllm")
    caplog.handler.addFilter(TagWithCaller())
    outside = contextvars.copy_context()
    outside.run(caller.set, "root")  # what trio's system tasks would inherit
    outside.run(anyio.run, serve_three_clients, engine_for(random_model_dir), backend=backend)
    records = [r for r in caplog.records if hasattr(r, "request_id")]
    assert {r.request_id for r in records} == {"alice", "bob", "carol"}
    for record in records:
        assert record.getMessage().startswith(f"request {record.request_id} ")
        # Logged by the submitting task, or by the engine in its own fresh context.
        assert record.caller in (record.request_id, "-")
    finished = [r for r in records if " finished " in r.getMessage()]
    assert len(finished) == 3
    assert {r.caller for r in finished} == {"-"}


async def test_prometheus_metrics_expose_the_engine_stats(random_model_dir: Path) -> None:
    prometheus = pytest.importorskip("prometheus_client")
    from asyncllm.metrics import register_prometheus

    registry = prometheus.CollectorRegistry()
    async with engine_for(random_model_dir) as engine:
        register_prometheus(engine, registry)
        await engine.generate([1, 2], GREEDY)
        text = prometheus.generate_latest(registry).decode()
    assert "asyncllm_requests_running 0.0" in text
    assert "asyncllm_generated_tokens_total 16.0" in text
    assert "asyncllm_kv_usage_ratio" in text


async def test_no_forward_pass_runs_on_the_loop_thread(random_model_dir: Path) -> None:
    seen: set[int] = set()
    async with engine_for(random_model_dir) as engine:
        runner = engine._core.runner
        assert runner is not None
        runner.model.register_forward_pre_hook(lambda *_: seen.add(threading.get_ident()))
        await engine.generate_many([[1, 2], [3, 4, 5]], GREEDY)
    assert seen
    assert threading.get_ident() not in seen
