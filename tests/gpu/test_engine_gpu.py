"""The engine on a GPU: CUDA graphs, its own stream, float32 parity, no leaks under load."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from asyncllm import AsyncEngine, SamplingParams
from tests.models import (
    TINY_MODEL_DIR,
    all_blocks_unused,
    load_reference,
    reference_greedy,
    write_random_model,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_SHAPE = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("gpu-model")
    write_random_model(directory, seed=3, **GPU_SHAPE)
    return directory


def engine_for(model_dir: Path, **overrides: Any) -> AsyncEngine:
    settings: dict[str, Any] = dict(device="cuda", num_kv_blocks=2048, max_num_seqs=64)
    settings.update(overrides)
    return AsyncEngine.from_pretrained(str(model_dir), **settings)


def prompts_of(count: int, vocab: int, seed: int, max_len: int = 300) -> list[list[int]]:
    """`count` prompts of random lengths (the generator the H100 runs verified)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


async def greedy_outputs(model_dir: Path, prompts: list[list[int]], **overrides: Any
                         ) -> list[list[int]]:  # fmt: skip
    async with engine_for(model_dir, **overrides) as engine:
        outs = await engine.generate_many(prompts, SamplingParams(temperature=0, max_tokens=40))
        runner = engine._core.runner
        assert runner is not None
        assert (runner.graphs is not None) == (not overrides.get("enforce_eager", False))
    return [o.token_ids for o in outs]


async def test_cuda_graphs_give_the_same_tokens_as_eager(gpu_model_dir: Path) -> None:
    prompts = prompts_of(48, 2048, seed=1)
    graphed = await greedy_outputs(gpu_model_dir, prompts, dtype="bfloat16")
    eager = await greedy_outputs(gpu_model_dir, prompts, dtype="bfloat16", enforce_eager=True)
    assert graphed == eager


async def test_the_engine_runs_on_its_own_stream(gpu_model_dir: Path) -> None:
    async with engine_for(gpu_model_dir) as engine:
        runner = engine._core.runner
        assert runner is not None and runner.stream is not None
        assert runner.stream != torch.cuda.default_stream()
        assert engine.stats().attention_backend == "triton"
        await engine.generate([1, 2, 3], SamplingParams(max_tokens=4))


@pytest.mark.parametrize("overlap", [True, False])
async def test_float32_greedy_matches_transformers(gpu_model_dir: Path, overlap: bool) -> None:
    """Crowded, chunked, prefix-sharing and preempted: all token-identical to transformers."""
    shared = prompts_of(1, 2048, seed=5, max_len=80)[0]
    prompts = [shared + p for p in prompts_of(24, 2048, seed=6, max_len=120)]
    ours = await greedy_outputs(
        gpu_model_dir, prompts, dtype="float32", num_kv_blocks=48, block_size=16,
        max_num_batched_tokens=256, max_model_len=256, overlap_scheduling=overlap,
    )  # fmt: skip
    reference = load_reference(gpu_model_dir).cuda()
    want = [reference_greedy(reference, p, 40, stop_at_eos=False) for p in prompts]
    assert ours == want


async def test_a_float8_cache_gives_triton_and_the_torch_reference_the_same_tokens(
    gpu_model_dir: Path,
) -> None:
    """float32 compute over a float8 KV cache: the Triton kernels (in CUDA graphs, K/V
    stored by the fused q/k kernel) and the torch reference read the same float8 values, so
    crowded, chunked, prefix-sharing and preempted runs give identical greedy tokens."""
    shared = prompts_of(1, 2048, seed=5, max_len=80)[0]
    prompts = [shared + p for p in prompts_of(24, 2048, seed=6, max_len=120)]
    outputs = {}
    for backend in ("triton", "torch"):
        engine = engine_for(
            gpu_model_dir, dtype="float32", kv_cache_dtype="fp8", attention_backend=backend,
            num_kv_blocks=48, block_size=16, max_num_batched_tokens=256, max_model_len=256,
        )  # fmt: skip
        async with engine:
            outs = await engine.generate_many(prompts, SamplingParams(temperature=0, max_tokens=40))
            runner, stats = engine._core.runner, engine.stats()
            assert runner is not None and runner.kv_cache.dtype == torch.float8_e4m3fn
            assert (runner.graphs is not None) == (backend == "triton")
        assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens > 0
        outputs[backend] = [o.token_ids for o in outs]
    assert outputs["triton"] == outputs["torch"]


async def test_a_float8_cache_holds_twice_the_bfloat16_tokens(gpu_model_dir: Path) -> None:
    blocks = {}
    for kv in ("auto", "fp8"):
        engine = engine_for(gpu_model_dir, num_kv_blocks=None, kv_cache_bytes=256 << 20,
                            dtype="bfloat16", kv_cache_dtype=kv)  # fmt: skip
        async with engine:
            out = await engine.generate([1, 2, 3], SamplingParams(max_tokens=16, ignore_eos=True))
            assert len(out.token_ids) == 16
            blocks[kv] = engine.stats().kv_blocks_total
            assert engine.stats().attention_backend == "triton"
    assert blocks["fp8"] == 2 * blocks["auto"]


async def test_embedded_model_matches_transformers_in_float32() -> None:
    reference = load_reference(TINY_MODEL_DIR).cuda()
    async with AsyncEngine.from_pretrained(None, device="cuda", dtype="float32") as engine:
        texts = ["Once upon a time", "The little dog", "One day"]
        outs = await engine.generate_many(texts, SamplingParams(temperature=0, max_tokens=64))
        prompts = [engine.tokenizer.encode(t) for t in texts]
    assert [o.token_ids for o in outs] == [reference_greedy(reference, p, 64) for p in prompts]


async def test_long_mixed_workload_with_cancellations_leaks_nothing(gpu_model_dir: Path) -> None:
    rng = random.Random(7)
    prompts = prompts_of(300, 2048, seed=8, max_len=500)
    plans = [(rng.randint(1, 200), rng.choice([None, rng.randint(0, 60)])) for _ in prompts]
    endings: dict[int, str] = {}

    async def client(index: int, engine: AsyncEngine) -> None:
        await anyio.sleep(rng.uniform(0, 0.5))
        max_tokens, cancel_at = plans[index]
        count = 0
        async with engine.stream(
            prompts[index], SamplingParams(max_tokens=max_tokens, temperature=0.8)
        ) as stream:
            async for _ in stream:
                count += 1
                if cancel_at is not None and count > cancel_at:
                    break
        out = stream.output()
        assert index not in endings
        endings[index] = out.finish_reason
        if out.finish_reason == "length":
            assert len(out.token_ids) == max_tokens

    async with engine_for(gpu_model_dir, num_kv_blocks=600, max_num_seqs=128) as engine:
        async with anyio.create_task_group() as group:
            for index in range(len(prompts)):
                group.start_soon(client, index, engine)
        with anyio.fail_after(60):
            await engine.idle()
        stats = engine.stats()
        engine._core.blocks.check_invariants([])
    assert len(endings) == len(prompts)
    assert set(endings.values()) <= {"length", "abort"}
    assert all_blocks_unused(stats)
    assert stats.num_finished == len(prompts)  # each request released exactly once


def test_kv_pool_is_sized_from_free_memory(gpu_model_dir: Path) -> None:
    engine = engine_for(gpu_model_dir, num_kv_blocks=None, gpu_memory_utilization=0.5)
    engine._core.load()
    free, total = torch.cuda.mem_get_info()
    assert engine.stats().kv_blocks_total > 1000
    assert total - free <= 0.55 * total  # the engine stayed within its share (and a margin)
