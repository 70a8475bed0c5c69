"""Extreme but valid sampling values on the GPU paths: the fused Triton sampler (greedy and
temperature rows), the torch path on CUDA (top-p rows), and 64-bit seeds through both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from asyncllm import AsyncEngine, SamplingParams
from asyncllm.kernels.triton_sampling import gumbel_argmax
from asyncllm.layers.sampler import Sampler, SamplingTensors
from tests.models import write_random_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# One row per kind: exact greedy, temperatures that overflow float32 (1e-38) or come close,
# ordinary ones, and the largest a request can reach the kernel with (clamped from 1e300).
TEMPERATURES = [0.0, 1e-38, 1e-30, 1e-6, 0.7, 1.0, 3.0e38]
# int64 bit patterns of seeds 0, 2**32 + 1, 2**63 and 2**64 - 1, and two ordinary ones.
SEEDS = [0, 2**32 + 1, -(2**63), -1, 12345, 2**40 + 7]


def tensors(temps: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> SamplingTensors:
    rows = temps.numel()
    return SamplingTensors(
        temps, torch.zeros(rows, dtype=torch.long), torch.ones(rows), torch.zeros(rows),
        seeds, offsets, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
        False, False, False, -1,
    )  # fmt: skip


def test_fused_sampler_matches_the_torch_path_at_extreme_values() -> None:
    rows, vocab = 42 * 12, 32_000
    logits = torch.randn(rows, vocab, device="cuda") * 4
    logits[:, 7] = 40.0  # divided by 1e-38, this and many others overflow to +inf
    temps = torch.tensor(TEMPERATURES * (rows // len(TEMPERATURES)), device="cuda")
    seeds = torch.tensor(SEEDS * (rows // len(SEEDS)), device="cuda")
    offsets = torch.arange(rows, device="cuda") % 5
    fused = gumbel_argmax(logits, temps, seeds, offsets).cpu()
    reference = Sampler()(logits.cpu(), tensors(temps.cpu(), seeds.cpu(), offsets.cpu()))
    assert (fused == reference.token_ids).float().mean() >= 0.999
    greedy = (temps < 1e-5).cpu()
    assert torch.equal(fused[greedy], torch.full((int(greedy.sum()),), 7))
    assert ((fused >= 0) & (fused < vocab)).all()


def test_fused_sampler_gives_seeds_that_share_low_bits_their_own_draws() -> None:
    rows, vocab = 256, 32_000
    logits = torch.zeros(rows, vocab, device="cuda")  # uniform: the draw is the noise alone
    temps = torch.ones(rows, device="cuda")
    offsets = torch.arange(rows, device="cuda")
    draws = [
        gumbel_argmax(logits, temps, torch.full((rows,), seed, device="cuda"), offsets)
        for seed in (0, 2**32 + 1, -(2**63))
    ]
    assert (draws[0] != draws[1]).float().mean() > 0.99
    assert (draws[0] != draws[2]).float().mean() > 0.99


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("extremes-model")
    write_random_model(directory, seed=3, vocab_size=2048, hidden_size=256, head_dim=64,
                       num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    return directory


async def test_extreme_values_through_the_engine_on_cuda(model_dir: Path) -> None:
    prompt = [5, 9, 2, 7, 11]
    async with AsyncEngine.from_pretrained(
        str(model_dir), device="cuda", dtype="float32", num_kv_blocks=256
    ) as engine:
        greedy = await engine.generate(prompt, SamplingParams(temperature=0, max_tokens=24))
        tiny_t, tiny_p, largest, huge = await engine.generate_many(
            [prompt] * 4,
            [
                SamplingParams(temperature=1e-38, max_tokens=24, seed=1),  # fused path
                SamplingParams(temperature=1.0, top_p=1e-50, max_tokens=24, seed=1),  # torch
                SamplingParams(seed=2**64 - 1, top_k=2**31 - 1, max_tokens=24),
                SamplingParams(temperature=1e300, max_tokens=24, seed=3),
            ],
        )
        stop = greedy.token_ids[2]
        free = await engine.generate(prompt, SamplingParams(temperature=0, max_tokens=6,
                                                            logprobs=3))  # fmt: skip
        held = await engine.generate(prompt, SamplingParams(
            temperature=0, max_tokens=6, min_tokens=6, stop_token_ids=[stop], logprobs=3
        ))  # fmt: skip
    assert tiny_t.token_ids == greedy.token_ids
    assert tiny_p.token_ids == greedy.token_ids
    assert len(largest.token_ids) == 24 and len(huge.token_ids) == 24
    assert free.logprobs is not None and held.logprobs is not None
    end = free.token_ids.index(stop)
    for step in range(end + 1):  # the banned stop token does not renormalise the logprobs
        assert [t for t, _ in held.logprobs[step].top] == [t for t, _ in free.logprobs[step].top]
        assert [v for _, v in held.logprobs[step].top] == pytest.approx(
            [v for _, v in free.logprobs[step].top], abs=1e-4
        )
