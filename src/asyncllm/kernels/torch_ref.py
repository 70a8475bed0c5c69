"""The reference attention backend: plain torch over the paged cache, on any device.

Every sequence's keys are gathered through its block table into a padded [B, max_k] batch and
attended with one masked SDPA call. It is the ground truth the fast backends are tested
against, and the CPU backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from asyncllm.kernels.base import AttentionBackend

if TYPE_CHECKING:
    from asyncllm.context import ForwardContext

__all__ = ["FP8_MAX", "TorchAttention", "gather_padded_kv", "store_kv", "to_cache_dtype"]

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
"""float8 e4m3's largest finite value (448): a float8 cache stores larger magnitudes as it."""


def to_cache_dtype(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """`x` in `cache`'s dtype; clamped to float8's range first for a float8 cache, as the
    Triton stores are (a cast past the range gives NaN on some torch builds)."""
    if cache.dtype == torch.float8_e4m3fn:
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(cache.dtype)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token i's K/V to flat slot `slot_mapping[i]`; negative slots (padding) are skipped."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = to_cache_dtype(k[keep], k_cache)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = to_cache_dtype(v[keep], v_cache)


def gather_padded_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, max_seqlen_k: int
) -> torch.Tensor:
    """[B, max_seqlen_k, Hkv, D]: each sequence's first max_seqlen_k cached tokens, in order."""
    block_size = cache.shape[1]
    positions = torch.arange(max_seqlen_k, device=cache.device)
    blocks = block_tables[:, positions // block_size].long()
    slots = blocks * block_size + positions % block_size
    return cache.flatten(0, 1)[slots]


class TorchAttention(AttentionBackend):
    """Masked SDPA over K/V gathered from the paged cache (correct everywhere, not fast)."""

    name = "torch"

    def forward(
        self,
        ctx: ForwardContext,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        if k is not None and v is not None:
            store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        num_tokens, num_heads = q.shape[0], q.shape[1]
        group = num_heads // k_cache.shape[2]
        keys = gather_padded_kv(k_cache, ctx.block_tables, ctx.max_seqlen_k).to(q.dtype)
        values = gather_padded_kv(v_cache, ctx.block_tables, ctx.max_seqlen_k).to(q.dtype)

        starts = ctx.cu_seqlens_q[:-1].long()
        q_lens = ctx.cu_seqlens_q[1:].long() - starts
        rows = torch.arange(ctx.max_seqlen_q, device=q.device)
        q_valid = rows[None, :] < q_lens[:, None]  # [B, max_q]
        q_index = (starts[:, None] + rows[None, :]).clamp(max=num_tokens - 1)
        queries = q[q_index]  # [B, max_q, Hq, D]

        cols = torch.arange(ctx.max_seqlen_k, device=q.device)
        seq_lens = ctx.seq_lens_k.long()
        last_visible = seq_lens[:, None] - q_lens[:, None] + rows[None, :]  # [B, max_q]
        mask = cols[None, None, :] <= last_visible[:, :, None]
        # Padding rows see key 0 only, so softmax stays finite; their output is discarded.
        mask = torch.where(q_valid[:, :, None], mask, cols[None, None, :] == 0)

        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys.repeat_interleave(group, dim=2).transpose(1, 2),
            values.repeat_interleave(group, dim=2).transpose(1, 2),
            attn_mask=mask[:, None],
            scale=scale,
        ).transpose(1, 2)  # [B, max_q, Hq, D]
        result = out[q_valid].to(q.dtype)
        if result.shape[0] < num_tokens:  # trailing padding tokens (fixed-size batches)
            result = torch.cat(
                [result, result.new_zeros(num_tokens - result.shape[0], *result.shape[1:])]
            )
        return result
