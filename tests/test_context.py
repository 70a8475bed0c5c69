"""The forward context is per task/thread, nests, restores on errors, and is never stale."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from asyncllm.config import EngineConfig
from asyncllm.context import ForwardContext, current_forward_context, forward_context
from asyncllm.engine.runner import ModelRunner, SampleSpec, SeqStep
from asyncllm.errors import NoForwardContextError
from asyncllm.kernels.torch_ref import TorchAttention
from asyncllm.layers.embedding import ParallelLMHead as LMHead
from asyncllm.layers.rotary import RotaryEmbedding
from asyncllm.model.config import ModelConfig
from asyncllm.sampling import SamplingParams
from tests.models import load_reference, reference_greedy, write_random_model


def make_context(tag: int) -> ForwardContext:
    """A context whose positions identify it: [tag, tag + 1]."""
    return ForwardContext(
        positions=torch.tensor([tag, tag + 1]),
        slot_mapping=torch.tensor([0, 1]),
        cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32),
        seq_lens_k=torch.tensor([2], dtype=torch.int32),
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        logits_indices=torch.tensor([tag % 2]),
        max_seqlen_q=2,
        max_seqlen_k=2,
        num_decode_seqs=0,
        attn_backend=TorchAttention(),
    )


def seen_tag() -> int:
    return int(current_forward_context().positions[0])


def test_reading_outside_a_forward_pass_raises() -> None:
    with pytest.raises(NoForwardContextError, match="forward_context"):
        current_forward_context()


def test_layers_outside_a_forward_pass_raise() -> None:
    rotary = RotaryEmbedding(head_dim=8, max_position=16, base=10000.0)
    with pytest.raises(NoForwardContextError):
        rotary(torch.zeros(2, 1, 8), torch.zeros(2, 1, 8))


def test_nothing_is_bound_after_the_block() -> None:
    with forward_context(make_context(3)):
        assert seen_tag() == 3
    with pytest.raises(NoForwardContextError):
        current_forward_context()


def test_nesting_restores_the_outer_context() -> None:
    with forward_context(make_context(1)):
        with forward_context(make_context(2)):
            assert seen_tag() == 2
        assert seen_tag() == 1


def test_an_exception_inside_restores_the_outer_context() -> None:
    with forward_context(make_context(1)):
        with pytest.raises(ZeroDivisionError), forward_context(make_context(2)):
            _ = 1 / 0
        assert seen_tag() == 1


def test_layers_see_only_their_own_context() -> None:
    head = LMHead(hidden_size=2, vocab_size=3)
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for tag in (4, 5):
        with forward_context(make_context(tag)):
            assert torch.equal(head(hidden), hidden[[tag % 2]] @ head.weight.T)


async def test_concurrent_tasks_each_see_their_own_context() -> None:
    async def worker(tag: int) -> list[int]:
        seen = []
        with forward_context(make_context(tag)):
            for _ in range(20):
                await asyncio.sleep(0)  # interleave with every other task
                seen.append(seen_tag())
        return seen

    results = await asyncio.gather(*(worker(tag) for tag in range(50)))
    for tag, seen in enumerate(results):
        assert seen == [tag] * 20


def test_concurrent_threads_each_see_their_own_context() -> None:
    barrier = threading.Barrier(8)
    errors: list[str] = []

    def worker(tag: int) -> None:
        with forward_context(make_context(tag)):
            barrier.wait()  # every thread is inside its block at once
            for _ in range(200):
                if seen_tag() != tag:
                    errors.append(f"thread {tag} saw {seen_tag()}")
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(tag,)) for tag in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_two_models_run_concurrent_forward_passes_without_crosstalk(tmp_path: Path) -> None:
    """Two runners with different models decode in two threads, starting every step together
    so their forward passes overlap; each matches transformers exactly, so neither saw the
    other's context or cache."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    write_random_model(dirs[0], seed=10)
    write_random_model(
        dirs[1], seed=11, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    )
    config = EngineConfig(device="cpu", num_kv_blocks=16, block_size=16)
    runners = [ModelRunner(d, ModelConfig.from_dir(d), config) for d in dirs]
    prompt = list(range(3, 40))
    expected = [reference_greedy(load_reference(d), prompt, 24) for d in dirs]
    greedy = SamplingParams(temperature=0)
    tokens: list[list[int]] = [list(prompt), list(prompt)]
    together = threading.Barrier(2)

    def decode(which: int) -> None:
        for step in range(24):
            together.wait()
            seq = tokens[which]
            start = 0 if step == 0 else len(seq) - 1
            result = runners[which].execute(
                [SeqStep(seq[start:], start, [0, 1, 2, 3], SampleSpec(greedy, 0, step))]
            )
            seq.append(result.token_ids[0])

    threads = [threading.Thread(target=decode, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [seq[len(prompt) :] for seq in tokens] == expected
