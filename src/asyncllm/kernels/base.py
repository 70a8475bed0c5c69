"""The attention-backend interface: paged attention over one layer's KV cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from asyncllm.context import ForwardContext

__all__ = ["AttentionBackend"]


class AttentionBackend(ABC):
    """Paged attention for prefill, decode and mixed steps.

    Contract for `forward` (called once per attention layer per step, inside a forward
    context):

    - `q` is [T, Hq, D]; `k` and `v` are [T, Hkv, D]: this step's tokens in the context's
      order (decodes first). Hq is a multiple of Hkv (grouped-query attention).
    - `k_cache` / `v_cache` are [num_blocks, block_size, Hkv, D], in q's dtype or float8
      e4m3 (`EngineConfig.kv_cache_dtype`, stored unscaled). The backend first writes
      `k` / `v` to the slots in `ctx.slot_mapping` (negative slots are padding: skipped);
      `k` and `v` None means they are in the cache already (a fused kernel before the
      attention wrote them, which saves a launch per layer).
    - It returns [T, Hq, D]: query i of a sequence with `q_len` new tokens attends to keys
      [0, seq_len_k - q_len + i] of that sequence (causal, aligned bottom-right), reading the
      sequence's blocks through `ctx.block_tables`.

    `build_metadata` runs once per step, before the forward pass, so that per-step work the
    backend needs (split sizes, scheduling tables) is not repeated in every layer.
    """

    name: ClassVar[str]
    supports_cuda_graphs: ClassVar[bool] = False
    """True when `forward` launches a fixed set of kernels for a fixed batch size (decode)."""

    @classmethod
    def unsupported_reason(
        cls,
        device: torch.device,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        kv_dtype: torch.dtype | None = None,
    ) -> str | None:
        """Why this backend cannot run that configuration (compute `dtype`, a KV cache of
        `kv_dtype`, None meaning `dtype`), or None when it can."""
        return None

    def build_metadata(self, ctx: ForwardContext) -> Any:
        """Precompute whatever `forward` needs for the step described by `ctx`."""
        return None

    @abstractmethod
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
        """Write this step's K/V into the cache (unless None) and return the attention output
        [T, Hq, D]."""
