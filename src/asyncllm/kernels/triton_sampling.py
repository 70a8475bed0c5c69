# Triton kernels take untyped pointers and scalars, and triton.jit is an untyped decorator.
# mypy: disable-error-code="no-untyped-def, untyped-decorator"
"""A fused sampling kernel: temperature + Gumbel noise + argmax in one pass over the logits.

It computes exactly the counter-based noise of `asyncllm.layers.sampler.uniform_noise`, so
it draws the same tokens as the torch path (up to float rounding of the logits), without
materialising the [rows, vocab] noise tensor that costs several passes over memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.sampling import GREEDY_TEMPERATURE

__all__ = ["gumbel_argmax"]


@triton.jit
def _mix32(x):
    x = (x ^ (x >> 16)) * 0x7FEB352D
    x = (x ^ (x >> 15)) * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr, stride, temps_ptr, seeds_ptr, offsets_ptr, out_ptr, vocab, greedy_below,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    seed = tl.load(seeds_ptr + row)
    offset = tl.load(offsets_ptr + row)
    temp = tl.load(temps_ptr + row)
    # Argmax of the raw logits, no noise, no scaling: temperature 0, and temperatures so small
    # that logit / temperature would overflow float32.
    greedy = temp < greedy_below
    temp = tl.where(greedy, 1.0, temp)
    low = _mix32((seed & 0xFFFFFFFF).to(tl.uint32))
    high = _mix32(((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    salt = _mix32(((offset * 0x9E3779B1 + 0x632BE5AB) & 0xFFFFFFFF).to(tl.uint32))
    key = _mix32(low ^ salt)
    high_key = key ^ high
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        index = start + tl.arange(0, BLOCK)
        inside = index < vocab
        logit = tl.load(logits_ptr + row * stride + index, mask=inside, other=float("-inf"))
        bits = _mix32(_mix32(key ^ (index.to(tl.uint32) * 0x85EBCA77)) ^ high_key)
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        score = logit.to(tl.float32) / temp - tl.where(greedy, 0.0, tl.log(-tl.log(u)))
        better = score > best  # strict: the first index wins a tie, as torch.argmax
        best = tl.where(better, score, best)
        best_index = tl.where(better, index, best_index)
    top = tl.max(best, axis=0)
    winner = tl.min(tl.where(best == top, best_index, vocab), axis=0)
    tl.store(out_ptr + row, winner.to(tl.int64))


def gumbel_argmax(
    logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """One draw per row from softmax(logits / temperature), keyed by (seed, offset); rows
    with temperature 0 (or below `GREEDY_TEMPERATURE`) get their exact argmax."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _gumbel_argmax_kernel[(rows,)](
            logits, logits.stride(0), temperatures, seeds, offsets, out, vocab,
            GREEDY_TEMPERATURE, BLOCK=2048, num_warps=8,
        )  # fmt: skip
    return out
