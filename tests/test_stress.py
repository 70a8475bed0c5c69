"""A randomized stress test: hundreds of requests arriving at random times, cancelled in every
way at random points. Every request ends exactly once, with its right tokens (a prefix, if
cancelled) or an abort, and no KV block leaks."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest

from asyncllm import AsyncEngine, SamplingParams


@pytest.mark.parametrize(("seed", "overlap"), [(0, False), (1, True)])
async def test_random_arrivals_and_cancellations(
    random_model_dir: Path, seed: int, overlap: bool
) -> None:
    rng = random.Random(seed)
    prompts = [[rng.randrange(384) for _ in range(rng.randint(1, 60))] for _ in range(240)]
    limits = [rng.randint(1, 40) for _ in prompts]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in limits]
    settings = dict(device="cpu", num_kv_blocks=48, block_size=16, max_model_len=128,
                    max_num_seqs=24, max_num_batched_tokens=64)  # fmt: skip

    # The truth: every prompt on its own, in a calm engine.
    async with AsyncEngine.from_pretrained(str(random_model_dir), **settings) as calm:
        expected = [out.token_ids for out in await calm.generate_many(prompts, params)]

    endings: dict[int, tuple[str, list[int]]] = {}
    engine = AsyncEngine.from_pretrained(str(random_model_dir), overlap_scheduling=overlap,
                                         **settings)  # fmt: skip

    async def client(index: int) -> None:
        await anyio.sleep(rng.uniform(0, 0.3))  # arrival time (workload, not synchronisation)
        how = rng.choice(["read", "break", "aclose", "cancel", "never"])
        stop_at = rng.randint(0, limits[index])
        got: list[int] = []
        if how == "break":  # no reference kept: leaving the loop drops (and aborts) it
            async for token in engine.stream(prompts[index], params[index]):
                got.append(token.token_id)
                if len(got) > stop_at:
                    break
            reason = "length" if len(got) == limits[index] else "abort"
        else:
            stream = engine.stream(prompts[index], params[index])
            if how == "cancel":  # the reading task is cancelled while it waits for tokens
                with anyio.move_on_after(rng.uniform(0, 0.2)):
                    async for token in stream:
                        got.append(token.token_id)
            elif how == "never":
                await anyio.sleep(rng.uniform(0, 0.2))
                await stream.aclose()
            else:
                async for token in stream:
                    got.append(token.token_id)
                    if how == "aclose" and len(got) > stop_at:
                        await stream.aclose()
            reason = stream.output().finish_reason
            if how == "never":
                got = stream.output().token_ids
        assert index not in endings, "a request ended twice"
        endings[index] = (reason, got)

    async with engine:
        async with anyio.create_task_group() as group:
            for index in range(len(prompts)):
                group.start_soon(client, index)
        with anyio.fail_after(30):
            await engine.idle()
        stats = engine.stats()
        engine._core.blocks.check_invariants([])

    assert sorted(endings) == list(range(len(prompts)))
    reasons = [reason for reason, _ in endings.values()]
    assert reasons.count("abort") > 20 and reasons.count("length") > 20
    for index, (reason, got) in endings.items():
        assert reason in ("length", "abort"), reason
        want = expected[index]
        assert got == want[: len(got)], f"request {index} drew other tokens"
        if reason == "length":
            assert got == want
    assert stats.kv_blocks_free + stats.kv_blocks_cached == stats.kv_blocks_total
    assert stats.num_preemptions > 0  # the pool was tight enough to exercise preemption


async def test_random_choices_penalties_and_cancellations(random_model_dir: Path) -> None:
    """n > 1 with penalties under a tight pool (preemption), overlapped scheduling and
    cancellations: every choice draws exactly what it draws in a calm engine."""
    rng = random.Random(2)
    prompts = [[rng.randrange(384) for _ in range(rng.randint(1, 50))] for _ in range(60)]
    params = [
        SamplingParams(
            n=rng.randint(1, 4), seed=index, temperature=rng.choice([0.0, 0.8]),
            max_tokens=rng.randint(1, 24), frequency_penalty=rng.choice([0.0, 0.7]),
            repetition_penalty=rng.choice([1.0, 1.3]),
        )
        for index in range(len(prompts))
    ]  # fmt: skip
    settings = dict(device="cpu", num_kv_blocks=20, block_size=16, max_model_len=96,
                    max_num_seqs=16, max_num_batched_tokens=64)  # fmt: skip
    async with AsyncEngine.from_pretrained(str(random_model_dir), **settings) as calm:
        expected = await calm.generate_many(prompts, params)

    engine = AsyncEngine.from_pretrained(str(random_model_dir), overlap_scheduling=True,
                                         **settings)  # fmt: skip
    cancelled = 0

    async def client(index: int) -> None:
        nonlocal cancelled
        await anyio.sleep(rng.uniform(0, 0.2))
        stop_at = rng.choice([None, rng.randint(0, 30)])
        got: dict[int, list[int]] = {}
        async with engine.stream(prompts[index], params[index]) as stream:
            async for token in stream:
                got.setdefault(token.choice, []).append(token.token_id)
                if stop_at is not None and sum(map(len, got.values())) > stop_at:
                    break
        out = stream.output()
        cancelled += any(c.finish_reason == "abort" for c in out.choices)
        for choice in out.choices:
            want = expected[index].choices[choice.index].token_ids
            read = got.get(choice.index, [])  # what arrived after the break was not read
            assert choice.token_ids[: len(read)] == read
            assert choice.token_ids == want[: len(choice.token_ids)], f"request {index}"
            if choice.finish_reason != "abort":
                assert choice.token_ids == want

    async with engine:
        async with anyio.create_task_group() as group:
            for index in range(len(prompts)):
                group.start_soon(client, index)
        with anyio.fail_after(30):
            await engine.idle()
        stats = engine.stats()
        engine._core.blocks.check_invariants([])
    assert cancelled > 5
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens > 0
    assert stats.kv_blocks_free + stats.kv_blocks_cached == stats.kv_blocks_total
