"""Vectorised sampling: penalties, greedy, temperature, top-k, top-p, min-p, per-request seeds,
logprobs.

Randomness comes from a counter-based hash of (request seed, output index, token id) rather
than a stateful generator, so a request's tokens depend only on its own seed and logits:
the same seed gives the same tokens whatever else shares the batch, and a preempted request
resumes with the tokens it would have drawn anyway.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from asyncllm.sampling import GREEDY_TEMPERATURE

__all__ = [
    "PenaltyTensors",
    "Sampler",
    "SamplerOutput",
    "SamplingTensors",
    "apply_penalties",
    "uniform_noise",
]

_MASK32 = 0xFFFFFFFF


class PenaltyTensors(NamedTuple):
    """Per-row presence / frequency / repetition penalties, and the tokens they apply to.

    Only built for steps where some row has a penalty (rows without one carry the neutral
    0, 0, 1). Token occurrences travel as flat (row, token id) pairs; the sampler turns them
    into dense [S, V] counts with one scatter.
    """

    presence: torch.Tensor  # [S] float32; 0 = off
    frequency: torch.Tensor  # [S] float32; 0 = off
    repetition: torch.Tensor  # [S] float32; 1 = off
    output_rows: torch.Tensor  # [M] int64: one (row, token) pair per generated token so far
    output_tokens: torch.Tensor  # [M] int64
    prompt_rows: torch.Tensor  # [P] int64: (row, token) pairs of prompt tokens (repetition)
    prompt_tokens: torch.Tensor  # [P] int64
    pending_index: torch.Tensor  # [K] int64: entries of output_tokens still on the device...
    pending_src: torch.Tensor  # [K] int64: ...filled from these rows of the previous step

    def counts(self, rows: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, V] int32 count of each token among each row's generated tokens, and the
        [S, V] bool mask of tokens in each row's prompt."""
        device = self.presence.device
        counts = torch.zeros(rows, vocab, dtype=torch.int32, device=device)
        ones = torch.ones_like(self.output_tokens, dtype=torch.int32)
        counts.index_put_((self.output_rows, self.output_tokens), ones, accumulate=True)
        in_prompt = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        in_prompt[self.prompt_rows, self.prompt_tokens] = True
        return counts, in_prompt


class SamplingTensors(NamedTuple):
    """Per-row sampling parameters on the logits' device (one row per sampled sequence)."""

    temperatures: torch.Tensor  # [S] float32; below GREEDY_TEMPERATURE (e.g. 0) = greedy
    top_k: torch.Tensor  # [S] int64; 0 = off
    top_p: torch.Tensor  # [S] float32; 1 = off
    min_p: torch.Tensor  # [S] float32; 0 = off
    seeds: torch.Tensor  # [S] int64 holding the 64 bits of a seed in [0, 2**64)
    offsets: torch.Tensor  # [S] int64: index of the output token being drawn
    banned_rows: torch.Tensor  # [N] int64: (row, token) pairs masked out (min_tokens)
    banned_tokens: torch.Tensor  # [N] int64
    all_greedy: bool
    any_top_k_top_p: bool
    any_min_p: bool
    num_logprobs: int  # most top-n asked for by any row; -1 = none asked
    penalties: PenaltyTensors | None = None  # None: no row of the step has a penalty


class SamplerOutput(NamedTuple):
    """Sampled tokens, plus log-probabilities when some row asked for them."""

    token_ids: torch.Tensor  # [S] int64
    logprobs: torch.Tensor | None  # [S] logprob of each sampled token
    top_ids: torch.Tensor | None  # [S, n]
    top_logprobs: torch.Tensor | None  # [S, n]


class Sampler(nn.Module):
    """Turns logits [S, V] into one token per row under per-row `SamplingTensors`."""

    def forward(self, logits: torch.Tensor, params: SamplingTensors) -> SamplerOutput:
        model_logits = logits  # logprobs report the model's distribution, before any ban
        # or penalty
        if params.banned_rows.numel():
            logits = logits.clone()  # the logits may be a CUDA graph's output buffer
            logits[params.banned_rows, params.banned_tokens] = float("-inf")
        if logits.is_cuda and not (params.any_top_k_top_p or params.any_min_p):
            # One fused pass over the logits serves greedy and temperature rows alike (and
            # applies the penalties on the fly).
            from asyncllm.kernels.triton_sampling import gumbel_argmax

            tokens = gumbel_argmax(
                logits, params.temperatures, params.seeds, params.offsets, params.penalties,
                params.all_greedy,
            )  # fmt: skip
        else:
            if params.penalties is not None:
                logits = apply_penalties(logits, params.penalties)
            logits = logits.float()
            greedy = logits.argmax(dim=-1)
            if params.all_greedy:
                tokens = greedy
            else:
                is_greedy = params.temperatures < GREEDY_TEMPERATURE
                tokens = torch.where(is_greedy, greedy, _sample(logits, params))
        if params.num_logprobs < 0:
            return SamplerOutput(tokens, None, None, None)
        # Logprobs of the model's own distribution (before penalties, temperature, filters
        # and the min_tokens bans), as in vLLM: a banned EOS must not inflate every other token's.
        logp = torch.log_softmax(model_logits.float(), dim=-1)
        # A vocabulary smaller than the top-n asked for gives all of it, not a topk error.
        top_logprobs, top_ids = logp.topk(min(params.num_logprobs, logp.shape[-1]), dim=-1)
        chosen = logp.gather(1, tokens[:, None]).squeeze(1)
        return SamplerOutput(tokens, chosen, top_ids, top_logprobs)


def apply_penalties(logits: torch.Tensor, penalties: PenaltyTensors) -> torch.Tensor:
    """float32 logits with each row's penalties applied (a new tensor).

    Repetition first (HF / vLLM): a token seen in the prompt or the output has its logit
    divided by the penalty when positive, multiplied when negative. Then OpenAI's frequency
    and presence penalties: minus frequency * count, minus presence once if count > 0, over
    the generated tokens only. Rows with neutral values come out bit-identical.
    """
    counts, in_prompt = penalties.counts(logits.shape[0], logits.shape[1])
    logits = logits.float()
    generated = counts > 0
    repetition = penalties.repetition[:, None]
    repeated = torch.where(logits < 0, logits * repetition, logits / repetition)
    logits = torch.where(in_prompt | generated, repeated, logits)
    logits = logits - penalties.frequency[:, None] * counts
    return logits - penalties.presence[:, None] * generated


def _sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    # Greedy rows (temperature below GREEDY_TEMPERATURE) are replaced by their argmax; dividing
    # by 1 keeps their scores finite meanwhile.
    temperatures = torch.where(params.temperatures < GREEDY_TEMPERATURE, 1.0, params.temperatures)
    scores = logits / temperatures[:, None]
    if params.any_top_k_top_p:
        scores = _top_k_top_p(scores, params.top_k, params.top_p)
    if params.any_min_p:
        probs = scores.softmax(dim=-1)
        threshold = params.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        scores = scores.masked_fill(probs < threshold, float("-inf"))
    # Gumbel-max: argmax(score + Gumbel noise) is a draw from softmax(score).
    u = uniform_noise(params.seeds, params.offsets, scores.shape[1])
    return (scores - torch.log(-torch.log(u))).argmax(dim=-1)


def _top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k, then top-p (over the top-k survivors), removes."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    rank = torch.arange(scores.shape[1], device=scores.device)
    k = torch.where(top_k > 0, top_k, scores.shape[1])
    sorted_scores = sorted_scores.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    probs = sorted_scores.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Keep a token while the mass before it is under top_p. The first token is always kept
    # (a top_p of 1e-50 is 0 in float32, and mass 0 >= 0 would drop every token), and a row
    # with top_p 1 keeps all (a float32 cumsum can round past 1.0 in the tail).
    drop = (mass_before >= top_p[:, None]) & (rank[None, :] > 0) & (top_p[:, None] < 1.0)
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.empty_like(scores).scatter_(1, order, sorted_scores)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply), on int64 holding values < 2**32."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, offsets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[S, V] float32 uniforms in (0, 1), a pure function of (seed, offset, token id).

    Both 32-bit halves of a 64-bit seed key the stream: the low half as it always did, the
    high half through a second key (0 when the high half is 0, so seeds below 2**32 keep their
    streams), so no two seeds share a stream (seed 0 and 2**32 + 1 used to).
    23 bits of the hash: the largest value, 1 - 2**-24, is still below 1 in float32, so the
    Gumbel transform never sees log(1) = 0.
    """
    seeds = seeds.long()
    # `>>` on int64 is arithmetic, but the mask keeps exactly the high 32 bits either way.
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    key = _mix32(_mix32(low) ^ _mix32((offsets.long() * 0x9E3779B1 + 0x632BE5AB) & _MASK32))
    high_key = (key ^ _mix32(high))[:, None]
    tokens = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _mix32(_mix32((key[:, None] ^ (tokens[None, :] * 0x85EBCA77)) & _MASK32) ^ high_key)
    return ((bits >> 9).float() + 0.5) * 2.0**-23
