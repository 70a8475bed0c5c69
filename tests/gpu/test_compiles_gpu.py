"""No Triton kernel compiles once an engine has started: every variant a step can launch is
compiled by the start-up warm-up and graph capture, never under a request (a compile holds
the GIL and stalls the engine for 50 ms or more)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm import AsyncEngine, SamplingParams
from tests.models import random_prompts, write_random_model

triton = pytest.importorskip("triton")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# A vocabulary of 64 sampler blocks, so the sampler's slices per row vary with the batch.
SHAPE = dict(
    vocab_size=131_072, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("gpu-model-compiles")
    write_random_model(directory, seed=5, **SHAPE)
    return directory


@contextmanager
def triton_compiles() -> Iterator[list[str]]:
    """The kernels Triton compiles (or loads from its disk cache) meanwhile."""
    knobs = triton.knobs.runtime
    seen: list[str] = []
    previous = knobs.jit_cache_hook

    def hook(**kwargs: Any) -> bool:
        seen.append(str(kwargs.get("repr", kwargs.get("key")))[:400])
        return False  # compile as usual

    knobs.jit_cache_hook = hook
    try:
        yield seen
    finally:
        knobs.jit_cache_hook = previous


def mixed_params(rng: random.Random, count: int) -> list[SamplingParams]:
    """Greedy, sampled and penalised requests of assorted lengths."""
    kinds: list[dict[str, Any]] = [
        dict(temperature=0),
        dict(temperature=0.8),
        dict(temperature=0, repetition_penalty=1.2),
        dict(temperature=0.7, frequency_penalty=0.5, presence_penalty=0.3),
    ]
    return [
        SamplingParams(max_tokens=rng.randint(1, 40), ignore_eos=True, **rng.choice(kinds))
        for _ in range(count)
    ]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
async def test_no_kernel_compiles_after_start_up(model_dir: Path, kv_cache_dtype: str) -> None:
    settings = dict(device="cuda", dtype="bfloat16", block_size=256, max_num_seqs=128,
                    max_num_batched_tokens=1024, kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    rng = random.Random(0)
    async with AsyncEngine.from_pretrained(str(model_dir), **settings) as engine:
        with triton_compiles() as compiles:
            for round_ in range(3):  # batches of every size, decode-only and mixed steps
                count = (7, 60, 128)[round_]
                lengths = [rng.randint(1, 700) for _ in range(count)]
                prompts = random_prompts(lengths, SHAPE["vocab_size"], seed=round_)
                outs = await engine.generate_many(prompts, mixed_params(rng, count))
                assert len(outs) == count
    assert compiles == [], "kernels compiled under requests:\n" + "\n".join(compiles)
