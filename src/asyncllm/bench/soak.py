"""`asyncllm bench soak`: thousands of requests with random arrivals, lengths, params and
cancellations on one small engine, then a check that nothing leaked and nothing was wrong.

Clients arrive at random (Poisson) times, read their streams in every supported way, and 30%
walk away at a random point by every cancellation form (break, aclose, leaving `async with`,
cancelling the reading task or its anyio scope, dropping the stream, `engine.abort`, a
timeout, closing a `stream_threadsafe` iterator); now and then one resets the prefix cache.
The engine is small on purpose (few KV blocks, a small token budget), so requests are
preempted and prompts are prefilled in chunks all the time.

At the end the soak checks that
- every request ended exactly once, as its client saw it and as the engine counts it;
- each output obeys its own rules (max/min tokens, stop strings, logprobs, streamed text);
- every greedy or seeded request whose (prompt, params) repeats from a small pool drew the
  same tokens as an isolated run of that pair alone on a fresh engine (a finished request
  all of them, a cancelled one a prefix), counting how many were checked;
- nothing is running or waiting, every KV block is free or cached, and, once shut down, no
  task but the main one and no `asyncllm-*` thread is left.

It prints a progress bar, a summary table and every violation, and exits non-zero on any.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import anyio.lowlevel
import anyio.to_thread
import torch

from asyncllm.bench.soak_checks import (
    Divergence,
    Outcome,
    check_accounting,
    check_outcome,
    find_divergence,
    status_of,
)
from asyncllm.bench.soak_workload import (
    CANCEL_FORMS,
    READ_WAYS,
    Job,
    WorkloadShape,
    build_workload,
)
from asyncllm.config import EngineConfig
from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.engine.request import Request
from asyncllm.engine.stream import RequestStream
from asyncllm.errors import ConfigError
from asyncllm.outputs import EngineStats, RequestOutput, StreamToken, TokenLogprobs

__all__ = ["INJECTIONS", "SoakOptions", "SoakReport", "add_parser", "run_soak"]

INJECTIONS = ("leak-block", "wrong-token", "leak-task", "leak-thread", "lost-request")
"""Test hooks: each plants one violation, to prove the checker catches it.

- leak-block: takes one KV block out of the pool before the end checks;
- wrong-token: puts token id -1 into one finished checked output;
- leak-task: leaves an asyncio task running after shutdown;
- leak-thread: leaves a thread named `asyncllm-planted` running after shutdown;
- lost-request: forgets one request's ending.
"""


@dataclass(frozen=True, slots=True)
class SoakOptions:
    """Everything a soak run depends on (`asyncllm bench soak --help` explains each)."""

    requests: int = 10_000
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    cancel_fraction: float = 0.3
    max_concurrency: int = 64
    arrival_rate: float = 200.0
    max_prompt_len: int = 160
    max_new_tokens: int = 64
    pool_prompts: int = 48
    pool_fraction: float = 0.6
    reset_probability: float = 0.01
    num_kv_blocks: int = 96
    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 64
    overlap: bool | None = None
    tie_margin: float = 0.0
    request_timeout_s: float = 600.0
    idle_timeout_s: float = 120.0
    progress: bool = True
    inject: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "requests",
            "max_concurrency",
            "max_prompt_len",
            "max_new_tokens",
            "pool_prompts",
            "num_kv_blocks",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"soak option {name} must be an int >= 1, got {value!r}")
        for name in ("cancel_fraction", "pool_fraction", "reset_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(
                    f"soak option {name} must be in [0, 1], got {getattr(self, name)!r}"
                )
        for name in ("arrival_rate", "tie_margin"):
            if not getattr(self, name) >= 0.0:
                raise ConfigError(f"soak option {name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("request_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0.0:
                raise ConfigError(f"soak option {name} must be > 0, got {getattr(self, name)!r}")
        unknown = set(self.inject) - set(INJECTIONS)
        if unknown:
            raise ConfigError(f"unknown soak injection {sorted(unknown)}; known: {INJECTIONS}")
        longest = self.max_prompt_len + self.max_new_tokens
        if -(-longest // self.block_size) > self.num_kv_blocks:
            raise ConfigError(
                f"the longest request ({longest} tokens) needs more than num_kv_blocks "
                f"({self.num_kv_blocks}) blocks of {self.block_size} tokens"
            )

    def engine_settings(self) -> dict[str, Any]:
        """The `EngineConfig` overrides of the soak's engine (and of the isolated runs')."""
        return dict(
            device=self.device,
            dtype=self.dtype,
            seed=self.seed,
            num_kv_blocks=self.num_kv_blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            overlap_scheduling=self.overlap,
        )

    def workload_shape(self, vocab_size: int) -> WorkloadShape:
        return WorkloadShape(
            num_requests=self.requests,
            seed=self.seed,
            vocab_size=vocab_size,
            cancel_fraction=self.cancel_fraction,
            arrival_rate=self.arrival_rate,
            max_prompt_len=self.max_prompt_len,
            max_new_tokens=self.max_new_tokens,
            pool_prompts=self.pool_prompts,
            pool_fraction=self.pool_fraction,
            reset_probability=self.reset_probability,
        )


class SoakReport(NamedTuple):
    """The result of a soak: its summary (what the table prints) and every violation."""

    summary: dict[str, Any]
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations

    def table(self) -> str:
        """The summary as an aligned two-column table, then PASS or the violations."""
        rows = [(key, _format(value)) for key, value in self.summary.items()]
        width = max(len(key) for key, _ in rows)
        lines = [f"{key:<{width}}  {value}" for key, value in rows]
        if self.ok:
            lines.append("PASS: no violations")
        else:
            lines.append(f"FAIL: {len(self.violations)} violations")
            lines += [f"  {v}" for v in self.violations[:50]]
            if len(self.violations) > 50:
                lines.append(f"  ... and {len(self.violations) - 50} more (see --out)")
        return "\n".join(lines)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_format(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "/".join(_format(v) for v in value)
    return str(value)


def run_soak(options: SoakOptions) -> SoakReport:
    """Run a whole soak in a fresh asyncio event loop and check it."""
    return asyncio.run(_soak(options))


# ---- the run -------------------------------------------------------------------------------


async def _soak(options: SoakOptions) -> SoakReport:
    baseline_threads = {t.ident for t in threading.enumerate()}
    engine = AsyncEngine.from_pretrained(options.model, **options.engine_settings())
    vocab = engine._core.model_config.vocab_size
    jobs = build_workload(options.workload_shape(vocab))
    started = time.perf_counter()
    async with engine:
        clients = _Clients(engine, options, jobs)
        await clients.run()
        wall_s = time.perf_counter() - started
        violations = clients.violations + await _check_at_rest(engine, options)
        stats = engine.stats()
    violations += await _check_nothing_left(options, baseline_threads, plant=True)
    outcomes = clients.outcomes
    if "lost-request" in options.inject and outcomes:
        del outcomes[next(iter(outcomes))]
    violations += check_accounting(jobs, outcomes, clients.duplicates, stats.num_finished)
    for job in jobs:
        if job.number in outcomes:
            violations += check_outcome(job, outcomes[job.number], vocab)
    if "wrong-token" in options.inject:
        _plant_wrong_token(jobs, outcomes)
    isolated = await _isolated_runs(options, jobs, outcomes)
    violations += isolated.violations
    violations += await _check_nothing_left(options, baseline_threads, plant=False)
    summary = _summary(options, stats, jobs, outcomes, clients, isolated, wall_s)
    return SoakReport(summary, violations)


class _Clients:
    """The soak's clients: one task (or thread) per job, at most `max_concurrency` at once."""

    def __init__(self, engine: AsyncEngine, options: SoakOptions, jobs: list[Job]) -> None:
        self.engine, self.options, self.jobs = engine, options, jobs
        self.outcomes: dict[int, Outcome] = {}
        self.duplicates: list[int] = []
        self.violations: list[str] = []
        self.resets = 0
        self.late_aborts = 0
        self._requests: dict[int, Request] = {}
        self._slots = anyio.Semaphore(options.max_concurrency)
        self._threads = anyio.CapacityLimiter(8)
        self._bar: Any = None

    async def run(self) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=len(self.jobs),
            desc="soak",
            unit="req",
            disable=not self.options.progress,
            file=sys.stderr,
        )
        try:
            async with anyio.create_task_group() as group:
                start = anyio.current_time()
                for job in self.jobs:
                    await anyio.sleep_until(start + job.arrival_s)
                    await self._slots.acquire()  # a new arrival waits for a free slot
                    group.start_soon(self._client, job)
        finally:
            self._bar.close()

    async def _client(self, job: Job) -> None:
        try:
            if job.reset_prefix_cache:
                self.engine.reset_prefix_cache()
                self.resets += 1
            with anyio.fail_after(self.options.request_timeout_s):
                outcome = await _WAYS[job.way](self, job)
        except Exception as exc:  # the client's error is the finding; the soak goes on
            outcome = Outcome(job.number, [], None, error=repr(exc))
        finally:
            self._slots.release()
        if job.number in self.outcomes:
            self.duplicates.append(job.number)
        self.outcomes[job.number] = outcome
        self._tick()

    def _tick(self) -> None:
        self._bar.update(1)
        if self._bar.n % 25 == 0:
            stats = self.engine.stats()
            self._bar.set_postfix(
                running=stats.running,
                waiting=stats.waiting,
                preempted=stats.num_preemptions,
                hits=f"{stats.prefix_cache_hit_rate:.0%}",
                refresh=False,
            )

    # ---- submitting and leaving ------------------------------------------------------------

    def _submit(self, job: Job, *, track: bool = False) -> RequestStream:
        """Submit the job's request; `track` keeps the engine's request object (not the
        stream, which the client must be free to drop) to see how it really ended."""
        stream = self.engine.stream(job.prompt, job.params)
        if track:
            self._requests[job.number] = stream._request
        return stream

    async def _left(self, job: Job, reader: _Reader) -> Outcome:
        """The outcome of a request whose client let go of its stream. It must have ended
        (finished earlier, or aborted by the leaving) within a few turns of the event loop
        (an abort from a finaliser may be queued onto the loop), without help from the
        garbage collector."""
        request = self._requests.pop(job.number)
        for _ in range(3):
            if request.is_finished:
                break
            await anyio.lowlevel.checkpoint()
        if not request.is_finished:
            gc.collect()  # a stream kept alive by a reference cycle is aborted by its __del__
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            problem = "was aborted only by a full garbage collection"
            if not request.is_finished:
                problem = "was still running after its client left; the soak aborted it"
                self.engine.abort(request.request_id)
            self.violations.append(f"[cancel] request {job.number} ({job.way}) {problem}")
            self.late_aborts += 1
        return reader.outcome(request.to_output())


_Way = Callable[[_Clients, Job], Awaitable[Outcome]]
_WAYS: dict[str, _Way] = {}


def _way(name: str) -> Callable[[_Way], _Way]:
    def register(fn: _Way) -> _Way:
        _WAYS[name] = fn
        return fn

    return register


class _Reader:
    """What a client has read so far."""

    def __init__(self, job: Job) -> None:
        self.number = job.number
        self.slow = job.slow_reader
        self.ids: list[int] = []
        self.texts: list[str] = []
        self.logprobs: list[TokenLogprobs | None] = []
        self.finish_reason: str | None = None

    def take_sync(self, token: StreamToken) -> None:
        self.ids.append(token.token_id)
        self.texts.append(token.text)
        self.logprobs.append(token.logprobs)
        self.finish_reason = token.finish_reason or self.finish_reason

    async def take(self, token: StreamToken) -> None:
        self.take_sync(token)
        if self.slow:  # a reader that lags behind: tokens pile up for it meanwhile
            await anyio.sleep(0.005)

    def outcome(self, final: RequestOutput | None, finish_reason: str | None = None) -> Outcome:
        reason = final.finish_reason if final is not None else finish_reason
        return Outcome(self.number, self.ids, reason, final, "".join(self.texts), self.logprobs)


# ---- reading to the end ----------------------------------------------------------------------


@_way("read")
async def _read(self: _Clients, job: Job) -> Outcome:
    reader, stream = _Reader(job), self._submit(job)
    async for token in stream:
        await reader.take(token)
    return reader.outcome(stream.output())


@_way("chunks")
async def _chunks(self: _Clients, job: Job) -> Outcome:
    reader = _Reader(job)
    async with self._submit(job) as stream:
        async for chunk in stream.chunks():
            for token in chunk:
                await reader.take(token)
    return reader.outcome(stream.output())


@_way("generate")
async def _generate(self: _Clients, job: Job) -> Outcome:
    out = await self.engine.generate(job.prompt, job.params)
    return Outcome(job.number, out.token_ids, out.finish_reason, out)


@_way("thread_read")
async def _thread_read(self: _Clients, job: Job) -> Outcome:
    def work() -> Outcome:
        reader = _Reader(job)
        for token in self.engine.stream_threadsafe(job.prompt, job.params):
            reader.take_sync(token)
        return reader.outcome(None, reader.finish_reason)

    return await anyio.to_thread.run_sync(work, limiter=self._threads)


@_way("thread_generate")
async def _thread_generate(self: _Clients, job: Job) -> Outcome:
    def work() -> Outcome:
        out = self.engine.generate_threadsafe(job.prompt, job.params)
        return Outcome(job.number, out.token_ids, out.finish_reason, out)

    return await anyio.to_thread.run_sync(work, limiter=self._threads)


# ---- walking away ----------------------------------------------------------------------------


async def _read_some(stream: RequestStream, reader: _Reader, count: int) -> None:
    """Read up to `count` tokens (fewer if the request ends first)."""
    while len(reader.ids) < count:
        try:
            token = await stream.__anext__()
        except StopAsyncIteration:
            return
        await reader.take(token)


@_way("break")
async def _break(self: _Clients, job: Job) -> Outcome:
    reader = _Reader(job)
    async for token in self._submit(job, track=True):  # breaking drops the stream
        await reader.take(token)
        if len(reader.ids) >= max(1, job.cancel_after_tokens):
            break
    return await self._left(job, reader)


@_way("aclose")
async def _aclose(self: _Clients, job: Job) -> Outcome:
    reader, stream = _Reader(job), self._submit(job)
    await _read_some(stream, reader, job.cancel_after_tokens)
    await stream.aclose()
    async for token in stream:  # whatever was produced before the abort
        await reader.take(token)
    return reader.outcome(stream.output())


@_way("async_with")
async def _async_with(self: _Clients, job: Job) -> Outcome:
    reader = _Reader(job)
    async with self._submit(job) as stream:
        await _read_some(stream, reader, job.cancel_after_tokens)
    return reader.outcome(stream.output())


@_way("abort")
async def _abort(self: _Clients, job: Job) -> Outcome:
    reader, stream = _Reader(job), self._submit(job)
    await _read_some(stream, reader, job.cancel_after_tokens)
    self.engine.abort(stream.request_id)
    async for token in stream:
        await reader.take(token)
    return reader.outcome(stream.output())


@_way("drop")
async def _drop(self: _Clients, job: Job) -> Outcome:
    reader, stream = _Reader(job), self._submit(job, track=True)
    await _read_some(stream, reader, job.cancel_after_tokens)
    alive = weakref.ref(stream)
    del stream
    gc.collect()
    if alive() is not None:
        self.violations.append(f"[cancel] request {job.number}: a dropped stream stayed alive")
    return await self._left(job, reader)


@_way("timeout")
async def _timeout(self: _Clients, job: Job) -> Outcome:
    reader = _Reader(job)
    with anyio.move_on_after(job.cancel_after_s):
        async for token in self._submit(job, track=True):
            await reader.take(token)
    return await self._left(job, reader)


def _reading_task(
    self: _Clients, job: Job, reader: _Reader, reached: anyio.Event
) -> Callable[[], Coroutine[Any, Any, None]]:
    """A task body that reads the job's stream (held by this task alone) and says when it
    has read `cancel_after_tokens` tokens or the stream ended."""

    async def read() -> None:
        try:
            async for token in self._submit(job, track=True):
                await reader.take(token)
                if len(reader.ids) >= job.cancel_after_tokens:
                    reached.set()
        finally:
            reached.set()

    return read


@_way("task_cancel")
async def _task_cancel(self: _Clients, job: Job) -> Outcome:
    reader, reached = _Reader(job), anyio.Event()
    task = asyncio.get_running_loop().create_task(_reading_task(self, job, reader, reached)())
    with anyio.move_on_after(job.cancel_after_s):
        await reached.wait()
    task.cancel()
    await asyncio.wait([task])
    del task
    return await self._left(job, reader)


@_way("scope_cancel")
async def _scope_cancel(self: _Clients, job: Job) -> Outcome:
    reader, reached = _Reader(job), anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(_reading_task(self, job, reader, reached))
        with anyio.move_on_after(job.cancel_after_s):
            await reached.wait()
        group.cancel_scope.cancel()
    return await self._left(job, reader)


@_way("thread_close")
async def _thread_close(self: _Clients, job: Job) -> Outcome:
    def work() -> Outcome:
        reader = _Reader(job)
        tokens = self.engine.stream_threadsafe(job.prompt, job.params)
        while len(reader.ids) < job.cancel_after_tokens:
            token = next(tokens, None)
            if token is None:
                break
            reader.take_sync(token)
        tokens.close()  # type: ignore[attr-defined]
        # Nothing more to read here: unless a token said it finished, it was aborted.
        return reader.outcome(None, reader.finish_reason or "abort")

    return await anyio.to_thread.run_sync(work, limiter=self._threads)


assert set(_WAYS) == set(CANCEL_FORMS) | set(READ_WAYS), "every way has a client"


# ---- the checks that need an engine ----------------------------------------------------------


async def _check_at_rest(engine: AsyncEngine, options: SoakOptions) -> list[str]:
    """Once every client has ended: nothing runs or waits, every block is free or cached."""
    problems = []
    with anyio.move_on_after(options.idle_timeout_s) as waited:
        await engine.idle()
    if waited.cancelled_caught:
        problems.append(
            f"[idle] the engine was still busy {options.idle_timeout_s:g} s after "
            "the last client ended"
        )
    if "leak-block" in options.inject:
        engine._core.blocks._pop_unused()
    stats = engine.stats()
    if stats.running or stats.waiting:
        problems.append(
            f"[queues] {stats.running} requests running and {stats.waiting} waiting at the end"
        )
    held = stats.kv_blocks_total - stats.kv_blocks_free - stats.kv_blocks_cached
    if held:
        problems.append(
            f"[blocks] {held} KV blocks are neither free nor cached at the end "
            f"(total {stats.kv_blocks_total}, free {stats.kv_blocks_free}, "
            f"cached {stats.kv_blocks_cached})"
        )
    try:
        engine._core.blocks.check_invariants([])
    except AssertionError as exc:
        problems.append(f"[blocks] the block bookkeeping is inconsistent: {exc}")
    return problems


async def _check_nothing_left(
    options: SoakOptions, baseline_threads: set[int | None], plant: bool
) -> list[str]:
    """After an engine's shutdown: no task but this one, no new `asyncllm-*` thread."""
    with _planted_leaks(options if plant else None):
        for _ in range(3):  # let tasks that just finished run their last callbacks
            await asyncio.sleep(0)
        me = asyncio.current_task()
        tasks = sorted(t.get_name() for t in asyncio.all_tasks() if t is not me and not t.done())
        threads = sorted(
            t.name
            for t in threading.enumerate()
            if t.name.startswith("asyncllm") and t.ident not in baseline_threads
        )
    problems = []
    if tasks:
        problems.append(f"[tasks] {len(tasks)} tasks left after shutdown: {tasks[:10]}")
    if threads:
        problems.append(f"[threads] threads left after shutdown: {threads}")
    return problems


@contextlib.contextmanager
def _planted_leaks(options: SoakOptions | None) -> Iterator[None]:
    """The leak-task / leak-thread test hooks: a task and a thread left over while the
    checks run, then stopped."""
    inject = options.inject if options is not None else ()
    release = threading.Event()
    task = thread = None
    if "leak-task" in inject:
        task = asyncio.get_running_loop().create_task(asyncio.sleep(3600), name="soak-planted")
    if "leak-thread" in inject:
        thread = threading.Thread(target=release.wait, name="asyncllm-planted", daemon=True)
        thread.start()
    try:
        yield
    finally:
        release.set()
        if task is not None:
            task.cancel()
        if thread is not None:
            thread.join()


def _plant_wrong_token(jobs: list[Job], outcomes: dict[int, Outcome]) -> None:
    """The wrong-token test hook: token id -1 (which no model draws) as the first token
    of the first finished greedy request that the isolated runs check."""
    for job in jobs:
        outcome = outcomes.get(job.number)
        if outcome is None or outcome.final is None or status_of(outcome) != "finished":
            continue
        if job.key is not None and job.params.is_greedy:
            tokens = [-1, *outcome.final.token_ids[1:]]
            outcomes[job.number] = outcome._replace(
                received=tokens[: len(outcome.received)],
                final=outcome.final._replace(token_ids=tokens),
            )
            return


# ---- isolated runs -------------------------------------------------------------------------


class _Isolated(NamedTuple):
    """The deterministic checks: each key's isolated run against the soak's requests."""

    runs: int
    checked: Counter[str]
    near_ties: int
    violations: list[str]


async def _isolated_runs(
    options: SoakOptions, jobs: list[Job], outcomes: dict[int, Outcome]
) -> _Isolated:
    """Run each (prompt, params) key alone, one at a time, on a fresh engine without prefix
    caching, and compare every soak request of that key with it."""
    keyed = [
        (job, outcomes[job.number])
        for job in jobs
        if job.key is not None
        and job.number in outcomes
        and status_of(outcomes[job.number]) in ("finished", "aborted")
        and (outcomes[job.number].tokens or status_of(outcomes[job.number]) == "finished")
    ]
    representative = {job.key: job for job, _ in keyed}
    settings = options.engine_settings() | {"enable_prefix_caching": False}
    engine = AsyncEngine.from_pretrained(options.model, **settings)
    truth: dict[tuple[int, int], list[int]] = {}
    checked: Counter[str] = Counter()
    near_ties, violations = 0, []
    async with engine:
        for key in _progress(sorted(representative), options, "isolated runs"):
            job = representative[key]
            truth[key] = (await engine.generate(job.prompt, job.params)).token_ids
        for job, outcome in keyed:
            assert job.key is not None
            kind = "greedy" if job.params.is_greedy else "seeded"
            checked[f"{kind} {status_of(outcome)}"] += 1
            divergence = find_divergence(job, outcome, truth[job.key])
            if divergence is not None:
                excused, problem = await _judge(
                    engine, job, divergence, truth[job.key], options.tie_margin
                )
                near_ties += excused
                violations += [problem] if not excused else []
    return _Isolated(len(truth), checked, near_ties, violations)


async def _judge(
    engine: AsyncEngine, job: Job, divergence: Divergence, truth: list[int], tie_margin: float
) -> tuple[bool, str]:
    """Describe a divergence; a greedy one is excused when the soak drew the isolated run's
    runner-up and the two were within `tie_margin` of each other (float rounding under
    another batch composition can flip such a near-tie)."""
    d = divergence
    name = f"request {job.number} ({job.way}, key {job.key})"
    where = f"token {d.position} is {d.soak_token}, its isolated run's is {d.isolated_token}"
    if not job.params.is_greedy:
        return False, f"[seeded] {name}: {where} (same seed, same prompt)"
    if d.soak_token is None or d.isolated_token is None:
        return False, f"[greedy] {name}: {where} (the outputs end differently)"
    wanted = max(2, job.params.logprobs or 0)
    probe = await engine.generate(job.prompt, dataclasses.replace(job.params, logprobs=wanted))
    if probe.token_ids != truth or probe.logprobs is None:
        return False, f"[isolated] two isolated runs of key {job.key} differ"
    (_, best), (second, runner_up) = probe.logprobs[d.position].top[:2]
    gap = best - runner_up
    excused = second == d.soak_token and gap <= tie_margin
    return excused, f"[greedy] {name}: {where} (isolated top-2 logprob gap {gap:.3g})"


# ---- summary -------------------------------------------------------------------------------


def _progress(items: list[Any], options: SoakOptions, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="run", disable=not options.progress, file=sys.stderr)


def _summary(
    options: SoakOptions,
    stats: EngineStats,
    jobs: list[Job],
    outcomes: dict[int, Outcome],
    clients: _Clients,
    isolated: _Isolated,
    wall_s: float,
) -> dict[str, Any]:
    """What the table prints (and --out records)."""
    status = {j.number: status_of(outcomes[j.number]) if j.number in outcomes else "" for j in jobs}
    reasons = Counter(o.finish_reason for o in outcomes.values() if status_of(o) == "finished")
    asked = Counter(j.way for j in jobs)
    aborted = Counter(j.way for j in jobs if status[j.number] == "aborted")
    greedy_finished = sum(j.params.is_greedy and status[j.number] == "finished" for j in jobs)
    checked = isolated.checked
    generated = sum(len(o.tokens) for o in outcomes.values())
    engine = (
        f"{options.num_kv_blocks} KV blocks x {options.block_size} tokens, max_num_seqs "
        f"{options.max_num_seqs}, max_num_batched_tokens {options.max_num_batched_tokens}, "
        f"overlap {_overlap(options)}"
    )
    return {
        "model": options.model or "embedded tiny-qwen3",
        "device": _device_name(options),
        "engine": engine,
        "requests submitted": len(jobs),
        "finished (stop)": reasons["stop"],
        "finished (length)": reasons["length"],
        "aborted": sum(aborted.values()),
        "errored": sum(s == "errored" for s in status.values()),
        "cancel forms (asked/aborted)": {f: [asked[f], aborted[f]] for f in CANCEL_FORMS},
        "read to the end by": {way: asked[way] for way in READ_WAYS},
        "from other threads": sum(j.in_thread for j in jobs),
        "greedy finished checked/all": [checked["greedy finished"], greedy_finished],
        "seeded finished checked": checked["seeded finished"],
        "cancelled prefixes checked": checked["greedy aborted"] + checked["seeded aborted"],
        "isolated runs": isolated.runs,
        "near-tie divergences excused": isolated.near_ties,
        "prefix cache hit rate": stats.prefix_cache_hit_rate,
        "preemptions": stats.num_preemptions,
        "steps": stats.num_steps,
        "prefix cache resets": clients.resets,
        "late aborts": clients.late_aborts,
        "generated tokens": generated,
        "wall seconds": wall_s,
        "requests/s": len(jobs) / wall_s,
        "generated tokens/s": generated / wall_s,
    }


def _device_name(options: SoakOptions) -> str:
    config = EngineConfig().replace(**options.engine_settings())
    device = config.torch_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name} ({str(config.torch_dtype(device)).removeprefix('torch.')})"


def _overlap(options: SoakOptions) -> str:
    return "auto" if options.overlap is None else ("on" if options.overlap else "off")


# ---- command line --------------------------------------------------------------------------


_HELP = {
    "requests": "requests to submit",
    "model": "model directory; None is the embedded tiny model",
    "device": "auto, cpu, cuda or cuda:N",
    "dtype": "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16; greedy "
    "outputs match their isolated runs exactly only in float32",
    "seed": "seed of the workload and of the engine: the same seed gives the same requests, "
    "arrivals and cancellation points",
    "cancel_fraction": "fraction of clients that walk away early, each by a form drawn at "
    "random (break, aclose, async_with, task_cancel, scope_cancel, drop, abort, timeout, "
    "thread_close)",
    "max_concurrency": "most clients at once; an arrival waits for a free slot",
    "arrival_rate": "mean arrivals per second (Poisson); 0 lets every request arrive at once",
    "max_prompt_len": "prompts have 1 to this many tokens",
    "max_new_tokens": "each request's max_tokens is drawn from 1 to this",
    "pool_prompts": "size of the pool of shared prompts (groups of 4 sharing a prefix)",
    "pool_fraction": "fraction of requests that take a pooled prompt and one of 8 fixed "
    "params; their greedy and seeded outputs are checked against one isolated run per "
    "(prompt, params)",
    "reset_probability": "chance that an arrival calls engine.reset_prefix_cache()",
    "num_kv_blocks": "KV pool size in blocks; small, so that requests get preempted",
    "block_size": "tokens per KV block",
    "max_num_seqs": "most requests per engine step",
    "max_num_batched_tokens": "token budget per step; small, so that prompts are prefilled "
    "in chunks",
    "tie_margin": "excuse a greedy divergence where the soak drew its isolated run's "
    "runner-up token and the two logprobs are within this margin (rounding under another "
    "batch can flip such a near-tie; counted in the summary); 0 excuses none",
    "request_timeout_s": "a request that takes longer is a violation",
    "idle_timeout_s": "how long the engine may stay busy after the last client ended",
}
_SPECIAL = {"overlap", "progress", "inject"}  # flags that are not plain --name VALUE


def add_parser(kinds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`asyncllm bench soak`: one flag per `SoakOptions` field."""
    p = kinds.add_parser(
        "soak",
        help="many random requests and cancellations, then check that nothing leaked",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for field in dataclasses.fields(SoakOptions):
        if field.name not in _SPECIAL:
            default = field.default
            p.add_argument(
                "--" + field.name.replace("_", "-"),
                type=str if default is None else type(default),
                default=default,
                help=_HELP[field.name] + " (default: %(default)s)",
            )
    p.add_argument(
        "--overlap",
        choices=("auto", "on", "off"),
        default="auto",
        help="overlapped scheduling (auto: on for CUDA, off for CPU)",
    )
    p.add_argument("--no-progress", action="store_true", help="show no progress bars")
    p.add_argument(
        "--inject",
        action="append",
        choices=INJECTIONS,
        default=[],
        help="test hook: plant this violation, to prove that the checker fails (repeatable): "
        "leak-block takes a KV block, wrong-token corrupts a checked greedy output, "
        "leak-task / leak-thread leave a task / an asyncllm-* thread behind, lost-request "
        "forgets one request's ending",
    )
    p.add_argument("--out", default=None, help="also write the summary and violations as JSON")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    plain = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SoakOptions)
        if f.name not in _SPECIAL
    }
    try:
        options = SoakOptions(
            **plain,
            overlap={"auto": None, "on": True, "off": False}[args.overlap],
            progress=not args.no_progress,
            inject=tuple(args.inject),
        )
    except ConfigError as exc:
        print(f"asyncllm bench soak: {exc}", file=sys.stderr)
        return 2
    report = run_soak(options)
    print(report.table())
    if args.out:
        record = {
            "options": dataclasses.asdict(options),
            "ok": report.ok,
            "summary": report.summary,
            "violations": report.violations,
        }
        Path(args.out).write_text(json.dumps(record, indent=2, default=str))
    return 0 if report.ok else 1
