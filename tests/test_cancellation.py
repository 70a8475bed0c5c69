"""Every way a caller can stop reading aborts the request and gives its KV blocks back, and
only that request: a stream and a request id each belong to one request."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import anyio
import pytest

from asyncllm import AsyncEngine, EngineStats, SamplingParams, StreamToken, errors
from tests.models import all_blocks_unused

LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


@pytest.fixture
async def engine(random_model_dir: Path):  # type: ignore[no-untyped-def]
    async with AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", num_kv_blocks=64
    ) as engine:
        yield engine


async def wait_until_idle(engine: AsyncEngine) -> EngineStats:
    """Let the engine loop observe what happened (abort frees blocks before its next step)."""
    with anyio.fail_after(30):
        await engine.idle()
    return engine.stats()


async def test_break_out_of_async_for_aborts_and_frees_blocks_before_the_next_step(
    engine: AsyncEngine,
) -> None:
    core = engine._core
    schedule = core.scheduler.schedule
    holders_at_schedule: list[int] = []

    def watched_schedule(step_id: int):  # type: ignore[no-untyped-def]
        holders_at_schedule.append(sum(1 for r in core.scheduler.running if r.block_ids))
        return schedule(step_id)

    core.scheduler.schedule = watched_schedule  # type: ignore[method-assign]
    received = 0
    async for _ in engine.stream([1, 2, 3], LONG):
        received += 1
        if received == 3:
            break
    calls_at_abort = len(holders_at_schedule)
    out = await engine.generate([4, 5], SamplingParams(max_tokens=3))  # forces more steps
    assert out.usage.completion_tokens == 3
    # Every step scheduled after the abort saw the aborted request's blocks already back.
    assert holders_at_schedule[calls_at_abort + 1 :]
    assert all(count <= 1 for count in holders_at_schedule[calls_at_abort:])
    assert all_blocks_unused(await wait_until_idle(engine))


async def test_aclose_aborts_and_ends_the_stream(engine: AsyncEngine) -> None:
    stream = engine.stream([1, 2, 3], LONG)
    await stream.__anext__()
    await stream.aclose()
    assert [t async for t in stream] == []
    assert stream.output().finish_reason == "abort"
    assert all_blocks_unused(await wait_until_idle(engine))


async def test_leaving_async_with_aborts(engine: AsyncEngine) -> None:
    async with engine.stream([4, 5, 6], LONG) as stream:
        await stream.__anext__()
    assert stream.output().finish_reason == "abort"
    assert all_blocks_unused(await wait_until_idle(engine))


async def test_cancelling_the_reading_task_aborts(engine: AsyncEngine) -> None:
    first_token = anyio.Event()

    async def reader() -> None:
        async for _ in engine.stream([7, 8, 9], LONG):
            first_token.set()

    async with anyio.create_task_group() as group:
        group.start_soon(reader)
        await first_token.wait()
        group.cancel_scope.cancel()
    assert all_blocks_unused(await wait_until_idle(engine))


async def test_dropping_an_unread_stream_aborts(engine: AsyncEngine) -> None:
    stream = engine.stream([1, 1, 1], LONG)
    del stream
    gc.collect()
    assert all_blocks_unused(await wait_until_idle(engine))


async def test_aborting_twice_or_after_completion_is_harmless(engine: AsyncEngine) -> None:
    stream = engine.stream([1, 2], SamplingParams(max_tokens=4))
    async for _ in stream:
        pass
    assert stream.output().finish_reason == "length"
    await stream.aclose()
    await stream.aclose()
    engine.abort(stream.request_id)
    engine.abort("no-such-request")
    assert stream.output().finish_reason == "length"
    out = await engine.generate([3, 4], SamplingParams(max_tokens=4))
    assert out.usage.completion_tokens == 4


@pytest.mark.parametrize("overlap", [False, True])
async def test_cancellations_among_many_requests_leak_nothing(
    random_model_dir: Path, overlap: bool
) -> None:
    engine = AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", num_kv_blocks=64, overlap_scheduling=overlap
    )

    async def reader(index: int) -> None:
        async for token in engine.stream([index % 300 + 1] * (index % 40 + 1), LONG):
            if token.index == index % 7:
                break

    async with engine:
        async with anyio.create_task_group() as group:
            for index in range(40):
                group.start_soon(reader, index)
        stats = await wait_until_idle(engine)
        assert all_blocks_unused(stats)
        engine._core.blocks.check_invariants([])


# ---- one request, one reader, one id -------------------------------------------------------------


async def test_a_second_reader_of_one_stream_is_refused_and_the_first_reads_on(
    engine: AsyncEngine,
) -> None:
    stream = engine.stream([1, 2, 3], SamplingParams(temperature=0, max_tokens=20))
    read: dict[str, list[StreamToken]] = {}
    refused: list[str] = []

    async def reader(name: str) -> None:
        read[name] = []
        try:
            async for token in stream:
                read[name].append(token)
        except errors.StreamInUseError:
            refused.append(name)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(reader, "first")
            group.start_soon(reader, "second")
    assert len(refused) == 1
    tokens = sorted(read["first"] + read["second"], key=lambda t: t.index)
    assert [t.index for t in tokens] == list(range(20))  # every token, each read once
    assert stream.output().finish_reason == "length"


async def test_an_id_in_flight_is_refused_on_every_submission_path(engine: AsyncEngine) -> None:
    taken = engine.stream([1, 2], LONG, request_id="taken")

    def from_a_thread() -> None:
        with pytest.raises(errors.DuplicateRequestIdError, match="'taken'"):
            engine.generate_threadsafe([3], request_id="taken")
        with pytest.raises(errors.DuplicateRequestIdError, match="'taken'"):
            engine.stream_threadsafe([3], request_id="taken")

    with pytest.raises(errors.DuplicateRequestIdError, match="already in flight"):
        engine.stream([3], request_id="taken")
    with pytest.raises(errors.DuplicateRequestIdError):
        await engine.generate([3], request_id="taken")
    await anyio.to_thread.run_sync(from_a_thread)
    await taken.aclose()
    reused = await engine.generate([3], SamplingParams(max_tokens=2), request_id="taken")
    assert reused.usage.completion_tokens == 2  # free again once the first one ended


async def test_automatic_ids_cannot_collide_with_chosen_ones(engine: AsyncEngine) -> None:
    first = engine.stream([1, 2], LONG)
    assert re.fullmatch(r"[0-9a-f]{32}-0", first.request_id)
    with pytest.raises(errors.DuplicateRequestIdError):
        engine.stream([3], request_id=first.request_id)
    chosen = engine.stream([3, 4], LONG, request_id="req-1")  # the old scheme's next id
    automatic = engine.stream([5, 6], LONG)
    assert automatic.request_id == first.request_id[:-1] + "1"
    await chosen.aclose()  # aborts "req-1" and nothing else
    tokens = [await automatic.__anext__() for _ in range(3)]  # still running
    assert [t.index for t in tokens] == [0, 1, 2]
    await first.aclose()
    await automatic.aclose()


async def test_closing_an_old_stream_leaves_a_newer_request_with_its_id_alone(
    engine: AsyncEngine,
) -> None:
    old = engine.stream([1, 2], SamplingParams(max_tokens=3), request_id="again")
    assert len([t async for t in old]) == 3
    new = engine.stream([3, 4], SamplingParams(temperature=0, max_tokens=10), request_id="again")
    await old.aclose()
    del old
    gc.collect()  # and dropping it aborts nothing either
    assert len([t async for t in new]) == 10
    assert new.output().finish_reason == "length"


@pytest.mark.parametrize("bad_id", ["", 7, b"id"])
async def test_a_request_id_must_be_a_non_empty_string(engine: AsyncEngine, bad_id: object) -> None:
    with pytest.raises(errors.InvalidRequestError, match="request_id must be a non-empty str"):
        engine.stream([1], request_id=bad_id)  # type: ignore[arg-type]
