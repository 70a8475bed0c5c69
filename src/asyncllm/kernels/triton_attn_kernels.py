# Triton kernels take untyped pointers and scalars, and triton.jit is an untyped decorator.
# mypy: disable-error-code="no-untyped-def, untyped-decorator"
"""Triton kernels behind `TritonAttention`: KV store, paged prefill and split-KV decode.

Layout shared by every kernel: a layer's cache is [num_blocks, PAGE_SIZE, Hkv, D] with the
last dimension contiguous; token `n` of sequence `b` sits in page `block_tables[b, n //
PAGE_SIZE]` at row `n % PAGE_SIZE`. Cache addresses are computed in int64, since
num_blocks * PAGE_SIZE * Hkv * D overflows int32 on a large pool.

The cache holds the compute dtype or float8 e4m3 (unscaled): values are clamped to float8's
range (+-448) when stored, and tiles are converted to q's dtype as they are loaded. With a
float8 cache and 16-bit queries (FP16_DOTS) q is taken to float16 first: float8 -> float16 is
a single conversion, float8 -> bfloat16 is not, and it made the decode kernel 1.3x slower
(H200; docs/kernels-notes.md). float16 keeps more of q's mantissa than bfloat16; q is
clamped to float16's range.

Softmax runs in base 2: scores are multiplied by `scale * log2(e)` and exponentiated with
`exp2`. Running maxima start at -1e30 rather than -inf, so a row (or split) that sees no key
keeps finite state (max -1e30, sum 0) and is written as zeros instead of NaN.

Nothing here launches a kernel; `triton_attn` does. Importing this module compiles nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.kernels.torch_ref import FP8_MAX

__all__ = [
    "decode_reduce_kernel",
    "decode_split_kernel",
    "prefill_kernel",
    "store_kv_kernel",
    "to_cache",
]

# Finite "minus infinity" for running maxima (see the module docstring).
_NEG_BIG = tl.constexpr(-1.0e30)

_FP8_MAX = tl.constexpr(FP8_MAX)  # larger magnitudes are stored as it
_FP16_MAX = tl.constexpr(torch.finfo(torch.float16).max)


@triton.jit
def _dot_operand(q, FP16_DOTS: tl.constexpr):
    """q as the attention dots take it (see FP16_DOTS in the module docstring)."""
    if FP16_DOTS:
        q = tl.minimum(tl.maximum(q.to(tl.float32), -_FP16_MAX), _FP16_MAX).to(tl.float16)
    return q


@triton.jit
def to_cache(x, cache_ptr, KV_FP8: tl.constexpr):
    """`x` in the cache's dtype (clamped to float8's range first when the cache is float8)."""
    if KV_FP8:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -_FP8_MAX), _FP8_MAX)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """One program per token: copy its [Hkv, D] key and value rows to its cache slot."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # CUDA-graph padding
        return
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < NUM_KV_HEADS)[:, None]
    cache_off = (
        (slot // PAGE_SIZE) * stride_c_block
        + (slot % PAGE_SIZE) * stride_c_slot
        + heads[:, None] * stride_c_head
        + dims[None, :]
    )
    k_off = token * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :]
    v_off = token * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :]
    k = tl.load(k_ptr + k_off, mask=mask)
    v = tl.load(v_ptr + v_off, mask=mask)
    tl.store(k_cache_ptr + cache_off, to_cache(k, k_cache_ptr, KV_FP8), mask=mask)
    tl.store(v_cache_ptr + cache_off, to_cache(v, v_cache_ptr, KV_FP8), mask=mask)


@triton.jit
def _page_offsets(
    table_row_ptr,
    start,
    keys,
    valid,
    head_off,
    stride_c_block,
    stride_c_slot,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """int64 cache offsets of `keys` (one tile) for one KV head, gathered through the table.

    When a page holds a whole tile the page is one scalar load; otherwise each key looks up
    its own page (a tile then spans BLOCK_N // PAGE_SIZE pages).
    """
    if PAGE_SIZE >= BLOCK_N:
        # Tiles start at multiples of BLOCK_N, so a tile never straddles two pages.
        page = tl.load(table_row_ptr + start // PAGE_SIZE).to(tl.int64)
        base = page * stride_c_block
    else:
        page = tl.load(table_row_ptr + keys // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        base = page * stride_c_block
    return base + (keys % PAGE_SIZE).to(tl.int64) * stride_c_slot + head_off


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    k_cache_ptr,
    v_cache_ptr,
    table_row_ptr,
    start,
    key_end,
    visible_end,
    head_off,
    stride_c_block,
    stride_c_slot,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold the keys [start, start + BLOCK_N) into one online-softmax state.

    `q` is [M, D]; row r may see keys < visible_end[r] (CAUSAL) and < key_end. Unmasked tiles
    (MASKED false) must lie wholly inside every row's visible range.
    """
    keys = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    valid = keys < key_end  # only used when MASKED, or in gathers (where it is all true)
    offs = _page_offsets(
        table_row_ptr,
        start,
        keys,
        valid,
        head_off,
        stride_c_block,
        stride_c_slot,
        PAGE_SIZE,
        BLOCK_N,
    )
    if MASKED:
        k = tl.load(k_cache_ptr + offs[None, :] + dims[:, None], mask=valid[None, :], other=0.0)
    else:
        k = tl.load(k_cache_ptr + offs[None, :] + dims[:, None])
    k = k.to(q.dtype)  # a no-op unless the cache is float8
    scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        see = valid[None, :]
        if CAUSAL:
            see = see & (keys[None, :] < visible_end[:, None])
        scores = tl.where(see, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    p = tl.exp2(scores - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_cache_ptr + offs[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
    else:
        v = tl.load(v_cache_ptr + offs[:, None] + dims[None, :])
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["scale_log2", "num_seqs", "num_splits"])
def decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    order_ptr,
    out_ptr,
    part_ml_ptr,
    part_acc_ptr,
    scale_log2,
    num_seqs,
    num_splits,
    stride_q_tok,
    stride_q_head,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_bt_seq,
    stride_o_tok,
    stride_o_head,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    ORDERED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP16_DOTS: tl.constexpr,
):
    """One program per (KV head, split, decode row): attend the row's GQA group of queries
    to one contiguous share of its keys. With ORDERED, the i-th row of the grid is decode
    row `order[i]`, so programs start in that order (longest sequence first).

    Split s covers keys [s * per_split, (s + 1) * per_split) with per_split =
    ceil(seq_len / num_splits) rounded up to BLOCK_N, so the grid never depends on sequence
    lengths (CUDA graphs). Rows past `num_seqs` and splits with no keys write neutral state.
    With SINGLE_SPLIT the normalised output is written directly; otherwise (max, sum) go to
    `part_ml` [rows, Hq, splits, 2] and the unnormalised accumulator to `part_acc`
    [rows, Hq, splits, D] for `decode_reduce_kernel`.
    """
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    # The order lists the decode rows; a decode-only grid may also hold rows past the last
    # sequence (trailing padding tokens), which keep their place.
    if ORDERED:
        row = tl.load(order_ptr + row, mask=row < num_seqs, other=row).to(tl.int64)
    num_q_heads = tl.num_programs(0) * GROUP

    seq_len = tl.load(seq_lens_ptr + row, mask=row < num_seqs, other=0)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + group
    q_off = row * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :]
    q = _dot_operand(tl.load(q_ptr + q_off, mask=(group < GROUP)[:, None], other=0.0), FP16_DOTS)

    m_i = tl.full([GROUP_PAD], _NEG_BIG, tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table_row_ptr = block_tables_ptr + row * stride_bt_seq
    head_off = kv_head.to(tl.int64) * stride_c_head
    # Whole tiles load unmasked; only the last, partial one needs its keys masked.
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for tile_start in range(start, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            table_row_ptr,
            tile_start,
            end,
            end,
            head_off,
            stride_c_block,
            stride_c_slot,
            scale_log2,
            HEAD_DIM,
            PAGE_SIZE,
            BLOCK_N,
            False,
            False,
            DOT_PRECISION,
        )
    if full_end < end:
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            table_row_ptr,
            full_end,
            end,
            end,
            head_off,
            stride_c_block,
            stride_c_slot,
            scale_log2,
            HEAD_DIM,
            PAGE_SIZE,
            BLOCK_N,
            True,
            False,
            DOT_PRECISION,
        )

    head_mask = (group < GROUP)[:, None]
    if SINGLE_SPLIT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_off = row * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=head_mask)
    else:
        part = (row * num_q_heads + heads) * num_splits + split
        tl.store(part_ml_ptr + part * 2, m_i, mask=group < GROUP)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=group < GROUP)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_mask)


@triton.jit(do_not_specialize=["num_splits"])
def decode_reduce_kernel(
    part_ml_ptr,
    part_acc_ptr,
    out_ptr,
    num_splits,
    stride_o_tok,
    stride_o_head,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One program per (query head, decode row): merge the splits' partial softmax states."""
    head = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    present = splits < num_splits
    part = (row * tl.num_programs(0) + head) * num_splits + splits
    m = tl.load(part_ml_ptr + part * 2, mask=present, other=float("-inf"))
    sums = tl.load(part_ml_ptr + part * 2 + 1, mask=present, other=0.0)
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=present[:, None], other=0.0
    )
    weight = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(weight * sums, 0)
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    o_off = row * stride_o_tok + head * stride_o_head + dims
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _find_sequence(cu_q_ptr, tile, first_seq, num_seqs, BLOCK_M: tl.constexpr):
    """The sequence in [first_seq, num_seqs] whose virtual tiles contain `tile`.

    Sequence i owns the virtual tiles starting at cu_q[i] // BLOCK_M + i; those ranges are
    disjoint and increasing, so a binary search finds the last one starting at or before
    `tile`. Index num_seqs stands for the trailing padding tokens, if any.
    """
    lo = first_seq
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        starts_before = tl.load(cu_q_ptr + mid) // BLOCK_M + mid <= tile
        lo = tl.where(starts_before, mid, lo)
        hi = tl.where(starts_before, hi, mid - 1)
    return lo


@triton.jit(do_not_specialize=["scale_log2", "first_seq", "num_seqs", "num_tokens"])
def prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    cu_q_ptr,
    out_ptr,
    scale_log2,
    first_seq,
    num_seqs,
    num_tokens,
    stride_q_tok,
    stride_q_head,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_bt_seq,
    stride_o_tok,
    stride_o_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP16_DOTS: tl.constexpr,
):
    """One program per (query head, virtual query tile): causal varlen attention over the
    paged cache for sequences [first_seq, num_seqs), bottom-right aligned.

    The grid's tile axis has num_tokens // BLOCK_M + num_seqs + 1 entries, enough for every
    sequence's tiles under `_find_sequence`'s numbering; programs that land on no tile exit.
    Tokens after cu_q[num_seqs] (fixed-size padding) are written as zeros.
    """
    head = tl.program_id(0)
    # Highest tiles first: within a sequence they see the most keys, so the light ones fill
    # the tail of the launch.
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = _find_sequence(cu_q_ptr, tile, first_seq, num_seqs, BLOCK_M)
    q_begin = tl.load(cu_q_ptr + seq)
    local_tile = tile - (q_begin // BLOCK_M + seq)
    q_end = tl.load(cu_q_ptr + tl.minimum(seq + 1, num_seqs))
    q_end = tl.where(seq < num_seqs, q_end, num_tokens)
    q_len = q_end - q_begin
    first_row = local_tile * BLOCK_M
    if (local_tile < 0) | (first_row >= q_len):
        return

    seq_len = tl.load(seq_lens_ptr + seq, mask=seq < num_seqs, other=0)
    prefix = seq_len - q_len
    rows = first_row + tl.arange(0, BLOCK_M)
    row_valid = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    tokens = (q_begin + rows).to(tl.int64)
    q_off = tokens[:, None] * stride_q_tok + head * stride_q_head + dims[None, :]
    q = _dot_operand(tl.load(q_ptr + q_off, mask=row_valid[:, None], other=0.0), FP16_DOTS)

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_off = (head // GROUP).to(tl.int64) * stride_c_head
    visible_end = prefix + rows + 1  # row r sees keys < prefix + r + 1
    last_row = tl.minimum(first_row + BLOCK_M, q_len) - 1
    key_end = tl.minimum(seq_len, prefix + last_row + 1)
    # Keys every row of the tile sees need no mask; only the diagonal tiles do.
    full_end = (tl.maximum(prefix + first_row + 1, 0) // BLOCK_N) * BLOCK_N
    for tile_start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            table_row_ptr,
            tile_start,
            key_end,
            visible_end,
            head_off,
            stride_c_block,
            stride_c_slot,
            scale_log2,
            HEAD_DIM,
            PAGE_SIZE,
            BLOCK_N,
            False,
            True,
            DOT_PRECISION,
        )
    for tile_start in range(full_end, key_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            table_row_ptr,
            tile_start,
            key_end,
            visible_end,
            head_off,
            stride_c_block,
            stride_c_slot,
            scale_log2,
            HEAD_DIM,
            PAGE_SIZE,
            BLOCK_N,
            True,
            True,
            DOT_PRECISION,
        )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = tokens[:, None] * stride_o_tok + head * stride_o_head + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
