"""Sampling draws from the right distributions, reproducibly per seed, in any batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from asyncllm import AsyncEngine, SamplingParams
from asyncllm.engine.inputs import SampleSpec, StepBatch, prepare_step
from asyncllm.kernels.torch_ref import TorchAttention
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


# ---- extreme values ----------------------------------------------------------------------------


def batch_tensors(
    logits: torch.Tensor, temperatures: list[float], top_p: float = 1.0
) -> SamplingTensors:
    """Rows of `logits`, one per temperature, seeded apart, never flagged all-greedy (so the
    sampler itself must tell greedy rows from sampled ones)."""
    rows = len(temperatures)
    return SamplingTensors(
        temperatures=torch.tensor(temperatures, dtype=torch.float32),
        top_k=torch.zeros(rows, dtype=torch.long),
        top_p=torch.full((rows,), top_p),
        min_p=torch.zeros(rows),
        seeds=torch.arange(rows) * 7919 + 11,
        offsets=torch.zeros(rows, dtype=torch.long),
        banned_rows=torch.empty(0, dtype=torch.long),
        banned_tokens=torch.empty(0, dtype=torch.long),
        all_greedy=False,
        any_top_k_top_p=top_p < 1,
        any_min_p=False,
        num_logprobs=-1,
    )


def test_a_tiny_top_p_keeps_the_most_likely_token() -> None:
    logits = TOY_LOGITS.flip(0)  # the most likely token last, where no fallback would land
    counts = draw(SamplingParams(temperature=1.0, top_p=1e-50), logits, draws=2_000)
    assert counts[-1] == 2_000  # 1e-50 is 0.0 in float32: masking "mass >= 0" would drop all


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 1e-6])
def test_a_tiny_temperature_is_the_argmax(temperature: float) -> None:
    # Divided by 1e-38 both 4.0 and 5.0 overflow float32 to +inf: only argmax is right.
    logits = torch.tensor([4.0, 5.0, -2.0, 3.9]).expand(400, -1).clone()
    tensors = batch_tensors(logits, [temperature] * 399 + [1.0])
    assert (Sampler()(logits, tensors).token_ids[:399] == 1).all()


def test_a_huge_temperature_is_uniform_and_never_draws_a_banned_token() -> None:
    rows = 20_000
    logits = TOY_LOGITS.expand(rows, -1).clone()
    batch = StepBatch()
    for row in range(rows):
        spec = SampleSpec(SamplingParams(temperature=1e300), row * 7919 + 11, 0, (0,))
        batch.add([1], 0, [0], None, spec)
    tensors = prepare_step(batch, 16, torch.device("cpu"), TorchAttention()).sampling
    tokens = Sampler()(logits, tensors).token_ids
    counts = torch.bincount(tokens, minlength=TOY_LOGITS.numel()).double()
    uniform = torch.tensor([0.0] + [1 / 6] * 6, dtype=torch.double)
    assert_matches(counts, uniform)  # 1e300 is inf in float32; inf would give NaN scores


def test_seeds_of_2_63_and_above_reach_the_sampler_as_their_64_bits() -> None:
    batch = StepBatch()
    for seed in (2**63, 2**64 - 1, 5):
        batch.add([1], 0, [0], None, SampleSpec(SamplingParams(), seed, 0))
    tensors = prepare_step(batch, 16, torch.device("cpu"), TorchAttention()).sampling
    assert tensors.seeds.tolist() == [-(2**63), -1, 5]  # two's complement of the same bits


def test_every_64_bit_seed_keys_its_own_noise() -> None:
    seeds = [0, 1, 2**32, 2**32 + 1, 2**33, 2**63 - 1, 2**63, 2**64 - 1]
    as_int64 = torch.tensor([s if s < 2**63 else s - 2**64 for s in seeds])
    noise = uniform_noise(as_int64, torch.zeros(len(seeds), dtype=torch.long), 4096)
    for i in range(len(seeds)):
        for j in range(i):
            # Seed 0 and seed 2**32 + 1 used to fold onto the same 32-bit key.
            assert not torch.equal(noise[i], noise[j]), (seeds[i], seeds[j])
    assert noise.min() > 0 and noise.max() < 1


async def test_the_largest_seed_and_top_k_are_served_and_seeds_differ_past_32_bits(
    random_model_dir: Path,
) -> None:
    prompt = [3, 1, 4, 1, 5]

    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, seed=seed, top_k=2**31 - 1, max_tokens=24)

    async with AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", num_kv_blocks=64
    ) as engine:
        largest = await engine.generate(prompt, seeded(2**64 - 1))
        low, high = [await engine.generate(prompt, seeded(s)) for s in (0, 2**32 + 1)]
        again = await engine.generate(prompt, seeded(2**64 - 1))
    assert len(largest.token_ids) == 24 and again.token_ids == largest.token_ids
    assert low.token_ids != high.token_ids


async def test_tiny_temperature_and_top_p_give_the_greedy_tokens(random_model_dir: Path) -> None:
    prompt = [5, 9, 2, 7]
    async with AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", dtype="float32", num_kv_blocks=64
    ) as engine:
        greedy = await engine.generate(prompt, SamplingParams(temperature=0, max_tokens=16))
        tiny_t, tiny_p = await engine.generate_many(
            [prompt, prompt],
            [
                SamplingParams(temperature=1e-38, max_tokens=16, seed=1),
                SamplingParams(temperature=1.0, top_p=1e-50, max_tokens=16, seed=1),
            ],
        )
    assert tiny_t.token_ids == greedy.token_ids
    assert tiny_p.token_ids == greedy.token_ids


def test_asking_for_more_logprobs_than_the_vocabulary_has_gives_all_of_it() -> None:
    logits = TOY_LOGITS.expand(3, -1).clone()  # 7 tokens; 20 alternatives asked for
    tensors = batch_tensors(logits, [0.0, 0.5, 1.0])._replace(num_logprobs=20)
    out = Sampler()(logits, tensors)
    assert out.top_ids is not None and out.top_ids.shape == (3, 7)


# ---- logprobs under min_tokens -----------------------------------------------------------------


async def test_logprobs_under_min_tokens_are_the_models_own(random_model_dir: Path) -> None:
    prompt = [5, 9, 2, 7]
    async with AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", dtype="float32", num_kv_blocks=64
    ) as engine:
        free = await engine.generate(
            prompt, SamplingParams(temperature=0, max_tokens=8, logprobs=5)
        )
        stop = free.token_ids[3]
        end = free.token_ids.index(stop)  # the first step that draws the stop token
        held = await engine.generate(
            prompt,
            SamplingParams(
                temperature=0, max_tokens=8, min_tokens=8, stop_token_ids=[stop], logprobs=5
            ),
        )
    assert free.logprobs is not None and held.logprobs is not None
    assert held.token_ids[:end] == free.token_ids[:end]
    for step in range(end + 1):  # banning a token must not renormalise what is reported
        held_ids, held_values = zip(*held.logprobs[step].top)
        free_ids, free_values = zip(*free.logprobs[step].top)
        assert held_ids == free_ids
        assert held_values == pytest.approx(free_values, abs=1e-5)
    assert held.token_ids[end] != stop  # banned, so another token was drawn...
    chosen = dict(free.logprobs[end].top)[held.token_ids[end]]
    assert held.logprobs[end].logprob == pytest.approx(chosen, abs=1e-5)  # ...at its own logprob
