"""Greedy outputs through the public API are token-identical to isolated transformers runs:
single requests, crowded batches, prefix-cache hits, chunked prefill and preemption."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import pytest
from transformers import Qwen3ForCausalLM

from asyncllm import AsyncEngine, SamplingParams
from tests.models import TINY_MODEL_DIR, load_reference, random_prompts, reference_greedy


def engine_for(model_dir: Path, **overrides: Any) -> AsyncEngine:
    settings: dict[str, Any] = dict(device="cpu", dtype="float32", num_kv_blocks=512)
    settings.update(overrides)
    return AsyncEngine.from_pretrained(str(model_dir), **settings)


def expected(
    reference: Qwen3ForCausalLM, prompts: list[list[int]], max_tokens: int
) -> list[list[int]]:
    return [reference_greedy(reference, p, max_tokens, stop_at_eos=False) for p in prompts]


GREEDY = SamplingParams(temperature=0, max_tokens=48)


async def test_single_request_matches_transformers(
    random_model_dir: Path, random_reference: Qwen3ForCausalLM
) -> None:
    [prompt] = random_prompts([19], 384, seed=0)
    async with engine_for(random_model_dir) as engine:
        out = await engine.generate(prompt, SamplingParams(temperature=0, max_tokens=64))
    assert out.token_ids == reference_greedy(random_reference, prompt, 64)
    assert out.finish_reason == "length"
    assert out.usage.prompt_tokens == 19 and out.usage.completion_tokens == 64


async def test_embedded_model_matches_transformers_and_stops_at_eos() -> None:
    reference = load_reference(TINY_MODEL_DIR)
    async with AsyncEngine.from_pretrained(None, device="cpu", dtype="float32") as engine:
        prompt = engine.tokenizer.encode("Once upon a time")
        out = await engine.generate(
            "Once upon a time", SamplingParams(temperature=0, max_tokens=200)
        )
    want = reference_greedy(reference, prompt, 200)
    eos = reference.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos)
    assert out.token_ids == want
    assert out.finish_reason == ("stop" if want[-1] in eos_ids else "length")
    assert out.text.strip()


@pytest.mark.parametrize("overlap", [False, True])
async def test_crowded_batch_with_random_arrivals_matches_transformers(
    random_model_dir: Path, random_reference: Qwen3ForCausalLM, overlap: bool
) -> None:
    rng = random.Random(1)
    prompts = random_prompts([rng.randint(1, 90) for _ in range(36)], 384, seed=1)
    delays = [rng.uniform(0, 0.05) for _ in prompts]
    outputs: list[list[int] | None] = [None] * len(prompts)
    async with engine_for(random_model_dir, max_num_seqs=16, overlap_scheduling=overlap) as engine:

        async def client(index: int) -> None:
            await anyio.sleep(delays[index])  # arrival time, not synchronisation
            out = await engine.generate(prompts[index], GREEDY)
            outputs[index] = out.token_ids

        async with anyio.create_task_group() as group:
            for index in range(len(prompts)):
                group.start_soon(client, index)
    assert outputs == expected(random_reference, prompts, 48)


async def test_prefix_cache_hits_give_identical_outputs(
    random_model_dir: Path, random_reference: Qwen3ForCausalLM
) -> None:
    shared = random_prompts([70], 384, seed=2)[0]
    prompts = random_prompts([5, 17, 1, 40], 384, seed=3, prefix=shared)
    async with engine_for(random_model_dir, block_size=16) as engine:
        first = await engine.generate(prompts[0], GREEDY)
        rest = await engine.generate_many(prompts[1:], GREEDY)
        stats = engine.stats()
    outs = [first, *rest]
    assert first.usage.cached_tokens == 0
    assert all(o.usage.cached_tokens >= 64 for o in rest)  # the 4 full shared blocks
    assert stats.prefix_cache_hit_tokens == sum(o.usage.cached_tokens for o in outs)
    assert [o.token_ids for o in outs] == expected(random_reference, prompts, 48)


async def test_chunked_prefill_matches_transformers(
    random_model_dir: Path, random_reference: Qwen3ForCausalLM
) -> None:
    prompts = random_prompts([150, 97, 3, 64], 384, seed=4)
    async with engine_for(random_model_dir, max_num_batched_tokens=24, max_num_seqs=8) as engine:
        outs = await engine.generate_many(prompts, GREEDY)
        steps = engine.stats().num_steps
    assert steps >= sum(len(p) for p in prompts) // 24  # the prompts really were chunked
    assert [o.token_ids for o in outs] == expected(random_reference, prompts, 48)


async def test_preempted_requests_resume_with_identical_outputs(
    random_model_dir: Path, random_reference: Qwen3ForCausalLM
) -> None:
    prompts = random_prompts([30, 45, 20, 38, 50, 25], 384, seed=5)
    # 14 blocks of 16 tokens cannot hold six ~90-token sequences at once.
    async with engine_for(
        random_model_dir, num_kv_blocks=14, block_size=16, max_model_len=160
    ) as engine:
        outs = await engine.generate_many(prompts, GREEDY)
        stats = engine.stats()
    assert stats.num_preemptions > 0
    assert any(o.metrics.num_preemptions > 0 for o in outs)
    assert [o.token_ids for o in outs] == expected(random_reference, prompts, 48)


@pytest.mark.parametrize(
    ("enable_prefix_caching", "overlap"), [(True, False), (False, False), (True, True)]
)
async def test_everything_at_once_matches_transformers(
    random_model_dir: Path,
    random_reference: Qwen3ForCausalLM,
    enable_prefix_caching: bool,
    overlap: bool,
) -> None:
    """Shared prefixes, chunking and preemption in one crowded run (overlapped scheduling:
    step N+1 is scheduled before step N's tokens are known)."""
    shared = random_prompts([40], 384, seed=6)[0]
    prompts = random_prompts([3, 60, 11, 90, 25, 7, 33, 52], 384, seed=7, prefix=shared)
    async with engine_for(
        random_model_dir,
        num_kv_blocks=30,
        block_size=16,
        max_model_len=200,
        max_num_batched_tokens=32,
        max_num_seqs=16,
        enable_prefix_caching=enable_prefix_caching,
        overlap_scheduling=overlap,
    ) as engine:
        outs = await engine.generate_many(prompts, GREEDY)
        stats = engine.stats()
    assert stats.num_preemptions > 0
    assert (stats.prefix_cache_hit_tokens > 0) == enable_prefix_caching
    assert [o.token_ids for o in outs] == expected(random_reference, prompts, 48)
