"""Starting and stopping: however a start or a shutdown is interrupted (cancel scopes, native
asyncio cancellation, a second shutdown, the wrong event loop), the engine ends stopped with
its worker thread joined and its model freed, on asyncio and on trio."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest

from asyncllm import LLM, AsyncEngine, SamplingParams, errors
from asyncllm.engine.lifecycle import EngineState
from tests.models import all_blocks_unused

BACKENDS = ["asyncio", "trio"]
LONG = SamplingParams(max_tokens=900, ignore_eos=True)  # far longer than any test waits


def engine_for(model_dir: Path) -> AsyncEngine:
    return AsyncEngine.from_pretrained(str(model_dir), device="cpu", num_kv_blocks=256)


def worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("asyncllm-worker")]


def assert_freed(engine: AsyncEngine) -> None:
    """Stopped for good: model and KV pool dropped, worker thread joined, no block held."""
    assert engine._lifecycle.state is EngineState.STOPPED
    assert engine._core.runner is None
    assert worker_threads() == []
    if hasattr(engine._core, "blocks"):
        assert all_blocks_unused(engine.stats())


async def assert_stays_stopped(engine: AsyncEngine) -> None:
    """Later calls return at once (shutdown, idle) or refuse work (stream)."""
    with anyio.fail_after(5):
        await engine.shutdown()
        await engine.idle()
    with pytest.raises(errors.EngineNotRunningError):
        engine.stream([1])
    assert_freed(engine)


def run_on(backend: str, scenario: Callable[[AsyncEngine], Awaitable[None]], model: Path) -> None:
    anyio.run(scenario, engine_for(model), backend=backend)


async def begin(group: anyio.abc.TaskGroup, call: Callable[[], Awaitable[None]]) -> None:
    """Run `call()` in `group`, returning once it has gone as far as its first pause."""

    async def run(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # the call below runs on until it first awaits something
        await call()

    await group.start(run)


# ---- shutdown cancelled ------------------------------------------------------------------------


async def leave_async_with_through_a_cancel_scope(engine: AsyncEngine) -> None:
    with anyio.CancelScope() as scope:  # what anyio.move_on_after does when it fires
        async with engine:
            stream = engine.stream([1, 2], LONG)
            await stream.__anext__()
            scope.cancel()
            await anyio.sleep_forever()
    assert stream.output().finish_reason == "abort"
    assert_freed(engine)
    await assert_stays_stopped(engine)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cancel_scope_leaving_async_with_still_frees_everything(
    random_model_dir: Path, backend: str
) -> None:
    run_on(backend, leave_async_with_through_a_cancel_scope, random_model_dir)


async def test_a_cancelled_asyncio_task_inside_async_with_frees_everything(
    random_model_dir: Path,
) -> None:
    engine, inside = engine_for(random_model_dir), asyncio.Event()

    async def body() -> None:
        async with engine:
            engine.stream([1, 2], LONG)
            inside.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(body())
    await inside.wait()
    task.cancel()  # native cancellation goes through anyio's shields
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_freed(engine)
    await assert_stays_stopped(engine)


async def time_out_a_drain(engine: AsyncEngine) -> None:
    await engine.start()
    streams = [engine.stream([i + 1], LONG) for i in range(3)]
    await streams[0].__anext__()
    with pytest.raises(TimeoutError), anyio.fail_after(0.05):
        await engine.shutdown(drain=True)
    assert [s.output().finish_reason for s in streams] == ["abort"] * 3
    assert_freed(engine)
    await assert_stays_stopped(engine)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_timed_out_drain_aborts_the_rest_and_frees_everything(
    random_model_dir: Path, backend: str
) -> None:
    run_on(backend, time_out_a_drain, random_model_dir)


async def test_asyncio_wait_for_around_a_drain_frees_everything(random_model_dir: Path) -> None:
    engine = engine_for(random_model_dir)
    await engine.start()
    stream = engine.stream([1, 2], LONG)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(engine.shutdown(drain=True), 0.05)
    assert stream.output().finish_reason == "abort"
    assert_freed(engine)


# ---- overlapping calls -------------------------------------------------------------------------


async def shut_down_twice_at_once(engine: AsyncEngine) -> None:
    await engine.start()
    streams = [engine.stream([i + 1], SamplingParams(max_tokens=30)) for i in range(3)]
    async with anyio.create_task_group() as group:
        await begin(group, functools.partial(engine.shutdown, drain=True))
        assert engine._lifecycle.state is EngineState.STOPPING
        await engine.shutdown()  # waits for the draining call instead of racing it
        assert_freed(engine)
    assert [s.output().finish_reason for s in streams] == ["length"] * 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_shutdown_waits_for_the_first(random_model_dir: Path, backend: str) -> None:
    run_on(backend, shut_down_twice_at_once, random_model_dir)


async def test_a_shutdown_during_start_waits_for_it_then_stops(random_model_dir: Path) -> None:
    engine = engine_for(random_model_dir)
    async with anyio.create_task_group() as group:
        await begin(group, engine.start)
        assert engine._lifecycle.state is EngineState.STARTING
        await engine.shutdown()
    assert_freed(engine)


def test_calls_from_another_event_loop_raise_at_once(random_model_dir: Path) -> None:
    with LLM(str(random_model_dir), device="cpu", num_kv_blocks=64) as llm:

        async def from_another_loop() -> None:
            with anyio.fail_after(5):
                with pytest.raises(errors.WrongEventLoopError, match="another event loop"):
                    await llm.engine.shutdown()
                with pytest.raises(errors.WrongEventLoopError):
                    await llm.engine.idle()
                with pytest.raises(errors.WrongEventLoopError):
                    llm.engine.abort("some-request")

        asyncio.run(from_another_loop())
        [out] = llm.generate([[1, 2]], SamplingParams(max_tokens=4))  # still serving
        assert out.usage.completion_tokens == 4
    assert_freed(llm.engine)


# ---- start cancelled ---------------------------------------------------------------------------


async def cancel_start(engine: AsyncEngine) -> None:
    with anyio.move_on_after(0.001):  # fires while the model loads
        await engine.start()
    assert_freed(engine)
    await assert_stays_stopped(engine)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cancelled_start_frees_the_model(random_model_dir: Path, backend: str) -> None:
    run_on(backend, cancel_start, random_model_dir)


async def test_asyncio_wait_for_around_start_frees_the_model(random_model_dir: Path) -> None:
    engine = engine_for(random_model_dir)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(engine.start(), 0.001)
    assert_freed(engine)
    await assert_stays_stopped(engine)


async def test_a_failed_start_frees_what_it_loaded(random_model_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", num_kv_blocks=2, block_size=16, max_model_len=100
    )
    with pytest.raises(errors.ConfigError, match="KV pool"):
        await engine.start()
    assert_freed(engine)


# ---- what shutdown leaves behind -----------------------------------------------------------------


async def test_requests_during_a_drain_are_refused_and_the_accepted_ones_finish(
    random_model_dir: Path,
) -> None:
    engine = engine_for(random_model_dir)
    await engine.start()
    accepted = [engine.stream([i + 1], SamplingParams(max_tokens=20)) for i in range(3)]
    async with anyio.create_task_group() as group:
        await begin(group, functools.partial(engine.shutdown, drain=True))
        assert engine._lifecycle.state is EngineState.STOPPING
        with pytest.raises(errors.EngineNotRunningError, match="stopping"):
            engine.stream([1])
        with pytest.raises(errors.EngineNotRunningError, match="stopping"):
            await engine.generate([1])
        with anyio.fail_after(30):
            await engine.idle()  # the drain runs to the end
    assert [s.output().finish_reason for s in accepted] == ["length"] * 3
    assert_freed(engine)


async def test_shutting_down_an_engine_that_never_started_is_final(
    random_model_dir: Path,
) -> None:
    engine = engine_for(random_model_dir)
    await engine.shutdown()
    with pytest.raises(errors.EngineError, match="starts once"):
        await engine.start()
    await engine.shutdown()
    with pytest.raises(errors.EngineNotRunningError):
        engine.stream([1])
    assert engine._core.runner is None
