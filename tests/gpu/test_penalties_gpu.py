"""Penalties and n choices on the GPU: the fused Triton sampler against the torch reference
path, and the engine (CUDA graphs, overlapped scheduling) against transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from asyncllm import AsyncEngine, SamplingParams
from asyncllm.engine.core import choice_seed
from asyncllm.kernels.triton_sampling import gumbel_argmax
from asyncllm.layers.sampler import PenaltyTensors, Sampler, SamplingTensors, apply_penalties
from tests.models import load_reference, random_prompts, write_random_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROWS, VOCAB = 256, 32_000


SEEDS = torch.arange(ROWS) * 31 + 5
OFFSETS = torch.arange(ROWS) % 17


def random_penalties(logits: torch.Tensor, seed: int = 0) -> PenaltyTensors:
    """Every fourth row without penalties; the others with mixed values, having seen (often
    several times) tokens among their 40 most likely, so the penalties decide the draw."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(ROWS)
    neutral = rows % 4 == 3
    presence = torch.where(neutral, 0.0, torch.rand(ROWS, generator=gen) * 4 - 2)
    frequency = torch.where(neutral, 0.0, torch.rand(ROWS, generator=gen) * 4 - 2)
    repetition = torch.where(neutral, 1.0, torch.rand(ROWS, generator=gen) * 2 + 0.25)
    penalised = rows[~neutral]
    likely = logits.float().cpu().topk(40, dim=-1).indices[penalised]
    output_rows = penalised.repeat_interleave(60)
    output_tokens = likely.gather(1, torch.randint(0, 40, (len(penalised), 60), generator=gen))
    prompt_rows = penalised.repeat_interleave(20)
    prompt_tokens = likely.gather(1, torch.randint(0, 40, (len(penalised), 20), generator=gen))
    empty = torch.empty(0, dtype=torch.long)
    tensors = PenaltyTensors(presence, frequency, repetition, output_rows,
                             output_tokens.flatten(), prompt_rows, prompt_tokens.flatten(),
                             empty, empty)  # fmt: skip
    return PenaltyTensors(*(t.to(logits.device) for t in tensors))


def sampling_tensors(temps: torch.Tensor, penalties: PenaltyTensors | None) -> SamplingTensors:
    device = temps.device
    return SamplingTensors(
        temps, torch.zeros(ROWS, dtype=torch.long, device=device),
        torch.ones(ROWS, device=device), torch.zeros(ROWS, device=device),
        SEEDS.to(device), OFFSETS.to(device), torch.empty(0, dtype=torch.long, device=device),
        torch.empty(0, dtype=torch.long, device=device), False, False, False, -1, penalties,
    )  # fmt: skip


def test_penalties_on_cuda_match_the_cpu_computation() -> None:
    logits = torch.randn(ROWS, VOCAB) * 3
    cpu = apply_penalties(logits, random_penalties(logits))
    cuda = apply_penalties(logits.cuda(), random_penalties(logits.cuda())).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sampling_with_penalties_draws_what_the_torch_path_draws(
    dtype: torch.dtype,
) -> None:
    logits = (torch.randn(ROWS, VOCAB, device="cuda") * 3).to(dtype)
    temps = torch.where(torch.arange(ROWS, device="cuda") % 2 == 0, 0.0, 0.7)
    seeds, offsets = SEEDS.cuda(), OFFSETS.cuda()
    fused = gumbel_argmax(logits, temps, seeds, offsets, random_penalties(logits)).cpu()
    cpu_logits = logits.float().cpu()
    cpu_params = sampling_tensors(temps.cpu(), random_penalties(cpu_logits))
    reference = Sampler()(cpu_logits, cpu_params).token_ids
    greedy = torch.arange(ROWS) % 2 == 0
    assert torch.equal(fused[greedy], reference[greedy])
    assert (fused == reference).float().mean() >= 0.995
    # The penalties really decide the draw: without them many rows pick other tokens.
    plain = gumbel_argmax(logits, temps, seeds, offsets).cpu()
    assert (plain != fused).float().mean() > 0.2


def test_the_cuda_sampler_applies_penalties_to_greedy_rows() -> None:
    logits = torch.randn(ROWS, VOCAB, device="cuda") * 3
    penalties = random_penalties(logits)
    tokens = Sampler()(logits, sampling_tensors(torch.zeros(ROWS, device="cuda"), penalties))
    assert torch.equal(tokens.token_ids, apply_penalties(logits, penalties).argmax(dim=-1))


# ---- the engine --------------------------------------------------------------------------------

GPU_SHAPE = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("gpu-penalty-model")
    write_random_model(directory, seed=3, **GPU_SHAPE)
    return directory


def engine_for(model_dir: Path, **overrides: Any) -> AsyncEngine:
    settings: dict[str, Any] = dict(device="cuda", dtype="float32", num_kv_blocks=512,
                                    max_num_seqs=32)  # fmt: skip
    settings.update(overrides)
    return AsyncEngine.from_pretrained(str(model_dir), **settings)


@pytest.mark.parametrize("enforce_eager", [False, True])
async def test_float32_greedy_repetition_penalty_matches_transformers(
    gpu_model_dir: Path, enforce_eager: bool
) -> None:
    """CUDA graphs and overlapped scheduling: each row's newest token comes from the device."""
    prompts = random_prompts([5, 40, 120, 1, 77, 16], 2048, seed=8)
    params = SamplingParams(temperature=0, max_tokens=48, repetition_penalty=1.5)
    async with engine_for(gpu_model_dir, enforce_eager=enforce_eager) as engine:
        outs = await engine.generate_many(prompts, params)
    reference = load_reference(gpu_model_dir)
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            want = reference.generate(
                torch.tensor([prompt]), max_new_tokens=48, do_sample=False,
                repetition_penalty=1.5, eos_token_id=None, pad_token_id=0,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )[0, len(prompt) :].tolist()  # fmt: skip
        assert out.token_ids == want


async def test_choices_on_the_gpu_are_the_single_requests_of_their_seeds(
    gpu_model_dir: Path,
) -> None:
    prompt = random_prompts([70], 2048, seed=9)[0]
    params = SamplingParams(n=4, seed=21, temperature=0.8, max_tokens=32, frequency_penalty=0.5)
    async with engine_for(gpu_model_dir) as engine:
        out = await engine.generate(prompt, params)
        hits = engine.stats().prefix_cache_hit_tokens
        engine.reset_prefix_cache()
        singles = [
            await engine.generate(prompt, SamplingParams(
                seed=choice_seed(21, i), temperature=0.8, max_tokens=32, frequency_penalty=0.5,
            ))
            for i in range(4)
        ]  # fmt: skip
    assert hits >= 3 * 64
    assert [c.token_ids for c in out.choices] == [s.token_ids for s in singles]
