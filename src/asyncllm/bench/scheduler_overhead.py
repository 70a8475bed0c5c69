"""CPU time per step, with the model replaced by a stub.

`measure`: the scheduler and block manager alone. 256 requests decode together (prompts of
100-1024 random tokens, prefix caching on); each step schedules, allocates blocks, "samples"
a stub token per request, appends it and registers filled blocks. Median and p99 ms/step.

`measure_engine_loop` (`--engine-loop`): the whole AsyncEngine loop on the embedded model
with the device work stubbed out (a launch returns random tokens at once, inline, as a
CUDA-graph replay is launched): scheduling, building step inputs, detokenising, stop rules
and waking readers. The engine's own CPU time per decode step (schedule + prepare + launch
+ process, median and p99, measured as CPU time of the loop thread so that a busy machine
does not inflate it) is the cost each step must hide behind the device's; the CPU time the
readers and the event loop take besides is reported apart, for each way of reading
(`READER_MODES`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time
from collections.abc import Iterator
from typing import Any

import anyio

from asyncllm.engine.block_manager import BlockManager
from asyncllm.engine.request import Request
from asyncllm.engine.scheduler import Scheduler
from asyncllm.errors import ConfigError
from asyncllm.sampling import SamplingParams

__all__ = ["READER_MODES", "add_parser", "measure", "measure_engine_loop"]


def measure(
    num_seqs: int = 256, steps: int = 2000, block_size: int = 16, seed: int = 0
) -> dict[str, Any]:
    """Run the stub workload; returns per-step timings in milliseconds."""
    rng = random.Random(seed)
    blocks = BlockManager(
        num_blocks=num_seqs * 200, block_size=block_size, enable_prefix_caching=True
    )
    scheduler = Scheduler(blocks, max_num_seqs=num_seqs, max_num_batched_tokens=1 << 30)
    params = SamplingParams(max_tokens=1 << 20, ignore_eos=True)
    for index in range(num_seqs):
        prompt = [rng.randrange(50_000) for _ in range(rng.randint(100, 1024))]
        scheduler.add(
            Request(
                f"r{index}",
                prompt,
                params,
                max_tokens=1 << 20,
                seed=index,
                eos_token_ids=frozenset(),
                detokenizer=None,
            )
        )
    stub_tokens = [rng.randrange(50_000) for _ in range(num_seqs)]
    _one_step(scheduler, stub_tokens)  # admits and prefills everyone: not the steady state
    times_ms = []
    for _ in range(steps):
        start = time.perf_counter()
        _one_step(scheduler, stub_tokens)
        times_ms.append((time.perf_counter() - start) * 1e3)
    times_ms.sort()
    return {
        "num_seqs": num_seqs,
        "steps": steps,
        "block_size": block_size,
        "median_ms": statistics.median(times_ms),
        "p99_ms": times_ms[int(0.99 * (len(times_ms) - 1))],
        "running": len(scheduler.running),
    }


READER_MODES = ("stream", "offline", "none")
"""How the engine-loop bench reads its requests: `stream` (a task per request iterating
`stream()`, woken every step), `offline` (`generate_many`), `none` (submit every request,
wait for the engine to go idle, then read the outputs: nobody is woken per step)."""

_ENGINE_PHASES = ("schedule", "prepare", "launch", "process")


class _StepCost:
    """The engine's own CPU seconds (of the loop thread) for one scheduled step, by phase."""

    __slots__ = ("decode_only", "num_steps", "seconds")

    def __init__(self, decode_only: bool, num_steps: int) -> None:
        self.decode_only = decode_only
        self.num_steps = num_steps
        """Decode steps the launch ran (multi-step decode)."""
        self.seconds = dict.fromkeys(_ENGINE_PHASES, 0.0)

    def per_step_ms(self, phase: str | None = None) -> float:
        """CPU ms per decode step it ran, of one phase or all."""
        seconds = self.seconds[phase] if phase else sum(self.seconds.values())
        return seconds * 1e3 / self.num_steps


class _StepCostRecorder:
    """Attributes the engine's phase timings to the step they belong to.

    With overlap scheduling the loop interleaves steps (schedule/prepare/launch step N+1,
    then process step N), so `EngineCore.clock` is wrapped: the build phases go to the step
    scheduled last, `process` to the step being processed.
    """

    def __init__(self, engine: Any) -> None:
        core = engine._core
        self.steps: dict[int, _StepCost] = {}
        self._building: _StepCost | None = None
        self._processing: _StepCost | None = None
        schedule, process, clock = core.schedule, engine._process, core.clock

        def timed_schedule() -> Any:
            step = schedule()
            self._building = None
            if step is not None:
                decode_only = all(count == 1 for count in step.num_tokens)
                cost = _StepCost(decode_only, step.num_steps)
                self._building = self.steps[step.step_id] = cost
            return step

        async def timed_process(step: Any, result: Any) -> None:
            self._processing = self.steps.get(step.step_id)
            await process(step, result)
            self._processing = None

        @contextlib.contextmanager
        def timed_clock(phase: str) -> Iterator[None]:
            # CPU time of this thread, not wall time: on a busy machine the wall time of a
            # phase also counts the moments the OS ran something else.
            start = time.thread_time()
            with clock(phase):
                yield
            elapsed = time.thread_time() - start
            target = self._processing if phase == "process" else self._building
            if target is not None and phase != "wait":
                target.seconds[phase] += elapsed

        core.schedule, core.clock, engine._process = timed_schedule, timed_clock, timed_process

    def summary(self, wall_s: float, cpu_s: float) -> dict[str, Any]:
        """Median / p99 CPU ms of the engine's own work per decode step (a multi-step launch's
        cost spread over its steps), and the CPU time the loop thread spent on everything
        else (readers, the event loop, handing steps to the worker thread) per step."""
        decodes = [s for s in self.steps.values() if s.decode_only]

        def per_decode_step(phase: str | None = None) -> list[float]:
            return [s.per_step_ms(phase) for s in decodes for _ in range(s.num_steps)]

        engine_s = sum(sum(s.seconds.values()) for s in self.steps.values())
        num_steps = sum(s.num_steps for s in self.steps.values())
        phases = {phase: statistics.median(per_decode_step(phase)) if decodes else float("nan")
                  for phase in _ENGINE_PHASES}  # fmt: skip
        return {
            "launches": len(self.steps),
            "steps": num_steps,
            "decode_steps": sum(s.num_steps for s in decodes),
            "engine_cpu_ms_per_decode_step": _median_p99(per_decode_step()),
            "phase_cpu_ms_per_decode_step": phases,
            "engine_cpu_ms_per_step": engine_s / num_steps * 1e3,
            "readers_and_loop_cpu_ms_per_step": (cpu_s - engine_s) / num_steps * 1e3,
            "wall_ms_per_step": wall_s / num_steps * 1e3,
        }


def _median_p99(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {"median": float("nan"), "p99": float("nan")}
    ordered = sorted(values_ms)
    return {"median": statistics.median(ordered), "p99": ordered[int(0.99 * (len(ordered) - 1))]}


def measure_engine_loop(
    num_seqs: int = 256, max_tokens: int = 400, readers: str = "stream", **config: Any
) -> dict[str, Any]:
    """The engine loop on the embedded model with the device work stubbed out (a launch
    returns random tokens at once, inline as a CUDA-graph replay would be): the engine's
    own CPU time per decode step (schedule + prepare + launch + process, median and p99) and
    the wall time per step, with `readers` (one of `READER_MODES`) consuming the outputs.
    `config`: extra `EngineConfig` fields."""
    import torch

    from asyncllm.engine.async_engine import AsyncEngine
    from asyncllm.engine.runner import LaunchedStep
    from asyncllm.layers.sampler import SamplerOutput

    if readers not in READER_MODES:
        raise ConfigError(f"bench option readers must be one of {READER_MODES}, got {readers!r}")

    def stub_launch(prepared: Any, previous: Any) -> LaunchedStep:
        rows = prepared.sampling.seeds.shape[0]
        tokens = torch.randint(5, 1000, (rows * prepared.num_steps,))
        return LaunchedStep(tokens[-rows:], SamplerOutput(tokens, None, None, None), None)

    async def run() -> dict[str, Any]:
        engine = AsyncEngine.from_pretrained(
            None, device="cpu", num_kv_blocks=num_seqs * 96, max_num_seqs=num_seqs,
            overlap_scheduling=True, **config,
        )  # fmt: skip
        recorder = _StepCostRecorder(engine)
        async with engine:
            runner = engine._core.runner
            assert runner is not None
            runner.launch = stub_launch  # type: ignore[method-assign]
            runner.launches_cheaply = lambda prepared: True  # type: ignore[method-assign]
            rng = random.Random(0)
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.6)
            prompts = [
                [rng.randrange(1, 1000) for _ in range(rng.randint(100, 1024))]
                for _ in range(num_seqs)
            ]
            start, start_cpu = time.perf_counter(), time.thread_time()
            await _read(engine, prompts, params, readers)
            cpu_s, wall_s = time.thread_time() - start_cpu, time.perf_counter() - start
        return {"readers": readers, **recorder.summary(wall_s, cpu_s)}

    return anyio.run(run)


async def _read(
    engine: Any, prompts: list[list[int]], params: SamplingParams, readers: str
) -> None:
    if readers == "offline":
        await engine.generate_many(prompts, params)
        return
    if readers == "none":
        streams = [engine.stream(prompt, params) for prompt in prompts]
        await engine.idle()
        for stream in streams:
            stream.output()
        return

    async def consume(prompt: list[int]) -> None:
        async for _ in engine.stream(prompt, params):
            pass

    async with anyio.create_task_group() as group:
        for prompt in prompts:
            group.start_soon(consume, prompt)


def _one_step(scheduler: Scheduler, stub_tokens: list[int]) -> None:
    """Schedule, let the stub model "sample" a token per request, append, register."""
    step = scheduler.schedule(0)
    now = time.monotonic()
    for index, (req, samples) in enumerate(zip(step.requests, step.samples)):
        if samples:
            req.num_pending_tokens -= 1
            req.append_token(stub_tokens[index], None, now)
    scheduler.after_step(step)


def add_parser(kinds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`asyncllm bench scheduler`."""
    p = kinds.add_parser("scheduler", help="scheduler + block-manager CPU time per step")
    p.add_argument("--num-seqs", type=int, default=256,
                   help="running sequences per step (default: 256)")  # fmt: skip
    p.add_argument("--steps", type=int, default=2000, help="steps to time (default: 2000)")
    p.add_argument("--block-size", type=int, default=16,
                   help="tokens per KV block (default: 16)")  # fmt: skip
    p.add_argument("--engine-loop", action="store_true",
                   help="also time the whole engine loop (stub model)")  # fmt: skip
    p.add_argument("--decode-steps", type=int, nargs="+", default=[1, 4],
                   help="with --engine-loop: EngineConfig.num_decode_steps values to time "
                        "(default: 1 4)")  # fmt: skip
    p.add_argument("--readers", nargs="+", choices=READER_MODES, default=list(READER_MODES),
                   help="with --engine-loop: how the outputs are read (default: all)")  # fmt: skip
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    result = measure(args.num_seqs, args.steps, args.block_size)
    if args.engine_loop:
        loops = [
            {"num_decode_steps": k}
            | measure_engine_loop(args.num_seqs, readers=mode, num_decode_steps=k)
            for k in args.decode_steps
            for mode in args.readers
        ]
        result["engine_loop"] = loops
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0
