"""The flash-attn backend against the torch reference (skipped when flash-attn is absent)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

pytest.importorskip("flash_attn")

from asyncllm.context import ForwardContext
from asyncllm.kernels.flash_attn import FlashAttention
from asyncllm.kernels.torch_ref import TorchAttention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def context(q_lens: list[int], seq_lens: list[int], block_size: int, blocks: int,
            backend: object) -> ForwardContext:  # fmt: skip
    rng = random.Random(0)
    per_seq = [-(-n // block_size) for n in seq_lens]
    ids = rng.sample(range(blocks), sum(per_seq))
    tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
    start = 0
    for row, count in enumerate(per_seq):
        tables[row, :count] = torch.tensor(ids[start : start + count])
        start += count
    positions = torch.cat([torch.arange(s - q, s) for q, s in zip(q_lens, seq_lens)])
    seq_of = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    slots = tables[seq_of, positions // block_size].long() * block_size + positions % block_size
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    ctx = ForwardContext(
        positions=positions.cuda(), slot_mapping=slots.cuda(), cu_seqlens_q=cu.cuda(),
        seq_lens_k=torch.tensor(seq_lens, dtype=torch.int32).cuda(), block_tables=tables.cuda(),
        logits_indices=(cu[1:] - 1).long().cuda(), max_seqlen_q=max(q_lens),
        max_seqlen_k=max(seq_lens), num_decode_seqs=sum(1 for q in q_lens if q == 1),
        attn_backend=backend,  # type: ignore[arg-type]
    )  # fmt: skip
    return dataclasses.replace(ctx, attn_metadata=FlashAttention().build_metadata(ctx))


@pytest.mark.parametrize(("q_lens", "seq_lens"), [
    ([1, 1, 1], [300, 17, 1024]),          # decodes
    ([40, 1, 300], [40, 700, 900]),        # prefill, decode, prefill after a cached prefix
])  # fmt: skip
def test_flash_attn_matches_the_reference(q_lens: list[int], seq_lens: list[int]) -> None:
    block_size, blocks, heads, kv_heads, dim = 256, 64, 16, 8, 128
    backend = FlashAttention()
    ctx = context(q_lens, seq_lens, block_size, blocks, backend)
    tokens = sum(q_lens)
    q = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))  # fmt: skip
    caches = [torch.randn(blocks, block_size, kv_heads, dim, device="cuda",
                          dtype=torch.bfloat16) for _ in range(2)]  # fmt: skip
    ref_caches = [c.float() for c in caches]
    out = backend.forward(ctx, q, k, v, *caches, scale=dim**-0.5)
    ref = TorchAttention().forward(ctx, q.float(), k.float(), v.float(), *ref_caches,
                                   scale=dim**-0.5)  # fmt: skip
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 2e-2
