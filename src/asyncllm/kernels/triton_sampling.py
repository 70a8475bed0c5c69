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

from asyncllm.kernels import sm_count
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
    logits_ptr, stride, temps_ptr, seeds_ptr, offsets_ptr, best_ptr, index_ptr, vocab, chunk,
    greedy_below, counts_ptr, prompt_ptr, presence_ptr, frequency_ptr, repetition_ptr,
    PENALISE: tl.constexpr, ALL_GREEDY: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The best (score, index) of one row's slice [part * chunk, (part + 1) * chunk)."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    if not ALL_GREEDY:
        seed = tl.load(seeds_ptr + row)
        offset = tl.load(offsets_ptr + row)
        temp = tl.load(temps_ptr + row)
        # Argmax of the raw logits, no noise, no scaling: temperature 0, and temperatures so
        # small that logit / temperature would overflow float32.
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
    begin = part * chunk
    end = tl.minimum(begin + chunk, vocab)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)  # 0 when nothing beats -inf, as torch.argmax
    for start in range(begin, end, BLOCK):
        index = start + tl.arange(0, BLOCK)
        inside = index < end
        logit = tl.load(logits_ptr + row * stride + index, mask=inside, other=float("-inf"))
        score = logit.to(tl.float32)
        if PENALISE:
            score = _penalise(score, row, index, inside, vocab, counts_ptr, prompt_ptr,
                              presence, frequency, repetition)  # fmt: skip
        if not ALL_GREEDY:
            bits = _mix32(_mix32(key ^ (index.to(tl.uint32) * 0x85EBCA77)) ^ high_key)
            u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            score = score / temp - tl.where(greedy, 0.0, tl.log(-tl.log(u)))
        better = score > best  # strict: the first index wins a tie, as torch.argmax
        best = tl.where(better, score, best)
        best_index = tl.where(better, index, best_index)
    top = tl.max(best, axis=0)
    winner = tl.min(tl.where(best == top, best_index, vocab), axis=0)
    at = row * tl.num_programs(1) + part
    tl.store(best_ptr + at, top)
    tl.store(index_ptr + at, winner)


@triton.jit(do_not_specialize=["parts"])
def _argmax_of_parts_kernel(best_ptr, index_ptr, out_ptr, parts, vocab, PARTS: tl.constexpr):
    """A row's winner over its slices: the best score, the lowest index among equals.

    `parts` changes with the number of rows; PARTS (a bound on it) depends on the vocabulary
    only, so neither compiles a new variant mid-run (each compile stalled a step ~50 ms).
    """
    row = tl.program_id(0)
    i = tl.arange(0, PARTS)
    inside = i < parts
    best = tl.load(best_ptr + row * parts + i, mask=inside, other=float("-inf"))
    index = tl.load(index_ptr + row * parts + i, mask=inside, other=vocab)
    top = tl.max(best, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, index, vocab), axis=0).to(tl.int64))


def gumbel_argmax(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    penalties: PenaltyTensors | None = None,
    all_greedy: bool = False,
) -> torch.Tensor:
    """One draw per row from softmax(penalised logits / temperature), keyed by (seed,
    offset); rows with temperature 0 (or below `GREEDY_TEMPERATURE`) get the exact argmax of
    their penalised logits. `all_greedy` (every row greedy) skips the noise altogether.

    Each row's vocabulary is cut into slices, enough of them to fill the GPU with a few
    rows (one program a row left most SMs idle: 100 us for one row of 152k logits); a
    second kernel picks each row's winner among its slices.
    """
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
    chunk, parts = _slices(rows, vocab, logits.device)
    best = torch.empty(rows, parts, dtype=torch.float32, device=logits.device)
    index = torch.empty(rows, parts, dtype=torch.int32, device=logits.device)
    _gumbel_argmax_kernel[(rows, parts)](
        logits, logits.stride(0), temperatures, seeds, offsets, best, index, vocab, chunk,
        GREEDY_TEMPERATURE, counts, prompt, presence, frequency, repetition,
        PENALISE=penalties is not None, ALL_GREEDY=all_greedy, BLOCK=_BLOCK, num_warps=8,
    )  # fmt: skip
    most_parts = triton.cdiv(vocab, _BLOCK)  # one block per slice
    _argmax_of_parts_kernel[(rows,)](
        best, index, out, parts, vocab, PARTS=triton.next_power_of_2(most_parts), num_warps=1
    )
    return out


_BLOCK = 2048
_PROGRAMS_PER_SM = 4


def _slices(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(slice length, slices per row): about `_PROGRAMS_PER_SM` programs per SM in all, each
    slice a whole number of blocks. A function of the shape and device only (graphs)."""
    blocks = triton.cdiv(vocab, _BLOCK)
    wanted = triton.cdiv(_PROGRAMS_PER_SM * sm_count(device), rows)
    chunk = triton.cdiv(blocks, max(1, min(blocks, wanted))) * _BLOCK
    return chunk, triton.cdiv(vocab, chunk)
