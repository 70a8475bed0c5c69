"""Vectorised sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

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

__all__ = ["Sampler", "SamplerOutput", "SamplingTensors", "uniform_noise"]

_MASK32 = 0xFFFFFFFF


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
        if params.banned_rows.numel():
            logits = logits.clone()  # the logits may be a CUDA graph's output buffer
            logits[params.banned_rows, params.banned_tokens] = float("-inf")
        if logits.is_cuda and not (params.any_top_k_top_p or params.any_min_p):
            # One fused pass over the logits serves greedy and temperature rows alike.
            from asyncllm.kernels.triton_sampling import gumbel_argmax

            tokens = gumbel_argmax(logits, params.temperatures, params.seeds, params.offsets)
        else:
            logits = logits.float()
            greedy = logits.argmax(dim=-1)
            if params.all_greedy:
                tokens = greedy
            else:
                is_greedy = params.temperatures < GREEDY_TEMPERATURE
                tokens = torch.where(is_greedy, greedy, _sample(logits, params))
        if params.num_logprobs < 0:
            return SamplerOutput(tokens, None, None, None)
        # Logprobs of the model's own distribution (before temperature, filters and the
        # min_tokens bans), as in vLLM: a banned EOS must not inflate every other token's.
        logp = torch.log_softmax(model_logits.float(), dim=-1)
        # A vocabulary smaller than the top-n asked for gives all of it, not a topk error.
        top_logprobs, top_ids = logp.topk(min(params.num_logprobs, logp.shape[-1]), dim=-1)
        chosen = logp.gather(1, tokens[:, None]).squeeze(1)
        return SamplerOutput(tokens, chosen, top_ids, top_logprobs)


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
