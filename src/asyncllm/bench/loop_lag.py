"""`asyncllm bench lag`: how late the event loop runs other tasks while the engine is busy.

A heartbeat coroutine in the engine's own loop sleeps 1 ms again and again and records how
much later than asked it wakes up, while N streams are read concurrently.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

import anyio

from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.sampling import SamplingParams

__all__ = ["LagMonitor", "add_parser", "measure"]


class LagMonitor:
    """Samples how late a 1 ms sleep in the event loop wakes up."""

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self._running = True

    async def run(self) -> None:
        while self._running:
            start = time.perf_counter()
            await anyio.sleep(0.001)
            self.lags_ms.append(max(0.0, (time.perf_counter() - start) * 1e3 - 1.0))

    def stop(self) -> dict[str, float]:
        """Stop sampling; p50 / p99 / max lag in milliseconds."""
        self._running = False
        lags = sorted(self.lags_ms) or [0.0]
        return {
            "samples": len(lags),
            "p50_ms": statistics.median(lags),
            "p99_ms": lags[int(0.99 * (len(lags) - 1))],
            "max_ms": lags[-1],
        }


async def measure(engine: AsyncEngine, num_streams: int, max_tokens: int, seed: int = 0
                  ) -> dict[str, Any]:  # fmt: skip
    """Lag while `num_streams` streams of random prompts are read to the end."""
    rng = random.Random(seed)
    vocab = engine._core.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(16, 128))]
               for _ in range(num_streams)]  # fmt: skip
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.8)
    monitor = LagMonitor()

    async def consume(prompt: list[int]) -> None:
        async for _ in engine.stream(prompt, params):
            pass

    async with anyio.create_task_group() as lag_group:
        lag_group.start_soon(monitor.run)
        start = time.perf_counter()
        async with anyio.create_task_group() as group:
            for prompt in prompts:
                group.start_soon(consume, prompt)
        elapsed = time.perf_counter() - start
        lag = monitor.stop()
    return {"streams": num_streams, "tok_per_s": num_streams * max_tokens / elapsed, **lag}


def add_parser(kinds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`asyncllm bench lag`."""
    p = kinds.add_parser("lag", help="event-loop lag while streams are served")
    p.add_argument("--model", default=None, help="model dir (default: the embedded model)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--streams", type=int, default=64, help="concurrent streams (default: 64)")
    p.add_argument("--max-tokens", type=int, default=128,
                   help="tokens per stream (default: 128)")  # fmt: skip
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    async def main() -> dict[str, Any]:
        async with AsyncEngine.from_pretrained(args.model, device=args.device) as engine:
            await engine.generate([1, 2, 3], SamplingParams(max_tokens=4))  # warm-up
            result = await measure(engine, args.streams, args.max_tokens)
            return {"device": str(engine.config.torch_device()), **result}

    result = asyncio.run(main())
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0
