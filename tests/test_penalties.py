"""Presence, frequency and repetition penalties: against a per-row Python reference, against
transformers' repetition penalty, and end to end through the engine."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import Qwen3ForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from asyncllm import AsyncEngine, SamplingParams
from asyncllm.engine.inputs import SampleSpec, SeqStep, StepBatch, prepare_step
from asyncllm.kernels import create_attention_backend
from asyncllm.layers.sampler import Sampler, SamplingTensors, apply_penalties
from tests.models import random_prompts

VOCAB = 50


def reference_penalties(
    logits: list[float],
    prompt: list[int],
    output: list[int],
    presence: float,
    frequency: float,
    repetition: float,
) -> list[float]:
    """The penalties of one row, spelled out token by token (float32 like the engine)."""
    counts = Counter(output)
    result = []
    for token, value in enumerate(logits):
        x = torch.tensor(value, dtype=torch.float32)
        if token in counts or token in prompt:
            x = x * repetition if x < 0 else x / repetition
        x = x - frequency * counts[token]
        if counts[token]:
            x = x - presence
        result.append(float(x))
    return result


class Row:
    """One sampled row of a test step: its params and the tokens it has seen."""

    def __init__(self, params: SamplingParams, prompt: list[int], output: list[int]) -> None:
        self.params, self.prompt, self.output = params, prompt, output


def prepared_sampling(rows: list[Row]) -> SamplingTensors:
    """The SamplingTensors the engine's input path builds for `rows` (one decode each)."""
    batch = StepBatch()
    for index, row in enumerate(rows):
        spec = SampleSpec(row.params, seed=index, offset=len(row.output))
        if row.params.has_penalties:
            spec = spec._replace(output_token_ids=row.output, prompt_token_ids=row.prompt)
        step = SeqStep([1], 0, [index], spec)
        batch.add(step.token_ids, step.start, step.block_table, step.pending_row, step.sample)
    backend = create_attention_backend("torch", torch.device("cpu"), 16, 16, torch.float32)
    return prepare_step(batch, 16, torch.device("cpu"), backend).sampling


def random_rows(rng: random.Random, params: list[SamplingParams]) -> list[Row]:
    rows = []
    for p in params:
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))]
        output = [rng.randrange(VOCAB // 2) for _ in range(rng.randint(0, 40))]  # repeats
        rows.append(Row(p, prompt, output))
    return rows


MIXED = [
    SamplingParams(presence_penalty=0.7),
    SamplingParams(),  # no penalty at all
    SamplingParams(frequency_penalty=0.3),
    SamplingParams(repetition_penalty=1.8),
    SamplingParams(temperature=0),  # greedy, no penalty
    SamplingParams(presence_penalty=-1.5, frequency_penalty=2.0, repetition_penalty=0.6),
    SamplingParams(temperature=0, frequency_penalty=-0.4, repetition_penalty=1.2),
    SamplingParams(top_p=0.5),
]


def test_penalties_match_the_per_row_reference_in_a_mixed_batch() -> None:
    rng = random.Random(0)
    rows = random_rows(rng, MIXED)
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(0)) * 4
    sampling = prepared_sampling(rows)
    assert sampling.penalties is not None
    got = apply_penalties(logits, sampling.penalties)
    for index, row in enumerate(rows):
        p = row.params
        want = reference_penalties(
            logits[index].tolist(), row.prompt, row.output,
            p.presence_penalty, p.frequency_penalty, p.repetition_penalty,
        )  # fmt: skip
        assert got[index].tolist() == pytest.approx(want, rel=1e-6, abs=1e-6), f"row {index}"


def test_rows_without_penalties_are_left_bit_identical() -> None:
    rows = random_rows(random.Random(1), MIXED)
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(1))
    sampling = prepared_sampling(rows)
    assert sampling.penalties is not None
    got = apply_penalties(logits, sampling.penalties)
    for index, row in enumerate(rows):
        if not row.params.has_penalties:
            assert torch.equal(got[index], logits[index]), f"row {index}"


def test_a_step_without_penalties_carries_none() -> None:
    rows = random_rows(random.Random(2), [SamplingParams(), SamplingParams(temperature=0)])
    assert prepared_sampling(rows).penalties is None


def test_greedy_rows_take_the_argmax_of_the_penalised_logits() -> None:
    rows = random_rows(random.Random(3), [SamplingParams(temperature=0, **kw) for kw in (
        {"repetition_penalty": 3.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 1.0}, {},
    )])  # fmt: skip
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    tokens = Sampler()(logits, prepared_sampling(rows)).token_ids
    for index, row in enumerate(rows):
        p = row.params
        want = reference_penalties(
            logits[index].tolist(), row.prompt, row.output,
            p.presence_penalty, p.frequency_penalty, p.repetition_penalty,
        )  # fmt: skip
        assert tokens[index].item() == max(range(VOCAB), key=want.__getitem__)


def test_penalties_apply_before_temperature() -> None:
    """A sampled row draws from softmax(penalised logits / temperature)."""
    draws, temperature = 20_000, 0.8
    row = Row(SamplingParams(temperature=temperature, presence_penalty=1.0,
                             frequency_penalty=0.5), [0], [0, 0, 1])  # fmt: skip
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5])
    sampling = prepared_sampling([row] * draws)
    sampling = sampling._replace(seeds=torch.arange(draws) * 7919 + 11)
    tokens = Sampler()(logits.expand(draws, -1).clone(), sampling).token_ids
    freq = torch.bincount(tokens, minlength=5).double() / draws
    penalised = torch.tensor(reference_penalties(logits.tolist(), [0], [0, 0, 1], 1.0, 0.5, 1.0))
    probs = torch.softmax(penalised.double() / temperature, dim=-1)
    assert torch.allclose(freq, probs, atol=5 * (0.25 / draws) ** 0.5)


def test_logprobs_stay_the_models_own_distribution() -> None:
    rows = random_rows(random.Random(4), [
        SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=1.0, logprobs=3),
    ])  # fmt: skip
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(4))
    sampling = prepared_sampling(rows)._replace(num_logprobs=3)
    out = Sampler()(logits, sampling)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.top_logprobs is not None and out.logprobs is not None
    torch.testing.assert_close(out.top_logprobs[0], raw[0].topk(3).values)
    torch.testing.assert_close(out.logprobs[0], raw[0, out.token_ids[0]])


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.5])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    rng = random.Random(5)
    rows = random_rows(rng, [SamplingParams(repetition_penalty=penalty)] * 6)
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    ours = apply_penalties(logits, prepared_sampling(rows).penalties)  # type: ignore[arg-type]
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    for index, row in enumerate(rows):
        seen = torch.tensor([row.prompt + row.output])
        theirs = processor(seen, logits[index : index + 1].clone())
        assert torch.equal(ours[index], theirs[0]), f"row {index}"


# ---- through the engine ----------------------------------------------------------------------


def engine_for(model_dir: Path, **overrides: object) -> AsyncEngine:
    settings: dict[str, object] = dict(device="cpu", dtype="float32", num_kv_blocks=256)
    settings.update(overrides)
    return AsyncEngine.from_pretrained(str(model_dir), **settings)


@torch.inference_mode()
def reference_penalised_greedy(
    model: Qwen3ForCausalLM, prompt: list[int], max_tokens: int, params: SamplingParams
) -> list[int]:
    """Greedy decoding with penalties, one full forward pass of transformers per token."""
    output: list[int] = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([prompt + output])).logits[0, -1]
        penalised = reference_penalties(
            logits.tolist(), prompt, output,
            params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
        )  # fmt: skip
        output.append(max(range(len(penalised)), key=penalised.__getitem__))
    return output


@pytest.mark.parametrize("overlap", [False, True])
async def test_greedy_repetition_penalty_matches_transformers_generate(
    random_model_dir: Path, random_reference: Qwen3ForCausalLM, overlap: bool
) -> None:
    """Overlapped scheduling feeds each row's newest token from the device: it must count."""
    prompts = random_prompts([7, 23, 2], 384, seed=11)
    params = SamplingParams(temperature=0, max_tokens=40, repetition_penalty=1.6)
    async with engine_for(random_model_dir, overlap_scheduling=overlap) as engine:
        outs = await engine.generate_many(prompts, params)
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            want = random_reference.generate(
                torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                repetition_penalty=1.6, eos_token_id=None, pad_token_id=0,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )[0, len(prompt) :].tolist()  # fmt: skip
        assert out.token_ids == want


@pytest.mark.parametrize("overlap", [False, True])
async def test_greedy_presence_and_frequency_penalties_match_the_reference(
    random_model_dir: Path, random_reference: Qwen3ForCausalLM, overlap: bool
) -> None:
    prompts = random_prompts([5, 18], 384, seed=12)
    params = [
        SamplingParams(temperature=0, max_tokens=24, frequency_penalty=1.5),
        SamplingParams(temperature=0, max_tokens=24, presence_penalty=2.0, repetition_penalty=1.2),
    ]
    async with engine_for(random_model_dir, overlap_scheduling=overlap) as engine:
        crowd = [SamplingParams(temperature=0, max_tokens=30)] * 2  # unpenalised neighbours
        outs = await engine.generate_many(prompts * 2, params + crowd)
    for prompt, p, out in zip(prompts, params, outs):
        assert out.token_ids == reference_penalised_greedy(random_reference, prompt, 24, p)


async def test_a_frequency_penalty_stops_greedy_repetition(random_model_dir: Path) -> None:
    """The random model repeats itself under greedy decoding; a strong penalty stops it."""
    prompt = [3, 1, 4, 1, 5]
    async with engine_for(random_model_dir) as engine:
        plain = await engine.generate(prompt, SamplingParams(temperature=0, max_tokens=40))
        penalised = await engine.generate(
            prompt, SamplingParams(temperature=0, max_tokens=40, frequency_penalty=2.0)
        )
    assert max(Counter(plain.token_ids).values()) >= 5
    assert max(Counter(penalised.token_ids).values()) <= 2
