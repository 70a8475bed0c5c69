"""The engine under trio: same API, through anyio. Two streams at once, one cancelled.

python examples/trio_stream.py
"""

from __future__ import annotations

import trio

from asyncllm import AsyncEngine, SamplingParams


async def main() -> None:
    async with AsyncEngine.from_pretrained() as engine:

        async def tell(prompt: str) -> None:
            text = [prompt]
            async for token in engine.stream(prompt, SamplingParams(max_tokens=40, temperature=0)):
                text.append(token.text)
            print("".join(text))

        async def impatient() -> None:
            with trio.move_on_after(0.05):  # cancellation aborts the request
                async for _ in engine.stream("One day", SamplingParams(max_tokens=500)):
                    pass
            print("impatient reader gave up; running requests:", engine.stats().running)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(tell, "Once upon a time")
            nursery.start_soon(impatient)
        stats = engine.stats()
        print("KV blocks free or cached:", stats.kv_blocks_free + stats.kv_blocks_cached,
              "of", stats.kv_blocks_total)  # fmt: skip


if __name__ == "__main__":
    trio.run(main)
