# Triton kernels take untyped pointers and scalars, and triton.jit is an untyped decorator.
# mypy: disable-error-code="no-untyped-def, untyped-decorator"
"""Fused mixture-of-experts MLP on CUDA: tokens sorted by expert, two grouped GEMMs.

A per-expert loop launches ~6 small kernels for every expert that received a token (128 experts:
hundreds of launches a layer). Here the (token, slot) pairs are sorted by expert and padded to
whole `BLOCK_M` tiles, so one launch multiplies every tile by its own expert's weights:
gate-up with SiLU-and-mul fused into the epilogue, then down with the routing weight fused in.
Every step is a fixed-size tensor op (no host sync), so the whole MLP captures in a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["ExpertTiles", "fused_moe", "sort_by_expert"]


class ExpertTiles(NamedTuple):
    """(token, slot) pairs grouped by expert, each expert's run padded to whole tiles."""

    pair_ids: torch.Tensor
    """int32 [max_padded]: flat pair index (token * top_k + slot), or num_pairs for padding."""
    tile_experts: torch.Tensor
    """int32 [max_padded // block_m]: each tile's expert, or -1 for a tile past the end."""
    block_m: int


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertTiles:
    """Group the pairs of `topk_ids` [T, K] by expert, in fixed-size tensors.

    The padded length is the worst case (every expert's run rounded up), so shapes depend on
    T, K and the expert count only, never on the routing itself.
    """
    flat = topk_ids.flatten().to(torch.int64)
    num_pairs = flat.numel()
    max_padded = _round_up(num_pairs + num_experts * (block_m - 1), block_m)
    # scatter_add, not bincount: bincount sizes its output from the data (a host sync).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    # A pair's rank within its expert's run: its sorted position minus where the run starts.
    run_starts = torch.cumsum(counts, 0) - counts
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=flat.device) - run_starts[sorted_experts]
    destination = (padded_ends - padded)[sorted_experts] + rank
    pair_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=flat.device)
    pair_ids[destination] = order.to(torch.int32)
    tile_starts = torch.arange(0, max_padded, block_m, device=flat.device)
    tile_experts = torch.searchsorted(padded_ends, tile_starts, right=True).to(torch.int32)
    past_end = tile_starts >= padded_ends[-1]
    tile_experts = torch.where(past_end, torch.full_like(tile_experts, -1), tile_experts)
    return ExpertTiles(pair_ids, tile_experts, block_m)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, pair_ids_ptr, tile_experts_ptr,
    num_pairs, N, K, a_row_divisor,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    GATED: tl.constexpr, ROUTING_WEIGHT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[pair, n] = A[pair // a_row_divisor] . B[expert of the tile][n] over K.

    GATED: B holds [gate; up] rows (2N of them) and C gets silu(gate) * up.
    ROUTING_WEIGHT: C is scaled by the pair's routing weight.
    """
    tile = tl.program_id(0)
    expert = tl.load(tile_experts_ptr + tile).to(tl.int64)
    if expert < 0:
        return
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pair_ids_ptr + offs_m).to(tl.int64)
    valid = pairs < num_pairs
    rows = pairs // a_row_divisor
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        if GATED:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc_up += tl.dot(a, b_up, input_precision="ieee")
            else:
                acc_up += tl.dot(a, b_up)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out_dtype = c_ptr.dtype.element_ty
    if GATED:
        # Round each projection to the compute dtype first, as the unfused path does.
        gate = acc.to(out_dtype).to(tl.float32)
        up = acc_up.to(out_dtype).to(tl.float32)
        acc = (gate / (1.0 + tl.exp(-gate))).to(out_dtype).to(tl.float32) * up
    if ROUTING_WEIGHT:
        acc = acc.to(out_dtype).to(tl.float32)
        acc *= tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(out_dtype), mask=valid[:, None] & n_ok[None, :])


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t,k].

    x [T, H]; w_gate_up [E, 2I, H] (gate rows, then up rows); w_down [E, H, I];
    topk_weights [T, K] (any float dtype); topk_ids [T, K] (ints). Returns [T, H] in x.dtype.
    """
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w_gate_up.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    block_m = _block_m(num_pairs, num_experts)
    tiles = sort_by_expert(topk_ids, num_experts, block_m)
    weights = topk_weights.to(x.dtype).flatten().contiguous()
    ieee = x.dtype == torch.float32
    hidden_states = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _launch(x, w_gate_up, hidden_states, weights, tiles, num_pairs, inter, hidden, top_k,
            gated=True, routing_weight=False, ieee=ieee)  # fmt: skip
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _launch(hidden_states, w_down, out, weights, tiles, num_pairs, hidden, inter, 1,
            gated=False, routing_weight=True, ieee=ieee)  # fmt: skip
    return out.view(num_tokens, top_k, hidden).sum(dim=1)


def _launch(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
    tiles: ExpertTiles, num_pairs: int, n: int, k: int, a_row_divisor: int,
    *, gated: bool, routing_weight: bool, ieee: bool,
) -> None:  # fmt: skip
    block_n = 64 if gated else 128
    block_k = 32 if ieee else 64
    grid = (tiles.tile_experts.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, b, c, weights, tiles.pair_ids, tiles.tile_experts,
        num_pairs, n, k, a_row_divisor,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1),
        GATED=gated, ROUTING_WEIGHT=routing_weight, IEEE=ieee,
        BLOCK_M=tiles.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=3,
    )  # fmt: skip


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Small tiles when each expert sees few tokens (decode), larger ones for prefill."""
    per_expert = num_pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
