"""What the engine hands back: streamed tokens, final outputs, usage, metrics and stats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = [
    "CompletionChoice",
    "EngineStats",
    "FinishReason",
    "RequestMetrics",
    "RequestOutput",
    "StreamToken",
    "TokenLogprobs",
    "Usage",
]

FinishReason = Literal["stop", "length", "abort"]


class TokenLogprobs(NamedTuple):
    """Log-probability of a sampled token and of the top-n alternatives (most likely first)."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(slots=True)  # not frozen: it is built for every token, and frozen costs 4x
class StreamToken:
    """One generated token as `engine.stream()` yields it (treat it as read-only).

    `text` is the newly decoded text this token completes; it may be "" (half of a
    multi-byte character, or text held back while it could still be part of a stop string).
    Concatenating every `text` of a request gives exactly its final text.
    """

    token_id: int
    text: str
    index: int
    """Position among the request's generated tokens (0-based)."""
    logprobs: TokenLogprobs | None = None
    finish_reason: FinishReason | None = None
    """Set on the last token of its choice."""
    choice: int = 0
    """Which of the request's `SamplingParams.n` choices this token belongs to (`index`
    counts positions within that choice)."""


class Usage(NamedTuple):
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    """Prompt tokens whose KV came from the prefix cache instead of being computed."""


class RequestMetrics(NamedTuple):
    """Timings of a request in seconds (monotonic clock)."""

    arrival_time: float
    queue_time: float
    """From submission to the first step that computed any of its tokens."""
    ttft: float | None
    """Time to first token, from submission; None if no token was produced."""
    itl: tuple[float, ...]
    """Gaps between consecutive tokens."""
    e2e_latency: float
    num_preemptions: int


class CompletionChoice(NamedTuple):
    """One of the `SamplingParams.n` completions of a request."""

    # Named as in OpenAI's API; it shadows tuple.index, which nobody calls on a result.
    index: int  # type: ignore[assignment]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprobs] | None = None


class RequestOutput(NamedTuple):
    """The final result of a request, as `engine.generate()` returns it.

    `token_ids`, `text`, `finish_reason` and `logprobs` are those of choice 0; `choices`
    holds every choice (one for n=1). `usage.completion_tokens` counts the tokens of all
    choices; `usage.cached_tokens` and `metrics` describe choice 0 (which computes the
    prompt; the other choices reuse its KV), except `metrics.e2e_latency`, which runs to the
    last choice's end, and `metrics.num_preemptions`, which sums over the choices.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    metrics: RequestMetrics
    logprobs: list[TokenLogprobs] | None = None
    choices: tuple[CompletionChoice, ...] = ()


class EngineStats(NamedTuple):
    """A snapshot of the engine's state, as `engine.stats()` returns it."""

    running: int
    waiting: int
    """Sequences waiting for admission (each of a request's n choices counts)."""
    kv_blocks_total: int
    kv_blocks_free: int
    """Blocks holding nothing reusable."""
    kv_blocks_cached: int
    """Unreferenced blocks whose content the prefix cache can still reuse (evicted LRU)."""
    prefix_cache_queries: int
    """Prompt tokens looked up in the prefix cache."""
    prefix_cache_hit_tokens: int
    num_steps: int
    """Forward passes run (each step of a multi-step decode run counts)."""
    num_preemptions: int
    num_finished: int
    prompt_tokens_total: int
    """Prompt tokens of every request admitted so far."""
    generated_tokens_total: int
    """Tokens generated so far, over all requests."""
    uptime_s: float
    attention_backend: str
    step_seconds: dict[str, float]
    """Wall seconds the engine loop spent per phase: "schedule", "prepare" (inputs to the
    device), "launch" (enqueue the step), "wait" (for the device), "process" (tokens to
    streams)."""
    num_rejected_overloaded: int = 0
    """Submissions refused with `EngineOverloadedError` (the waiting queue was full)."""

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks held by requests (cached blocks count as free)."""
        used = self.kv_blocks_total - self.kv_blocks_free - self.kv_blocks_cached
        return used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens served by the prefix cache."""
        queries = self.prefix_cache_queries
        return self.prefix_cache_hit_tokens / queries if queries else 0.0

    @property
    def steps_per_second(self) -> float:
        """Average engine steps per second since start."""
        return self.num_steps / self.uptime_s if self.uptime_s > 0 else 0.0
