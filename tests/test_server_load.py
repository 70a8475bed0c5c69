"""A crowd at the HTTP server: 200 concurrent streaming clients, a third of whom hang up at
random points (some before their first token). Afterwards nothing may be left running, no
KV block held, and a greedy request must answer what it answered before the crowd."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

pytest.importorskip("uvicorn")

from asyncllm import AsyncEngine
from asyncllm.server import create_app
from tests.servers import serve_in_thread, wait_until_idle

CLIENTS = 200
OPENERS = ["Once upon a time", "One day", "The little cat", "A big red ball", "Tom and Sue"]


async def one_client(client: httpx.AsyncClient, rng: random.Random, index: int) -> str:
    """Stream a completion; a deserter hangs up after a random number of events. Returns
    how it ended."""
    max_tokens = rng.randint(8, 24)
    # Before the first token, or after one or two events: however the server gathers tokens
    # into events, a stream of 8+ tokens has at least two, then the usage and [DONE].
    leave_after = rng.randrange(3) if index % 3 == 0 else None
    body = {
        "prompt": rng.choice(OPENERS),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 1.0,
        "seed": index,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    await asyncio.sleep(rng.random() * 0.5)  # arrivals spread over half a second
    payloads: list[str] = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        if leave_after == 0:
            return "left before its first token"
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payloads.append(line[len("data: ") :])
            if leave_after is not None and len(payloads) >= leave_after:
                return "left mid-stream"
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["usage"]["completion_tokens"] == max_tokens
    return "finished"


async def crowd(url: str) -> dict[str, int]:
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        endings = await asyncio.gather(*(one_client(client, rng, i) for i in range(CLIENTS)))
    counts: dict[str, int] = {}
    for ending in endings:
        counts[ending] = counts.get(ending, 0) + 1
    return counts


def test_a_crowd_with_deserters_leaves_the_server_as_it_found_it() -> None:
    engine = AsyncEngine.from_pretrained(None, device="cpu", num_kv_blocks=1024)
    with serve_in_thread(create_app(engine)) as url:
        probe = {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}
        before = httpx.post(f"{url}/v1/completions", json=probe, timeout=60).json()
        start = time.monotonic()
        counts = asyncio.run(crowd(url))
        elapsed = time.monotonic() - start
        stats = wait_until_idle(engine)
        after = httpx.post(f"{url}/v1/completions", json=probe, timeout=60).json()
    deserters = len(range(0, CLIENTS, 3))
    assert counts["finished"] == CLIENTS - deserters
    assert counts["left mid-stream"] + counts["left before its first token"] == deserters
    assert counts["left before its first token"] > 0
    assert stats.kv_blocks_free + stats.kv_blocks_cached == stats.kv_blocks_total
    assert after["choices"][0]["text"] == before["choices"][0]["text"]
    assert elapsed < 40, f"the crowd took {elapsed:.1f} s"
