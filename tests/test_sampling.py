"""Sampling draws from the right distributions, reproducibly per seed, in any batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from asyncllm import AsyncEngine, SamplingParams
from asyncllm.layers.sampler import Sampler, SamplingTensors, uniform_noise
from tests.models import load_reference

TOY_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0])
DRAWS = 40_000


def draw(
    params: SamplingParams, logits: torch.Tensor = TOY_LOGITS, draws: int = DRAWS
) -> torch.Tensor:
    """Token counts over `draws` independent draws (distinct seeds) from the same logits."""
    rows = logits.expand(draws, -1).clone()
    tensors = SamplingTensors(
        temperatures=torch.full((draws,), params.temperature),
        top_k=torch.full((draws,), params.top_k),
        top_p=torch.full((draws,), params.top_p),
        min_p=torch.full((draws,), params.min_p),
        seeds=torch.arange(draws) * 7919 + 11,
        offsets=torch.zeros(draws, dtype=torch.long),
        banned_rows=torch.empty(0, dtype=torch.long),
        banned_tokens=torch.empty(0, dtype=torch.long),
        all_greedy=params.is_greedy,
        any_top_k_top_p=params.top_k > 0 or params.top_p < 1,
        any_min_p=params.min_p > 0,
        num_logprobs=-1,
    )
    tokens = Sampler()(rows, tensors).token_ids
    return torch.bincount(tokens, minlength=logits.numel()).double()


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Each frequency within 5 standard errors of its probability; impossible tokens never."""
    total = counts.sum()
    freq = counts / total
    for token, (f, p) in enumerate(zip(freq.tolist(), probs.tolist())):
        if p == 0:
            assert f == 0, f"token {token} has probability 0 but was drawn"
        else:
            bound = 5 * math.sqrt(p * (1 - p) / total) + 1e-9
            assert abs(f - p) <= bound, f"token {token}: frequency {f:.4f}, probability {p:.4f}"


def softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.double(), dim=-1)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature: float) -> None:
    counts = draw(SamplingParams(temperature=temperature))
    assert_matches(counts, softmax(TOY_LOGITS / temperature))


def test_greedy_is_the_exact_argmax() -> None:
    counts = draw(SamplingParams(temperature=0), draws=100)
    assert counts[0] == 100


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_keeps_the_k_most_likely(k: int) -> None:
    counts = draw(SamplingParams(temperature=1.0, top_k=k))
    kept = torch.full_like(TOY_LOGITS, float("-inf"))
    kept[:k] = TOY_LOGITS[:k]
    assert_matches(counts, softmax(kept))


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float) -> None:
    counts = draw(SamplingParams(temperature=1.0, top_p=top_p))
    probs = softmax(TOY_LOGITS)
    mass_before = probs.cumsum(0) - probs
    kept = torch.where(mass_before < top_p, TOY_LOGITS, torch.tensor(float("-inf")))
    assert_matches(counts, softmax(kept))


@pytest.mark.parametrize("min_p", [0.1, 0.4])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p: float) -> None:
    counts = draw(SamplingParams(temperature=1.0, min_p=min_p))
    probs = softmax(TOY_LOGITS)
    kept = torch.where(probs >= min_p * probs.max(), TOY_LOGITS, torch.tensor(float("-inf")))
    assert_matches(counts, softmax(kept))


def test_top_k_then_top_p_then_min_p_compose() -> None:
    counts = draw(SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.05))
    scaled = TOY_LOGITS / 0.7
    scaled[5:] = float("-inf")
    probs = softmax(scaled)
    scaled = torch.where(probs.cumsum(0) - probs < 0.8, scaled, torch.tensor(float("-inf")))
    probs = softmax(scaled)
    scaled = torch.where(probs >= 0.05 * probs.max(), scaled, torch.tensor(float("-inf")))
    assert_matches(counts, softmax(scaled))


def test_noise_is_uniform_and_keyed_by_seed_offset_and_token() -> None:
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 50_000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    again = uniform_noise(torch.tensor([2]), torch.tensor([0]), 50_000)
    assert torch.equal(again[0], u[2])


# ---- through the engine ----------------------------------------------------------------------


async def test_a_seed_gives_the_same_tokens_whatever_else_is_batched(
    random_model_dir: Path,
) -> None:
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=32)
    async with AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", num_kv_blocks=256
    ) as engine:
        alone = await engine.generate([3, 1, 4, 1, 5], seeded)
        crowd = await engine.generate_many(
            [[9, 2, 6] * (i + 1) for i in range(8)] + [[3, 1, 4, 1, 5]],
            [SamplingParams(temperature=1.0, max_tokens=20 + i) for i in range(8)] + [seeded],
        )
    assert crowd[-1].token_ids == alone.token_ids


async def test_unseeded_requests_follow_the_engine_seed(random_model_dir: Path) -> None:
    async def run(seed: int) -> list[list[int]]:
        async with AsyncEngine.from_pretrained(
            str(random_model_dir), device="cpu", num_kv_blocks=64, seed=seed
        ) as engine:
            outs = await engine.generate_many([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=16))
        return [o.token_ids for o in outs]

    assert await run(7) == await run(7)
    assert await run(7) != await run(8)


async def test_logprobs_are_the_models_log_softmax(random_model_dir: Path) -> None:
    prompt = [5, 9, 2, 7]
    async with AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", dtype="float32", num_kv_blocks=64
    ) as engine:
        out = await engine.generate(prompt, SamplingParams(temperature=0, max_tokens=2, logprobs=3))
    assert out.logprobs is not None and len(out.logprobs) == 2
    with torch.inference_mode():
        logits = load_reference(random_model_dir)(torch.tensor([prompt])).logits[0, -1]
    want = torch.log_softmax(logits, dim=-1).topk(3)
    first = out.logprobs[0]
    assert [t for t, _ in first.top] == want.indices.tolist()
    torch.testing.assert_close(
        torch.tensor([lp for _, lp in first.top]), want.values, rtol=1e-4, atol=1e-4
    )
    assert first.top[0][0] == out.token_ids[0]
    assert first.logprob == pytest.approx(first.top[0][1])
