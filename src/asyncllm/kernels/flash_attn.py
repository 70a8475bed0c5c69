"""The flash-attn backend: FlashAttention-2's paged varlen kernel, when flash-attn is installed.

Its paged path reads K/V through a block table whose pages must hold a multiple of 256
tokens, so it is chosen automatically only for such block sizes (the engine falls back to
Triton otherwise, with a log line). Every step, decodes included, is one varlen call: the
kernel aligns causal masks bottom-right, which is what a prefill after a cached prefix needs.
Steps run eagerly (no CUDA graphs): flash-attn's behaviour on the zero-length padding rows a
graph replay would feed it is not something this backend relies on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from asyncllm.kernels.base import AttentionBackend
from asyncllm.kernels.torch_ref import store_kv

if TYPE_CHECKING:
    from asyncllm.context import ForwardContext

__all__ = ["FlashAttention"]

_PAGE_MULTIPLE = 256


class FlashAttention(AttentionBackend):
    """Paged attention through `flash_attn.flash_attn_varlen_func(block_table=...)`."""

    name: ClassVar[str] = "flash_attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func  # ImportError: backend unavailable

        self._varlen = flash_attn_varlen_func

    @classmethod
    def unsupported_reason(
        cls, device: torch.device, block_size: int, head_dim: int, dtype: torch.dtype
    ) -> str | None:
        """flash-attn needs CUDA, fp16/bf16, head_dim <= 256 and pages of 256k tokens."""
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash_attn is not installed"
        if device.type != "cuda":
            return "flash-attn needs a CUDA device"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn computes in float16/bfloat16, not {dtype}"
        if block_size % _PAGE_MULTIPLE:
            return f"its paged path needs block_size a multiple of {_PAGE_MULTIPLE}"
        if head_dim > 256 or head_dim % 8:
            return f"head_dim {head_dim} is not supported by flash-attn"
        return None

    def build_metadata(self, ctx: ForwardContext) -> Any:
        """cu_seqlens_k: prefix sums of the KV lengths (flash-attn's varlen convention)."""
        return F.pad(ctx.seq_lens_k.cumsum(0, dtype=torch.int32), (1, 0))

    def forward(
        self,
        ctx: ForwardContext,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        _store(k, v, k_cache, v_cache, ctx.slot_mapping)
        # Eager steps only (no CUDA graphs), so there are no padding tokens to mask out.
        out: torch.Tensor = self._varlen(
            q, k_cache, v_cache,
            cu_seqlens_q=ctx.cu_seqlens_q, cu_seqlens_k=ctx.attn_metadata,
            max_seqlen_q=ctx.max_seqlen_q, max_seqlen_k=ctx.max_seqlen_k,
            softmax_scale=scale, causal=True, block_table=ctx.block_tables,
        )  # fmt: skip
        return out


def _store(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:  # fmt: skip
    try:
        from asyncllm.kernels.triton_attn import triton_store_kv
    except ImportError:
        store_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        triton_store_kv(k, v, k_cache, v_cache, slot_mapping)
