# Triton kernels take untyped pointers and scalars, and triton.jit is an untyped decorator.
# mypy: disable-error-code="no-untyped-def, untyped-decorator"
"""A fused sampling kernel: penalties + temperature + Gumbel noise + argmax in one pass over
the logits.

It computes exactly the counter-based noise of `asyncllm.layers.sampler.uniform_noise`, so
it draws the same tokens as the torch path (up to float rounding of the logits), without
materialising the [rows, vocab] noise tensor that costs several passes over memory. With
penalties it reads each row's token counts alongside its logits and applies them as
`asyncllm.layers.sampler.apply_penalties` does, instead of writing penalised logits first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from asyncllm.sampling import GREEDY_TEMPERATURE

if TYPE_CHECKING:
    from asyncllm.layers.sampler import PenaltyTensors

__all__ = ["gumbel_argmax"]


@triton.jit
def _mix32(x):
    x = (x ^ (x >> 16)) * 0x7FEB352D
    x = (x ^ (x >> 15)) * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _penalise(logit, row, index, inside, vocab, counts_ptr, prompt_ptr, presence, frequency,
              repetition):  # fmt: skip
    """`apply_penalties` of one block of a row: repetition, then frequency and presence."""
    count = tl.load(counts_ptr + row * vocab + index, mask=inside, other=0)
    in_prompt = tl.load(prompt_ptr + row * vocab + index, mask=inside, other=0)
    generated = count > 0
    repeated = tl.where(logit < 0, logit * repetition, logit / repetition)
    logit = tl.where(generated | (in_prompt != 0), repeated, logit)
    logit = logit - frequency * count.to(tl.float32)
    return logit - presence * generated.to(tl.float32)


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr, stride, temps_ptr, seeds_ptr, offsets_ptr, out_ptr, vocab, greedy_below,
    counts_ptr, prompt_ptr, presence_ptr, frequency_ptr, repetition_ptr,
    PENALISE: tl.constexpr, BLOCK: tl.constexpr,
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
    if PENALISE:
        presence = tl.load(presence_ptr + row)
        frequency = tl.load(frequency_ptr + row)
        repetition = tl.load(repetition_ptr + row)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        index = start + tl.arange(0, BLOCK)
        inside = index < vocab
        logit = tl.load(logits_ptr + row * stride + index, mask=inside, other=float("-inf"))
        logit = logit.to(tl.float32)
        if PENALISE:
            logit = _penalise(logit, row, index, inside, vocab, counts_ptr, prompt_ptr,
                              presence, frequency, repetition)  # fmt: skip
        bits = _mix32(_mix32(key ^ (index.to(tl.uint32) * 0x85EBCA77)) ^ high_key)
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        score = logit / temp - tl.where(greedy, 0.0, tl.log(-tl.log(u)))
        better = score > best  # strict: the first index wins a tie, as torch.argmax
        best = tl.where(better, score, best)
        best_index = tl.where(better, index, best_index)
    top = tl.max(best, axis=0)
    winner = tl.min(tl.where(best == top, best_index, vocab), axis=0)
    tl.store(out_ptr + row, winner.to(tl.int64))


def gumbel_argmax(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    penalties: PenaltyTensors | None = None,
) -> torch.Tensor:
    """One draw per row from softmax(penalised logits / temperature), keyed by (seed,
    offset); rows with temperature 0 (or below `GREEDY_TEMPERATURE`) get the exact argmax of
    their penalised logits."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if not rows:
        return out
    if penalties is None:
        # Unused pointers: any tensor will do, the PENALISE=False kernel never reads them.
        counts = prompt = presence = frequency = repetition = temperatures
    else:
        counts, in_prompt = penalties.counts(rows, vocab)
        prompt = in_prompt.view(torch.uint8)
        presence, frequency, repetition = penalties[:3]
    _gumbel_argmax_kernel[(rows,)](
        logits, logits.stride(0), temperatures, seeds, offsets, out, vocab, GREEDY_TEMPERATURE,
        counts, prompt, presence, frequency, repetition,
        PENALISE=penalties is not None, BLOCK=2048, num_warps=8,
    )  # fmt: skip
    return out
