# Triton kernels take untyped pointers and scalars, and triton.jit is an untyped decorator.
# mypy: disable-error-code="no-untyped-def, untyped-decorator"
"""Fused elementwise kernels for the decoder layer on CUDA.

Unfused, a layer's small ops (RMSNorm with its residual add, q/k RMSNorm, rotary, SiLU-and-mul,
dtype casts) are ~50 kernels of 1-3 us each: at decode batch sizes that is several
milliseconds per step, more than the GEMMs. Each function here does one of those groups in one
pass, computing in float32 and rounding once to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.kernels.triton_attn_kernels import to_cache

__all__ = ["add_rms_norm", "qk_norm_rope", "rms_norm", "silu_and_mul"]


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, stride_x, stride_r, eps, size,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like a torch add
        tl.store(new_residual_ptr + row * size + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x32 * x32, axis=0) / size + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    normed = (x32 * inv).to(x.dtype).to(tl.float32)  # cast before scaling, as transformers
    tl.store(out_ptr + row * size + cols, (normed * w.to(tl.float32)).to(x.dtype), mask=mask)


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
          ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    size = x.shape[-1]
    x2 = x.reshape(-1, size)
    out = torch.empty_like(x2)
    new_residual = torch.empty_like(x2) if residual is not None else None
    r2 = residual.reshape(-1, size) if residual is not None else x2
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, new_residual if new_residual is not None else out,
            x2.stride(0), r2.stride(0), eps, size,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(size),
            num_warps=4 if size <= 2048 else 8,
        )  # fmt: skip
    return out.view(x.shape), None if new_residual is None else new_residual.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dimension."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * RMSNorm(x + residual), x + residual)."""
    out, new_residual = _norm(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, positions_ptr, q_out_ptr, k_out_ptr,
    k_cache_ptr, v_cache_ptr, slot_ptr, stride_qkv, stride_block, stride_slot, stride_head,
    eps, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr, HAS_NORM: tl.constexpr, STORE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HEADS: tl.constexpr, KV_FP8: tl.constexpr,
):  # fmt: skip
    """One token's heads [HEADS * program, HEADS * (program + 1)) of the packed qkv row (q
    heads, then k heads, then v heads, the last only launched with STORE)."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    cols = tl.arange(0, HALF)[None, :]
    last = NUM_Q_HEADS + NUM_KV_HEADS  # one past the last head launched
    if STORE:
        last = last + NUM_KV_HEADS
    valid = head < last
    is_q = head < NUM_Q_HEADS
    is_k = (head >= NUM_Q_HEADS) & (head < NUM_Q_HEADS + NUM_KV_HEADS)
    is_v = (head >= NUM_Q_HEADS + NUM_KV_HEADS) & valid
    src = qkv_ptr + token * stride_qkv + head[:, None] * HEAD_DIM + cols
    lo = tl.load(src, mask=valid[:, None], other=0.0)
    hi = tl.load(src + HALF, mask=valid[:, None], other=0.0)
    dtype = lo.dtype
    lo32, hi32 = lo.to(tl.float32), hi.to(tl.float32)
    if HAS_NORM:
        squares = tl.sum(lo32 * lo32, axis=1) + tl.sum(hi32 * hi32, axis=1)
        inv = tl.rsqrt(squares / HEAD_DIM + eps)[:, None]
        q_w = is_q[:, None]
        w_lo = tl.where(q_w, tl.load(q_weight_ptr + cols), tl.load(k_weight_ptr + cols))
        w_hi = tl.where(q_w, tl.load(q_weight_ptr + HALF + cols),
                        tl.load(k_weight_ptr + HALF + cols))  # fmt: skip
        lo32 = ((lo32 * inv).to(dtype).to(tl.float32) * w_lo.to(tl.float32)).to(dtype)
        hi32 = ((hi32 * inv).to(dtype).to(tl.float32) * w_hi.to(tl.float32)).to(dtype)
        lo32, hi32 = lo32.to(tl.float32), hi32.to(tl.float32)
    position = tl.load(positions_ptr + token)
    cos = tl.load(cos_ptr + position * HEAD_DIM + cols).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + position * HEAD_DIM + cols).to(dtype).to(tl.float32)
    out_lo = (lo32 * cos - hi32 * sin).to(dtype)
    out_hi = (hi32 * cos + lo32 * sin).to(dtype)
    q_dst = q_out_ptr + (token * NUM_Q_HEADS + head[:, None]) * HEAD_DIM + cols
    tl.store(q_dst, out_lo, mask=is_q[:, None])
    tl.store(q_dst + HALF, out_hi, mask=is_q[:, None])
    k_dst = k_out_ptr + (token * NUM_KV_HEADS + head[:, None] - NUM_Q_HEADS) * HEAD_DIM + cols
    tl.store(k_dst, out_lo, mask=is_k[:, None])
    tl.store(k_dst + HALF, out_hi, mask=is_k[:, None])
    if STORE:  # k (rotated) and v (as is) to this token's cache slot; slot < 0: padding
        slot = tl.load(slot_ptr + token).to(tl.int64)
        kv_head = (head - NUM_Q_HEADS) % NUM_KV_HEADS
        cached = (slot // PAGE_SIZE) * stride_block + (slot % PAGE_SIZE) * stride_slot
        cached = cached + kv_head[:, None] * stride_head + cols
        keep_k = (is_k & (slot >= 0))[:, None]
        keep_v = (is_v & (slot >= 0))[:, None]
        tl.store(k_cache_ptr + cached, to_cache(out_lo, k_cache_ptr, KV_FP8), mask=keep_k)
        tl.store(k_cache_ptr + cached + HALF, to_cache(out_hi, k_cache_ptr, KV_FP8), mask=keep_k)
        tl.store(v_cache_ptr + cached, to_cache(lo, v_cache_ptr, KV_FP8), mask=keep_v)
        tl.store(v_cache_ptr + cached + HALF, to_cache(hi, v_cache_ptr, KV_FP8), mask=keep_v)


def _qk_launch(tokens: int) -> tuple[int, int]:
    """(heads per program, warps) of the q/k kernel. One head a program left it latency-bound
    at 256 tokens (6.8 us a layer on the H200; 3.6 us with 4 heads), while at one token four
    heads a program were slower (1.9 vs 1.7 us): measured with benchmarks/profile_step.py."""
    return (4, 2) if tokens >= 64 else (1, 1)


def qk_norm_rope(
    qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
    cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-head RMSNorm then rotary of the q and k parts of a packed qkv [T, (Hq+2Hkv)*D];
    rotary alone when the norm weights are None (models without q/k norm).

    `cos`/`sin` are [max_position, D] tables (float32); returns contiguous q [T, Hq, D] and
    k [T, Hkv, D]. With `kv_cache` = (k_cache, v_cache, slot_mapping) it also writes each
    token's rotated k and its v to the paged cache [blocks, page, Hkv, D] at its slot (slots
    < 0 skipped; a float8 cache gets them clamped to its range), as
    `AttentionBackend.forward` would otherwise do in a kernel of its own.
    """
    has_norm = q_weight is not None and k_weight is not None
    if not has_norm:
        q_weight = k_weight = cos  # never read: any pointer will do
    tokens = qkv.shape[0]
    q = torch.empty(tokens, num_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(tokens, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if kv_cache is None:
        k_cache = v_cache = slots = q  # never read: any pointer will do
        strides: tuple[int, ...] = (0, 0, 0)
        page = 1
    else:
        k_cache, v_cache, slots = kv_cache
        if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
            raise ValueError("k_cache and v_cache must share one layout, rows contiguous")
        strides, page = k_cache.stride()[:3], k_cache.shape[1]
    heads = num_q_heads + num_kv_heads * (1 if kv_cache is None else 2)
    if tokens:
        per_program, warps = _qk_launch(tokens)
        _qk_norm_rope_kernel[(tokens, triton.cdiv(heads, per_program))](
            qkv, q_weight, k_weight, cos, sin, positions, q, k, k_cache, v_cache, slots,
            qkv.stride(0), *strides, eps, NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim, HALF=head_dim // 2, HAS_NORM=has_norm,
            STORE=kv_cache is not None, PAGE_SIZE=page, HEADS=per_program,
            KV_FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=warps,
        )  # fmt: skip
    return q, k


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, size, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + size + cols, mask=mask, other=0.0)
    g32 = gate.to(tl.float32)
    # silu rounded to the dtype first, then the product: the two torch ops' roundings.
    silu = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * size + cols, (silu * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for x [..., 2d]."""
    size = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * size)
    out = torch.empty(x2.shape[0], size, dtype=x.dtype, device=x.device)
    block = 1024
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(size, block))](
            x2, out, x2.stride(0), size, BLOCK=block, num_warps=4
        )
    return out.view(*x.shape[:-1], size)
