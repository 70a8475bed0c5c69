"""`asyncllm bench throughput --trace`: when each engine phase ran, and where a run's time went.

`StepTrace` wraps the engine's phases and records `[phase, start, end, info]` events (seconds
on `time.perf_counter`), plus a `run` event around each measured run. `summarize` turns them
into what profiling needs first: per run, how busy the engine's stream was, and per kind of
step (prefill or mixed; decode by batch size) the steps, the tokens, the stream time and the
host time of their launches.

Stream time is measured by CUDA events recorded on the engine's stream around each launch:
it is the device's work plus any wait for an eager launch's kernels, so a stream that is busy
for less than the run's wall time waited on the host for the rest.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from asyncllm.engine.async_engine import AsyncEngine

__all__ = ["DECODE_BUCKETS", "StepTrace", "summarize"]

Event = tuple[str, float, float, Any]

DECODE_BUCKETS = (8, 32, 128)
"""Upper bounds of the decode batch sizes that `summarize` groups apart (and one above)."""


class StepTrace:
    """Records the engine's phases from now on (the wrappers stay for the engine's life).

    Example:
        >>> trace = StepTrace(engine)  # doctest: +SKIP
        >>> with trace.run("offline"):  # doctest: +SKIP
        ...     await engine.generate_many(prompts, params)
        >>> summarize(trace.events)["offline"]["stream_busy"]  # doctest: +SKIP
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.events: list[Event] = []
        core, runner = engine._core, engine._core.runner
        assert runner is not None
        self._stream = runner.stream
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        core.schedule = self._wrap("schedule", core.schedule, _step_info)  # type: ignore[method-assign]
        core.prepare = self._wrap("prepare", core.prepare, _prepared_info)  # type: ignore[method-assign]
        core.end_step = self._wrap("end_step", core.end_step, None)  # type: ignore[method-assign]
        runner.launch = self._stream_timed(self._wrap("launch", runner.launch, None))  # type: ignore[method-assign]
        runner.collect = self._wrap("collect", runner.collect, self._stream_ms)  # type: ignore[method-assign]

    @contextmanager
    def run(self, name: str) -> Iterator[None]:
        """Mark the steps scheduled inside the block as the run `name`."""
        start = time.perf_counter()
        yield
        self.events.append(("run", start, time.perf_counter(), name))

    def _stream_timed(self, launch: Callable[..., Any]) -> Callable[..., Any]:
        """Brackets each launch with timing events on the engine's stream."""

        def timed(*args: Any) -> Any:
            if self._stream is None:
                return launch(*args)
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record(self._stream)
            out = launch(*args)
            end.record(self._stream)
            self._pending.append((start, end))
            return out

        return timed

    def _stream_ms(self, _: Any) -> float | None:
        """Stream time of the oldest launched step (collect goes in launch order)."""
        if not self._pending:
            return None
        start, end = self._pending.pop(0)
        end.synchronize()
        return float(start.elapsed_time(end))

    def _wrap(self, phase: str, fn: Callable[..., Any], info: Callable[[Any], Any] | None
              ) -> Callable[..., Any]:  # fmt: skip
        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args)
            self.events.append((phase, start, time.perf_counter(), info(out) if info else None))
            return out

        return timed


def _step_info(step: Any) -> Any:
    if step is None:
        return None
    return [len(step.requests), sum(step.num_tokens), step.num_steps]


def _prepared_info(prepared: Any) -> Any:
    return [prepared.ctx.num_seqs, prepared.ctx.num_decode_seqs]


def summarize(events: list[Event] | list[list[Any]]) -> dict[str, dict[str, Any]]:
    """Per run (`StepTrace.run`): wall and stream seconds, host seconds by phase, and steps
    by kind. The i-th scheduled step is the i-th launch and the i-th collect (the engine
    launches every step it schedules, and collects in launch order).

    A step is "decode" when it schedules one token per request, else "prefill" (prefill
    chunks, alone or mixed with decodes); decodes are grouped by requests, `DECODE_BUCKETS`.
    Each kind counts its launches, its steps (a multi-step decode launch runs several), the
    tokens they computed, their stream time and the host time of their launches.
    """
    runs = [e for e in events if e[0] == "run"]
    scheduled = [e for e in events if e[0] == "schedule" and e[3] is not None]
    launches = [e for e in events if e[0] == "launch"]
    collects = [e for e in events if e[0] == "collect"]
    summary: dict[str, dict[str, Any]] = {}
    for _, run_start, run_end, name in runs:
        steps = [(s, launch, c) for s, launch, c in zip(scheduled, launches, collects)
                 if run_start <= s[1] <= run_end]  # fmt: skip
        summary[name] = _run_summary(events, steps, run_start, run_end)
    return summary


def _run_summary(events: Sequence[Sequence[Any]], steps: list[tuple[Any, Any, Any]],
                 run_start: float, run_end: float) -> dict[str, Any]:  # fmt: skip
    wall_s = run_end - run_start
    kinds: dict[str, dict[str, float]] = {}
    for (_, _, _, (requests, tokens, *more)), launch, collect in steps:
        num_steps = more[0] if more else 1  # a multi-step decode launch runs num_steps
        kind = kinds.setdefault(_kind(requests, tokens), dict(_EMPTY_KIND))
        kind["launches"] += 1
        kind["steps"] += num_steps
        kind["tokens"] += tokens * num_steps
        kind["stream_ms"] += collect[3] or 0.0
        kind["launch_ms"] += (launch[2] - launch[1]) * 1e3
    stream_s = sum(kind["stream_ms"] for kind in kinds.values()) / 1e3
    host_s: dict[str, float] = {}
    for phase, start, end, _ in events:
        if phase != "run" and run_start <= start <= run_end:
            host_s[phase] = host_s.get(phase, 0.0) + end - start
    return {
        "wall_s": wall_s,
        "launches": len(steps),
        "stream_s": stream_s,
        "stream_busy": stream_s / wall_s if wall_s > 0 else 0.0,
        "host_s": host_s,
        "kinds": {name: kinds[name] for name in _KINDS if name in kinds},
    }


_KINDS = ("prefill", *(f"decode <= {b}" for b in DECODE_BUCKETS),
          f"decode > {DECODE_BUCKETS[-1]}")  # fmt: skip
_EMPTY_KIND = {"launches": 0, "steps": 0, "tokens": 0, "stream_ms": 0.0, "launch_ms": 0.0}


def _kind(requests: int, tokens: int) -> str:
    if tokens > requests:
        return _KINDS[0]
    return _KINDS[1 + bisect_left(DECODE_BUCKETS, requests)]
