"""CPU time per step, with the model replaced by a stub.

`measure`: the scheduler and block manager alone. 256 requests decode together (prompts of
100-1024 random tokens, prefix caching on); each step schedules, allocates blocks, "samples"
a stub token per request, appends it and registers filled blocks. Median and p99 ms/step.

`measure_engine_loop` (`--engine-loop`): the whole AsyncEngine loop on the embedded model
with the device work stubbed out (a launch returns random tokens at once): scheduling,
building step inputs, detokenising, stop rules and waking 256 `stream()` readers. This is
the CPU cost each step must hide behind the device's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import anyio

from asyncllm.engine.block_manager import BlockManager
from asyncllm.engine.request import Request
from asyncllm.engine.scheduler import Scheduler
from asyncllm.sampling import SamplingParams

__all__ = ["add_parser", "measure"]


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


def measure_engine_loop(num_seqs: int = 256, max_tokens: int = 400) -> dict[str, Any]:
    """Wall milliseconds per engine step with the device work stubbed out."""
    import torch

    from asyncllm.engine.async_engine import AsyncEngine
    from asyncllm.engine.runner import LaunchedStep
    from asyncllm.layers.sampler import SamplerOutput

    def stub_launch(prepared: Any, previous: Any) -> LaunchedStep:
        tokens = torch.randint(5, 1000, (prepared.sampling.seeds.shape[0],))
        return LaunchedStep(tokens, SamplerOutput(tokens, None, None, None), None)

    async def run() -> dict[str, Any]:
        engine = AsyncEngine.from_pretrained(
            None, device="cpu", num_kv_blocks=num_seqs * 96, max_num_seqs=num_seqs,
            overlap_scheduling=True,
        )  # fmt: skip
        async with engine:
            runner = engine._core.runner
            assert runner is not None
            runner.launch = stub_launch  # type: ignore[method-assign]
            rng = random.Random(0)
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.6)

            async def consume() -> None:
                prompt = [rng.randrange(1, 1000) for _ in range(rng.randint(100, 1024))]
                async for _ in engine.stream(prompt, params):
                    pass

            start = time.perf_counter()
            async with anyio.create_task_group() as group:
                for _ in range(num_seqs):
                    group.start_soon(consume)
            elapsed = time.perf_counter() - start
            steps = engine.stats().num_steps
        return {"engine_loop_steps": steps, "engine_loop_ms_per_step": elapsed / steps * 1e3}

    return anyio.run(run)


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
                   help="also time the whole engine loop (stub model, 256 streams)")  # fmt: skip
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    result = measure(args.num_seqs, args.steps, args.block_size)
    if args.engine_loop:
        result |= measure_engine_loop(args.num_seqs)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0
