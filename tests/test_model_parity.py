"""The model on the paged cache matches transformers' Qwen3 exactly in float32 on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncllm.config import EngineConfig
from asyncllm.context import forward_context
from asyncllm.engine.runner import ModelRunner, SampleSpec, SeqStep, StepBatch
from asyncllm.model.config import ModelConfig
from asyncllm.sampling import SamplingParams
from tests.models import (
    RANDOM_CONFIGS,
    load_reference,
    paged_greedy,
    random_prompts,
    reference_greedy,
)

GREEDY = SamplingParams(temperature=0)


def make_runner(model_dir: Path, block_size: int, num_blocks: int = 256) -> ModelRunner:
    config = EngineConfig(
        device="cpu", dtype="float32", block_size=block_size, num_kv_blocks=num_blocks
    )
    return ModelRunner(model_dir, ModelConfig.from_dir(model_dir), config)


def paged_logits(runner: ModelRunner, steps: list[SeqStep]) -> torch.Tensor:
    prepared = runner.prepare(StepBatch.from_steps(steps))
    with torch.inference_mode(), forward_context(prepared.ctx):
        return runner.model.compute_logits(runner.model(prepared.input_ids))


@pytest.fixture(params=["tiny", *sorted(RANDOM_CONFIGS)])
def model_dir(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> Path:
    """The shipped tiny model and each random shape."""
    return model_dirs[request.param]


@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_logits_match_transformers(random_config_dir: Path, block_size: int) -> None:
    runner = make_runner(random_config_dir, block_size)
    reference = load_reference(random_config_dir)
    prompts = random_prompts([1, 7, 33, 64], reference.config.vocab_size, seed=block_size)
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(prompts))]
    steps = [SeqStep(p, 0, t, SampleSpec(GREEDY, 0, 0)) for p, t in zip(prompts, tables)]
    ours = paged_logits(runner, steps)
    with torch.inference_mode():
        theirs = torch.stack([reference(torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_prefill_after_a_cached_prefix_matches_transformers(random_config_dir: Path) -> None:
    runner = make_runner(random_config_dir, block_size=16)
    reference = load_reference(random_config_dir)
    [prompt] = random_prompts([80], reference.config.vocab_size, seed=3)
    table = list(range(6))
    paged_logits(runner, [SeqStep(prompt[:48], 0, table, None)])  # fills 3 blocks
    # A second sequence reuses those blocks and computes only the rest, in two chunks.
    paged_logits(runner, [SeqStep(prompt[48:60], 48, table, None)])
    ours = paged_logits(runner, [SeqStep(prompt[60:], 60, table, SampleSpec(GREEDY, 0, 0))])
    with torch.inference_mode():
        theirs = reference(torch.tensor([prompt])).logits[0, -1:]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_size", [16, 64])
def test_greedy_batch_is_token_identical_to_transformers(model_dir: Path, block_size: int) -> None:
    runner = make_runner(model_dir, block_size)
    reference = load_reference(model_dir)
    prompts = random_prompts([5, 21, 48, 3], min(reference.config.vocab_size, 1000), seed=7)
    ours = paged_greedy(runner, prompts, max_new_tokens=64)
    for prompt, got in zip(prompts, ours):
        want = reference_greedy(reference, prompt, 64, stop_at_eos=False)
        assert got == want


def test_chunked_prefill_mixed_with_decodes_is_token_identical(random_config_dir: Path) -> None:
    runner = make_runner(random_config_dir, block_size=16)
    reference = load_reference(random_config_dir)
    prompts = random_prompts([2, 40, 75], reference.config.vocab_size, seed=11)
    ours = paged_greedy(runner, prompts, max_new_tokens=64, chunk=9)
    assert ours == [reference_greedy(reference, p, 64, stop_at_eos=False) for p in prompts]
