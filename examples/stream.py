"""Stream a completion token by token: the `async for` loop.

python examples/stream.py "Once upon a time" --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio

from asyncllm import AsyncEngine, SamplingParams


async def main(prompt: str, max_tokens: int, model: str | None) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=1)
    async with AsyncEngine.from_pretrained(model) as engine:
        async with engine.stream(prompt, params) as stream:
            print(prompt, end="", flush=True)
            async for token in stream:
                print(token.text, end="", flush=True)
        out = stream.output()
        print(f"\n[{out.finish_reason}: {out.usage.completion_tokens} tokens, "
              f"first after {out.metrics.ttft:.3f}s]")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", nargs="?", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="model directory (default: embedded)")
    args = parser.parse_args()
    asyncio.run(main(args.prompt, args.max_tokens, args.model))
