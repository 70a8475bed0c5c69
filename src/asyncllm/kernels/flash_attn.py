"""The flash-attn backend: FlashAttention-2's paged kernels, when flash-attn is installed.

Two calls, both reading K/V through the block table (flash-attn's paged path needs pages of
a multiple of 256 tokens):

- decode-only steps: `flash_attn_with_kvcache(q[B, 1, Hq, D], cache_seqlens, block_table)`.
  Its launch depends only on the batch shape and the block table's width, never on sequence
  lengths, so it is captured in the decode CUDA graphs. Padding rows of a graph (length 0,
  stale block table) exit before reading any key and come back as zeros (tested in
  tests/gpu/test_flash_attn.py).
- every other step: `flash_attn_varlen_func(..., block_table=...)`, whose causal mask is
  aligned bottom-right, as a prefill chunk after a cached prefix needs.

Decodes run one key split (`decode_splits=1`) by default: flash-attn sizes its splits by
the block table's *width*, which in a graph is the whole `max_model_len`, so extra splits
would mostly idle; and with one split a row's result does not depend on that width, so a
graph replay and an eager step give bit-identical outputs. They also run longest sequence
first: `build_metadata` sorts the rows' lengths and tables once per step, and each layer
permutes q and the output, because the GPU starts flash-attn's programs in batch order and
a long row started last runs on alone at the end.

Builds of flash-attn may compile only some head sizes and architectures (the shared wheel:
head_dim 128, sm_90, fp16/bf16): `unsupported_reason` runs the kernel once on a tiny input
to find out, so an engine refuses such a configuration at start-up instead of mid-run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from asyncllm.kernels.base import AttentionBackend
from asyncllm.kernels.torch_ref import store_kv

if TYPE_CHECKING:
    from asyncllm.context import ForwardContext

__all__ = ["FlashAttention", "LongestFirst", "flash_attn_import_error"]

PAGE_MULTIPLE = 256
"""flash-attn's paged KV cache needs block_size % PAGE_MULTIPLE == 0."""
_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256

StoreKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class LongestFirst(NamedTuple):
    """A decode-only step's rows, longest sequence first (`FlashAttention.build_metadata`)."""

    order: torch.Tensor
    """[B] int64: row i of the sorted step is row order[i] of the step."""
    seq_lens: torch.Tensor
    """[B] int32: the rows' KV lengths, sorted."""
    block_tables: torch.Tensor
    """[B, W] int32: the rows' block tables, sorted."""


class FlashAttention(AttentionBackend):
    """Paged attention through flash-attn: `flash_attn_with_kvcache` for decode-only steps
    (CUDA-graph capturable), `flash_attn_varlen_func(block_table=...)` for the rest.

    Example:
        >>> backend = FlashAttention()  # doctest: +SKIP
        >>> out = backend.forward(ctx, q, k, v, k_cache, v_cache, scale=head_dim**-0.5)
    """

    name: ClassVar[str] = "flash_attn"
    supports_cuda_graphs: ClassVar[bool] = True

    def __init__(self, decode_splits: int = 1, longest_first: bool = True) -> None:
        """`decode_splits`: key splits of a decode row (0: flash-attn's own heuristic);
        `longest_first`: run decode rows longest sequence first (see the module docstring)."""
        from flash_attn import (  # ImportError: backend unavailable
            flash_attn_varlen_func,
            flash_attn_with_kvcache,
        )

        if not isinstance(decode_splits, int) or not 0 <= decode_splits <= 128:
            raise ValueError(f"decode_splits must be an int in [0, 128], got {decode_splits!r}")
        self.decode_splits = decode_splits
        self.longest_first = longest_first
        self._varlen: Callable[..., torch.Tensor] = flash_attn_varlen_func
        self._with_kvcache: Callable[..., torch.Tensor] = flash_attn_with_kvcache
        self._store_kv = _store_kv_function()

    @classmethod
    def unsupported_reason(
        cls,
        device: torch.device,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        kv_dtype: torch.dtype | None = None,
    ) -> str | None:
        """Every reason this configuration cannot run (joined by "; "), or None.

        Checked without a GPU first: fp16/bf16, block_size a multiple of 256, head_dim <= 256
        and a multiple of 8, a CUDA device, flash_attn importable. Then one tiny kernel launch
        tells whether this build of flash-attn compiled that head size for this GPU.
        """
        reasons = _static_reasons(device, block_size, head_dim, dtype)
        if kv_dtype is not None and kv_dtype != dtype:
            reasons.append(
                f"flash-attn reads a KV cache of the compute dtype only, not {kv_dtype} "
                "(kv_cache_dtype 'fp8' needs attention_backend 'triton' or 'torch')"
            )
        import_error = flash_attn_import_error()
        if import_error is not None:
            reasons.append(import_error)
        if reasons:
            return "; ".join(reasons)
        return _kernel_error(device, block_size, head_dim, dtype)

    def build_metadata(self, ctx: ForwardContext) -> Any:
        """cu_seqlens_k for the varlen call (prefix sums of the KV lengths); for a decode-only
        step, its rows longest first (`LongestFirst`), or None in row order."""
        if not ctx.is_decode_only:
            return _cu_seqlens_k(ctx)
        if not self.longest_first:
            return None
        order = torch.argsort(ctx.seq_lens_k, descending=True)
        return LongestFirst(order, ctx.seq_lens_k[order], ctx.block_tables[order])

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
        if k is not None and v is not None:
            self._store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        if ctx.is_decode_only:
            return self._decode(ctx, q, k_cache, v_cache, scale)
        cu_seqlens_k = ctx.attn_metadata if ctx.attn_metadata is not None else _cu_seqlens_k(ctx)
        return self._varlen(
            q, k_cache, v_cache,
            cu_seqlens_q=ctx.cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=ctx.max_seqlen_q, max_seqlen_k=ctx.max_seqlen_k,
            softmax_scale=scale, causal=True, block_table=ctx.block_tables,
        )  # fmt: skip

    def _decode(
        self,
        ctx: ForwardContext,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """One query per row: [B, 1, Hq, D] against each row's first seq_lens_k[b] keys (in
        the step's `LongestFirst` order when it has one)."""
        sorted_rows = ctx.attn_metadata if isinstance(ctx.attn_metadata, LongestFirst) else None
        seq_lens, tables = ctx.seq_lens_k, ctx.block_tables
        if sorted_rows is not None:
            q, seq_lens, tables = (
                q[sorted_rows.order],
                sorted_rows.seq_lens,
                sorted_rows.block_tables,
            )
        out = self._with_kvcache(
            q.unsqueeze(1), k_cache, v_cache, cache_seqlens=seq_lens, block_table=tables,
            softmax_scale=scale, causal=True, num_splits=self.decode_splits,
        ).squeeze(1)  # fmt: skip
        if sorted_rows is None:
            return out
        return torch.empty_like(out).index_copy_(0, sorted_rows.order, out)


def flash_attn_import_error() -> str | None:
    """Why `import flash_attn` fails here, or None when it imports.

    (A wheel built against another torch or CUDA fails with an ImportError naming a missing
    symbol; a missing shared library surfaces as OSError.)
    """
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"flash_attn is not importable ({type(exc).__name__}: {exc})"
    return None


def _static_reasons(
    device: torch.device, block_size: int, head_dim: int, dtype: torch.dtype
) -> list[str]:
    reasons = []
    if dtype not in _DTYPES:
        reasons.append(f"flash-attn computes in float16 or bfloat16, not {dtype} (set dtype)")
    if block_size % PAGE_MULTIPLE:
        reasons.append(
            f"flash-attn's paged KV cache needs block_size a multiple of {PAGE_MULTIPLE}, "
            f"got {block_size}"
        )
    if head_dim > _MAX_HEAD_DIM or head_dim % 8:
        reasons.append(
            f"head_dim {head_dim} is not supported by flash-attn (a multiple of 8, "
            f"at most {_MAX_HEAD_DIM})"
        )
    if device.type != "cuda":
        reasons.append(f"flash-attn needs a CUDA device, not {device}")
    return reasons


def _kernel_error(
    device: torch.device, block_size: int, head_dim: int, dtype: torch.dtype
) -> str | None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe_kernel(index, block_size, head_dim, dtype)


@functools.cache
def _probe_kernel(device_index: int, block_size: int, head_dim: int, dtype: torch.dtype
                  ) -> str | None:  # fmt: skip
    """Run the paged decode kernel once on one token; its error, if any, in one line."""
    from flash_attn import flash_attn_with_kvcache

    device = torch.device("cuda", device_index)
    cache = torch.zeros(1, block_size, 1, head_dim, dtype=dtype, device=device)
    query = torch.zeros(1, 1, 1, head_dim, dtype=dtype, device=device)
    lengths = torch.ones(1, dtype=torch.int32, device=device)
    table = torch.zeros(1, 1, dtype=torch.int32, device=device)
    try:
        flash_attn_with_kvcache(query, cache, cache, cache_seqlens=lengths, block_table=table)
        torch.cuda.synchronize(device)
    except RuntimeError as exc:  # TORCH_CHECK failures and "no kernel image" launch errors
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        return (
            f"this build of flash-attn cannot run head_dim {head_dim}, {dtype} on "
            f"{torch.cuda.get_device_name(device)}: {first_line}"
        )
    return None


def _cu_seqlens_k(ctx: ForwardContext) -> torch.Tensor:
    return F.pad(ctx.seq_lens_k.cumsum(0, dtype=torch.int32), (1, 0))


def _store_kv_function() -> StoreKV:
    """The Triton store kernel when Triton imports (one launch), else the torch one."""
    try:
        from asyncllm.kernels.triton_attn import triton_store_kv
    except ImportError:
        return store_kv
    return triton_store_kv
