"""A float8 KV cache (`EngineConfig.kv_cache_dtype="fp8"`) on the CPU: the setting, the
torch backend's arithmetic over it, the pool it buys, and an engine that still behaves."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from asyncllm import AsyncEngine, EngineConfig, SamplingParams
from asyncllm.context import ForwardContext
from asyncllm.errors import ConfigError
from asyncllm.kernels.torch_ref import TorchAttention, store_kv
from tests.models import all_blocks_unused

FP8 = torch.float8_e4m3fn


# ---- the setting ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["fp8", "fp8_e4m3", FP8])
def test_every_spelling_of_fp8_is_stored_as_fp8(value: object) -> None:
    config = EngineConfig(kv_cache_dtype=value)  # type: ignore[arg-type]
    assert config.kv_cache_dtype == "fp8"
    assert config.kv_torch_dtype(torch.device("cpu")) == FP8


def test_auto_stores_the_compute_dtype() -> None:
    assert EngineConfig().kv_torch_dtype(torch.device("cpu")) == torch.float32
    config = EngineConfig(dtype="bfloat16")
    assert config.kv_torch_dtype(torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("value", ["int8", "float8", "", None, 8, torch.float16])
def test_other_kv_cache_dtypes_are_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of") as err:
        EngineConfig(kv_cache_dtype=value)  # type: ignore[arg-type]
    assert repr(value) in str(err.value)


# ---- the torch backend over a float8 cache -------------------------------------------------


def _decode_context(seq_lens: list[int], block_size: int, slots: list[int]) -> ForwardContext:
    tables = torch.arange(len(seq_lens) * 4, dtype=torch.int32).view(len(seq_lens), 4)
    return ForwardContext(
        positions=torch.zeros(len(seq_lens), dtype=torch.int64),
        slot_mapping=torch.tensor(slots),
        cu_seqlens_q=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
        seq_lens_k=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        logits_indices=torch.arange(len(seq_lens)),
        max_seqlen_q=1,
        max_seqlen_k=max(seq_lens),
        num_decode_seqs=len(seq_lens),
        attn_backend=TorchAttention(),
    )


def test_attention_over_a_float8_cache_reads_exactly_its_values() -> None:
    """The output equals attention over a float32 cache holding the float8 values: the
    only difference a float8 cache makes is the rounding of what is stored."""
    gen = torch.Generator().manual_seed(0)
    block_size, heads, kv_heads, dim = 8, 4, 2, 16
    seq_lens = [5, 32, 17]
    # Each row's new token goes to its last position (rows own blocks 4r .. 4r+3).
    slots = [4 * row * block_size + n - 1 for row, n in enumerate(seq_lens)]
    ctx = _decode_context(seq_lens, block_size, slots)
    q = torch.randn(3, heads, dim, generator=gen)
    k, v = (torch.randn(3, kv_heads, dim, generator=gen) * 3 for _ in "kv")
    cache8 = (torch.randn(2, 12, block_size, kv_heads, dim, generator=gen) * 3).to(FP8)
    cache32 = cache8.float()
    out8 = TorchAttention().forward(ctx, q, k, v, cache8[0], cache8[1], dim**-0.5)
    rounded_k, rounded_v = k.to(FP8).float(), v.to(FP8).float()
    out32 = TorchAttention().forward(
        ctx, q, rounded_k, rounded_v, cache32[0], cache32[1], dim**-0.5
    )
    assert torch.equal(cache8.float(), cache32)  # the same values were stored
    assert torch.equal(out8, out32)


def test_values_beyond_float8s_range_are_stored_saturated() -> None:
    k = torch.tensor([[[1000.0, -1e6, 0.5, 2e-4]]])
    k_cache, v_cache = torch.zeros(2, 1, 4, 1, 4, dtype=FP8)
    store_kv(k, -k, k_cache, v_cache, torch.tensor([2]))
    assert k_cache[0, 2, 0].float().tolist() == [448.0, -448.0, 0.5, 0.0]
    assert v_cache[0, 2, 0].float().tolist() == [-448.0, 448.0, -0.5, 0.0]


# ---- the engine ----------------------------------------------------------------------------


def _engine(**overrides: Any) -> AsyncEngine:
    return AsyncEngine.from_pretrained(None, device="cpu", **overrides)


def test_the_same_bytes_hold_four_times_the_float32_tokens() -> None:
    sizes = {}
    for kv in ("auto", "fp8"):
        engine = _engine(kv_cache_dtype=kv, kv_cache_bytes=64 << 20)
        engine._core.load()
        runner = engine._core.runner
        assert runner is not None
        sizes[kv] = (runner.num_kv_blocks, runner.kv_block_bytes, runner.kv_cache.dtype)
        engine._core.unload()
    assert sizes["auto"][2] == torch.float32 and sizes["fp8"][2] == FP8
    assert sizes["fp8"][1] * 4 == sizes["auto"][1]
    assert sizes["fp8"][0] == 4 * sizes["auto"][0]


TEXTS = ["Once upon a time", "The little dog", "One day", "Lily wanted to",
         "Tom and Sam went to the park", "The sun was"]  # fmt: skip


async def test_the_embedded_model_keeps_its_greedy_text_with_a_float8_cache() -> None:
    """On the embedded model the float8 cache changes no greedy token of these prompts in 64
    steps, and the chosen tokens' logprobs move by less than 0.25 (measured: at most 0.16)."""
    params = SamplingParams(temperature=0, max_tokens=64, logprobs=0)
    runs = {}
    for kv in ("auto", "fp8"):
        async with _engine(kv_cache_dtype=kv) as engine:
            runs[kv] = await engine.generate_many(TEXTS, params)
    for full, fp8 in zip(runs["auto"], runs["fp8"]):
        assert fp8.token_ids == full.token_ids
        assert full.logprobs is not None and fp8.logprobs is not None
        moved = [abs(a.logprob - b.logprob) for a, b in zip(full.logprobs, fp8.logprobs)]
        assert max(moved) < 0.25


async def test_prefix_hits_chunks_and_preemption_read_the_same_float8_values() -> None:
    """A float8 cache is read the same way by every kind of step: prompts that share a
    prefix, chunked prefills and preempted-then-resumed requests in a crowded pool give the
    tokens a roomy, unchunked run of each prompt alone gives."""
    shared = "Once upon a time, there was a little girl named Lily. She loved to play"
    tails = ("outside", "with her dog", "in the sun", "with her mom", "at the park", "games")
    prompts = [f"{shared} {tail}" for tail in tails]
    params = SamplingParams(temperature=0, max_tokens=48)
    alone = []
    async with _engine(kv_cache_dtype="fp8", enable_prefix_caching=False) as engine:
        for prompt in prompts:
            alone.append((await engine.generate(prompt, params)).token_ids)
    crowded = _engine(kv_cache_dtype="fp8", num_kv_blocks=24, block_size=8,
                      max_num_batched_tokens=32, max_num_seqs=6)  # fmt: skip
    async with crowded:
        outs = await crowded.generate_many(prompts, params)
        stats = crowded.stats()
    assert [o.token_ids for o in outs] == alone
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens > 0
    assert all_blocks_unused(stats)
