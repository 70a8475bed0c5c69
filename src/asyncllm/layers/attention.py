"""The attention layer: hands q/k/v and this layer's KV cache to the step's backend."""

from __future__ import annotations

import torch
from torch import nn

from asyncllm.context import current_forward_context

__all__ = ["PagedAttention"]


class PagedAttention(nn.Module):
    """Attention over a paged KV cache; the backend and metadata come from the forward context.

    The runner binds `k_cache` / `v_cache` ([num_blocks, block_size, Hkv, D]) once, when it
    allocates the KV pool.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group evenly over {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]. k and v None: this step's K/V
        are in `k_cache` / `v_cache` already (written by the fused q/k kernel)."""
        ctx = current_forward_context()
        return ctx.attn_backend.forward(ctx, q, k, v, self.k_cache, self.v_cache, self.scale)
