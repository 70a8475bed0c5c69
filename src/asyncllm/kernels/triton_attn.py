"""The Triton attention backend: the default on CUDA when flash-attn is absent.

One step runs up to four kernels (see `triton_attn_kernels`):

- `store_kv`: this step's K/V into the paged cache through `slot_mapping`;
- split-KV decode (flash-decoding) for the leading single-token sequences, then a small
  reduce when there is more than one split;
- paged varlen prefill for the remaining sequences (chunks after a cached prefix included).

A decode-only step launches a fixed set of kernels whose grids depend only on the batch
shape and the device, never on sequence lengths, so it can be captured in a CUDA graph and
replayed with new lengths and block tables.

Importing this module needs Triton but not CUDA: kernels compile at their first launch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
import triton

from asyncllm.kernels import sm_count
from asyncllm.kernels.base import AttentionBackend
from asyncllm.kernels.triton_attn_kernels import (
    decode_reduce_kernel,
    decode_split_kernel,
    prefill_kernel,
    store_kv_kernel,
)

if TYPE_CHECKING:
    from asyncllm.context import ForwardContext

__all__ = ["DecodeTuning", "PrefillTuning", "TritonAttention", "TritonMetadata", "triton_store_kv"]

_LOG2_E = 1.4426950408889634
_HEAD_DIMS = (32, 64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_PAGE_SIZE = 8


@dataclass(frozen=True)
class DecodeTuning:
    """Launch shape of the split-KV decode kernel (None: chosen from head_dim and dtype).

    Splits are ceil(programs_per_sm * SMs / (rows * Hkv)) rounded up to a power of two and
    capped at `max_splits`: a function of the batch shape and the device only, as CUDA
    graphs need. (On the H100, 3 splits of 32 x 8192 ran 6 % slower than 2 or 4: a partial
    last wave; powers of two avoided that in the sweep, see docs/kernels-notes.md.) Eight
    programs an SM, rather than four, cut batches of 32 to 128 rows of mixed lengths by 4-16%
    on the H200 (shorter programs balance better), at most 2% slower on equal lengths.
    """

    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    programs_per_sm: int = 8
    max_splits: int = 64
    fixed_splits: int | None = None
    """Use exactly this many splits (benchmarks and tests); overrides the rule above."""
    longest_first: bool = True
    """Launch the rows' programs longest sequence first (False: in row order). The GPU
    starts programs in launch order, so the short ones then fill the end of the launch
    instead of one long program running on alone."""


@dataclass(frozen=True)
class PrefillTuning:
    """Launch shape of the prefill kernel (None: chosen from head_dim and dtype)."""

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


def triton_store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token i's K/V [T, Hkv, D] to flat slot `slot_mapping[i]`; slots < 0 are skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_last_dim_contiguous(k, v, k_cache, v_cache)
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share one layout (the kernels use one set)")
    store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1],
        KV_FP8=k_cache.dtype == torch.float8_e4m3fn,
        num_warps=4,
    )


class TritonMetadata(NamedTuple):
    """What `TritonAttention.build_metadata` computes once per step, for every layer."""

    decode_order: torch.Tensor
    """[decode rows] int64: the decode rows, longest sequence first (launch order)."""


class TritonAttention(AttentionBackend):
    """Paged attention in Triton: split-KV decode, varlen paged prefill, GQA, CUDA graphs.

    Per step (`build_metadata`) it only sorts the decode rows by length, on the device. The
    prefill kernel maps its tiles to sequences by a binary search over `cu_seqlens_q` on the
    device, so no per-step host tables (and no device-to-host sync) are needed.

    Example:
        >>> backend = TritonAttention()  # doctest: +SKIP
        >>> out = backend.forward(ctx, q, k, v, k_cache, v_cache, scale=head_dim**-0.5)
    """

    name: ClassVar[str] = "triton"
    supports_cuda_graphs: ClassVar[bool] = True

    def __init__(
        self, decode: DecodeTuning | None = None, prefill: PrefillTuning | None = None
    ) -> None:
        self.decode_tuning = decode or DecodeTuning()
        self.prefill_tuning = prefill or PrefillTuning()

    @classmethod
    def unsupported_reason(
        cls,
        device: torch.device,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        kv_dtype: torch.dtype | None = None,
    ) -> str | None:
        """Why this configuration cannot run here, or None (CUDA sm80+, head_dim a power of
        two in 32..256, block_size a power of two >= 8, fp16/bf16/fp32; a float8 KV cache
        needs sm89+, where Triton converts float8 e4m3)."""
        if device.type != "cuda" or not torch.cuda.is_available():
            return "the Triton kernels need a CUDA device"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the Triton kernels need compute capability 8.0 or newer"
        if head_dim not in _HEAD_DIMS:
            return f"head_dim {head_dim} is not one of {_HEAD_DIMS}"
        if block_size < _MIN_PAGE_SIZE or block_size & (block_size - 1):
            return f"block_size {block_size} is not a power of two >= {_MIN_PAGE_SIZE}"
        if dtype not in _DTYPES:
            return f"dtype {dtype} is not float16, bfloat16 or float32"
        if kv_dtype not in (None, dtype, torch.float8_e4m3fn):
            return f"a KV cache of {kv_dtype} with compute dtype {dtype} is not supported"
        if kv_dtype == torch.float8_e4m3fn and torch.cuda.get_device_capability(device) < (8, 9):
            return "a float8 KV cache needs compute capability 8.9 or newer"
        return None

    def build_metadata(self, ctx: ForwardContext) -> TritonMetadata | None:
        """The decode rows' launch order (None when the step has no decode rows, or the
        tuning launches them in row order)."""
        rows = ctx.num_decode_seqs
        if not rows or not self.decode_tuning.longest_first:
            return None
        return TritonMetadata(_longest_first(ctx.seq_lens_k[:rows]))

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
        """Write this step's K/V into the cache and return the attention output [T, Hq, D]."""
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self.forward_into(out, ctx, q, k, v, k_cache, v_cache, scale)
        return out

    def forward_into(
        self,
        out: torch.Tensor,
        ctx: ForwardContext,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
    ) -> None:
        """`forward`, writing into `out` [T, Hq, D] (every element is written)."""
        if k is not None and v is not None:
            triton_store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        _check_last_dim_contiguous(q, out)
        num_decodes = ctx.num_decode_seqs
        if ctx.is_decode_only:
            # Rows past the last sequence (fixed-size padding) get zeros from the decode kernel.
            self._decode(out, ctx, q, k_cache, v_cache, scale, num_rows=q.shape[0])
            return
        if num_decodes:
            self._decode(out, ctx, q, k_cache, v_cache, scale, num_rows=num_decodes)
        self._prefill(out, ctx, q, k_cache, v_cache, scale, first_seq=num_decodes)

    def decode_splits(self, num_rows: int, num_kv_heads: int, device: torch.device) -> int:
        """How many key splits each decode row gets: a function of shape and device only."""
        tuning = self.decode_tuning
        if tuning.fixed_splits is not None:
            return tuning.fixed_splits
        wanted = math.ceil(tuning.programs_per_sm * sm_count(device) / (num_rows * num_kv_heads))
        return max(1, min(int(triton.next_power_of_2(wanted)), tuning.max_splits))

    def _decode(
        self,
        out: torch.Tensor,
        ctx: ForwardContext,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        num_rows: int,
    ) -> None:
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = k_cache.shape[2]
        group = num_heads // num_kv_heads
        splits = self.decode_splits(num_rows, num_kv_heads, q.device)
        block_n, num_warps, num_stages = self._decode_launch(head_dim, q.dtype, k_cache.dtype)
        order = self._decode_order(ctx, num_rows)
        if splits > 1:
            part_ml = torch.empty(
                (num_rows, num_heads, splits, 2), dtype=torch.float32, device=q.device
            )
            part_acc = torch.empty(
                (num_rows, num_heads, splits, head_dim), dtype=torch.float32, device=q.device
            )
        else:
            part_ml = part_acc = out  # unused by the kernel
        decode_split_kernel[(num_kv_heads, splits, num_rows)](
            q,
            k_cache,
            v_cache,
            ctx.block_tables,
            ctx.seq_lens_k,
            q if order is None else order,  # unread when ORDERED is false
            out,
            part_ml,
            part_acc,
            scale * _LOG2_E,
            ctx.num_seqs,
            splits,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            ctx.block_tables.stride(0),
            out.stride(0),
            out.stride(1),
            GROUP=group,
            GROUP_PAD=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=head_dim,
            PAGE_SIZE=k_cache.shape[1],
            BLOCK_N=block_n,
            SINGLE_SPLIT=splits == 1,
            ORDERED=order is not None,
            DOT_PRECISION=_dot_precision(q.dtype),
            FP16_DOTS=_fp16_dots(q, k_cache),
            num_warps=num_warps,
            num_stages=num_stages,
        )
        if splits > 1:
            decode_reduce_kernel[(num_heads, num_rows)](
                part_ml,
                part_acc,
                out,
                splits,
                out.stride(0),
                out.stride(1),
                SPLITS_PAD=triton.next_power_of_2(splits),
                HEAD_DIM=head_dim,
                num_warps=4,
            )

    def _decode_order(self, ctx: ForwardContext, num_rows: int) -> torch.Tensor | None:
        """The step's longest-first order of its decode rows (computed here when the step
        has no metadata, as in direct calls of `forward`); None for row order."""
        if not self.decode_tuning.longest_first:
            return None
        if isinstance(ctx.attn_metadata, TritonMetadata):
            return ctx.attn_metadata.decode_order
        return _longest_first(ctx.seq_lens_k[:num_rows])

    def _prefill(
        self,
        out: torch.Tensor,
        ctx: ForwardContext,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        first_seq: int,
    ) -> None:
        num_tokens, num_heads, head_dim = q.shape
        num_seqs = ctx.num_seqs
        block_m, block_n, num_warps, num_stages = self._prefill_launch(head_dim, q.dtype)
        # Enough virtual tiles for every sequence (see `_find_sequence`) plus trailing padding.
        num_tiles = num_tokens // block_m + num_seqs + 1
        prefill_kernel[(num_heads, num_tiles)](
            q,
            k_cache,
            v_cache,
            ctx.block_tables,
            ctx.seq_lens_k,
            ctx.cu_seqlens_q,
            out,
            scale * _LOG2_E,
            first_seq,
            num_seqs,
            num_tokens,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            ctx.block_tables.stride(0),
            out.stride(0),
            out.stride(1),
            GROUP=num_heads // k_cache.shape[2],
            HEAD_DIM=head_dim,
            PAGE_SIZE=k_cache.shape[1],
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            DOT_PRECISION=_dot_precision(q.dtype),
            FP16_DOTS=_fp16_dots(q, k_cache),
            num_warps=num_warps,
            num_stages=num_stages,
        )

    def _decode_launch(
        self, head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype
    ) -> tuple[int, int, int]:
        """(BLOCK_N, num_warps, num_stages) of the decode kernel."""
        if dtype == torch.float32:
            # IEEE float32 dots run on FMAs and keep whole operand rows in registers: small
            # tiles over 8 warps are the largest that compile without spills, for every D.
            block_n, num_warps, num_stages = 32, 8, 2
        elif head_dim <= 128 and kv_dtype == torch.float8_e4m3fn:
            # One warp a program, many programs an SM: the H200 sweep of 2026-11-23 (see
            # docs/kernels-notes.md) read float8 at 84-86% of copy bandwidth this way, 1.35x
            # the 4-warp tiles of 128 keys, at 32 to 256 rows.
            block_n, num_warps, num_stages = 64, 1, 3
        elif head_dim <= 128:
            # Same sweep, 16-bit caches: 248-253 us against 255-275 for (128, 4, 3) at 32-256
            # rows x 1-8k keys; never slower.
            block_n, num_warps, num_stages = 32, 1, 3
        else:
            block_n, num_warps, num_stages = 32, 4, 2
        tuning = self.decode_tuning
        return (
            tuning.block_n or block_n,
            tuning.num_warps or num_warps,
            tuning.num_stages or num_stages,
        )

    def _prefill_launch(self, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
        """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel.

        Every default compiles for sm_90 without register spills (checked with the compiler's
        resource report; see docs/kernels-notes.md).
        """
        if dtype == torch.float32:
            fp32_tiles = {32: (64, 32), 64: (64, 32), 128: (32, 16), 256: (16, 32)}
            block_m, block_n = fp32_tiles.get(head_dim, (16, 16))
            num_warps, num_stages = 8, 2
        elif head_dim <= 128:
            # Within 1 % of the best H100 sweep average, without the register spills of
            # (128, 64, 4 warps).
            block_m, block_n, num_warps, num_stages = 128, 128, 8, 2
        else:
            block_m, block_n, num_warps, num_stages = 64, 64, 8, 2
        tuning = self.prefill_tuning
        return (
            tuning.block_m or block_m,
            tuning.block_n or block_n,
            tuning.num_warps or num_warps,
            tuning.num_stages or num_stages,
        )


def _longest_first(seq_lens: torch.Tensor) -> torch.Tensor:
    return torch.argsort(seq_lens, descending=True)


def _fp16_dots(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernels take q to float16 for their dots (a float8 cache, 16-bit q)."""
    return k_cache.dtype == torch.float8_e4m3fn and q.dtype != torch.float32


def _dot_precision(dtype: torch.dtype) -> str:
    # TF32 would cost float32 models their token-exact parity with transformers.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        if tensor.stride(-1) != 1:
            raise ValueError(f"the Triton kernels need a contiguous last dimension: {tensor.shape}")
