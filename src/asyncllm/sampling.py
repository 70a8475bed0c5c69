"""`SamplingParams`: how one request picks its tokens and when it stops."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from asyncllm.errors import InvalidRequestError

__all__ = ["SamplingParams"]

MAX_LOGPROBS = 20


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

    @property
    def is_greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0)."""
        return self.temperature == 0.0


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
