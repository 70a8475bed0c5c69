"""Submit from threads that are not the event loop's (e.g. Flask or Django workers).

The engine runs in an event loop on its own thread; worker threads call the *_threadsafe
methods, which block only the calling thread.

    python examples/from_thread.py --workers 4
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import anyio

from asyncllm import AsyncEngine, SamplingParams


def serve_forever(engine: AsyncEngine, ready: threading.Event, stop: threading.Event) -> None:
    """The engine's home: an event loop on a background thread."""

    async def run() -> None:
        async with engine:
            ready.set()
            await anyio.to_thread.run_sync(stop.wait)  # serve until told to stop

    asyncio.run(run())


def handle_request(engine: AsyncEngine, index: int) -> str:
    """What a WSGI view would do: stream tokens in the worker thread."""
    pieces = [
        token.text
        for token in engine.stream_threadsafe(
            f"Request {index}: Once upon a time", SamplingParams(max_tokens=24, temperature=0)
        )
    ]
    return "".join(pieces)


def main(workers: int) -> None:
    engine = AsyncEngine.from_pretrained()
    ready, stop = threading.Event(), threading.Event()
    home = threading.Thread(target=serve_forever, args=(engine, ready, stop), daemon=True)
    home.start()
    ready.wait()
    with ThreadPoolExecutor(workers) as pool:
        for index, text in enumerate(pool.map(lambda i: handle_request(engine, i), range(8))):
            print(index, repr(text[:60]))
    stop.set()
    home.join()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=4)
    main(parser.parse_args().workers)
