"""`SamplingParams`: how one request picks its tokens and when it stops."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from asyncllm.errors import InvalidRequestError

__all__ = ["SamplingParams"]

MAX_LOGPROBS = 20
MAX_N = 128
MAX_PRESENCE_FREQUENCY_PENALTY = 2.0


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling and stopping rules of one request, validated when built.

    Example:
        >>> SamplingParams(max_tokens=32, temperature=0.0).is_greedy
        True
        >>> SamplingParams(temperature=-1)
        Traceback (most recent call last):
        ...
        asyncllm.errors.InvalidRequestError: temperature must be a finite number >= 0, got -1
    """

    max_tokens: int | None = None
    """Most tokens to generate; None runs until a stop condition or `max_model_len`."""
    temperature: float = 1.0
    """0 means greedy (exact argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability mass reaches top_p."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is batched."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on the decoded text; the stop string is not returned."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the request (besides the model's EOS)."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS tokens."""
    min_tokens: int = 0
    """No stop condition applies before this many tokens are generated."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token and of the top-n alternatives."""
    n: int = 1
    """Independent choices (completions) to generate for the prompt, 1..128. They share the
    prompt's KV blocks through the prefix cache; with a seed, choice i draws from a seed
    derived from (seed, i), so every choice differs and each is reproducible."""
    presence_penalty: float = 0.0
    """In [-2, 2]: subtracted from the logit of every token generated at least once so far
    (OpenAI semantics; > 0 favours new tokens)."""
    frequency_penalty: float = 0.0
    """In [-2, 2]: subtracted from each token's logit once per time it was generated so far
    (OpenAI semantics; > 0 discourages verbatim repetition)."""
    repetition_penalty: float = 1.0
    """> 0: logits of tokens seen in the prompt or the output so far are divided by it when
    positive and multiplied by it when negative (HF / vLLM semantics); 1 is off."""

    def __post_init__(self) -> None:
        # Callers may pass one string or any iterable; store tuples (hashable, truly frozen).
        object.__setattr__(self, "stop", _as_tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        if self.max_tokens is not None and not _is_int(self.max_tokens, minimum=1):
            _bad("max_tokens must be an int >= 1 or None", self.max_tokens)
        if not _is_number(self.temperature) or self.temperature < 0:
            _bad("temperature must be a finite number >= 0", self.temperature)
        if not _is_int(self.top_k, minimum=0):
            _bad("top_k must be an int >= 0 (0 disables it)", self.top_k)
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            _bad("top_p must be in (0, 1]", self.top_p)
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            _bad("min_p must be in [0, 1]", self.min_p)
        if self.seed is not None and not _is_int(self.seed, minimum=0):
            _bad("seed must be an int >= 0 or None", self.seed)
        if not all(isinstance(s, str) and s for s in self.stop):
            _bad("stop must hold non-empty strings", self.stop)
        if not all(_is_int(t, minimum=0) for t in self.stop_token_ids):
            _bad("stop_token_ids must hold ints >= 0", self.stop_token_ids)
        if not _is_int(self.min_tokens, minimum=0):
            _bad("min_tokens must be an int >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _bad(f"min_tokens must not exceed max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and not (
            _is_int(self.logprobs, minimum=0) and self.logprobs <= MAX_LOGPROBS
        ):
            _bad(f"logprobs must be an int in [0, {MAX_LOGPROBS}] or None", self.logprobs)
        self._validate_penalties_and_n()

    def _validate_penalties_and_n(self) -> None:
        if not (_is_int(self.n, minimum=1) and self.n <= MAX_N):
            _bad(f"n must be an int in [1, {MAX_N}]", self.n)
        limit = MAX_PRESENCE_FREQUENCY_PENALTY
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -limit <= value <= limit:
                _bad(f"{name} must be a number in [{-limit}, {limit}]", value)
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            _bad("repetition_penalty must be a finite number > 0", self.repetition_penalty)

    @property
    def is_greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """True when any of presence, frequency or repetition penalty is on."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _as_tuple(value: object) -> tuple[Any, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        return tuple(value)
    raise InvalidRequestError(f"expected a sequence, got {value!r}")


def _is_int(value: object, *, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bad(message: str, value: object) -> None:
    raise InvalidRequestError(f"{message}, got {value!r}")
