"""`SamplingParams`: how one request picks its tokens and when it stops."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from asyncllm.errors import InvalidRequestError
from asyncllm.validation import MAX_INT32, MAX_SEED, as_finite_float, as_int, show_bound

__all__ = ["GREEDY_TEMPERATURE", "MAX_LOGPROBS", "SamplingParams"]

MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this pick the argmax, as temperature 0 does: dividing logits by a tinier
temperature overflows float32 (1e-38 would make every positive logit +inf), and the draw it
stands for is the argmax in all but exact ties anyway."""
MAX_N = 128
MAX_PRESENCE_FREQUENCY_PENALTY = 2.0


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling and stopping rules of one request, validated when built.

    Every field is checked for its type and range (booleans are not accepted as numbers, nor
    numbers as booleans); a bad value raises `InvalidRequestError` naming the field and value.
    Integer-like values (e.g. numpy ints) are stored as plain ints, real numbers as floats.

    Stop rules and `min_tokens`: until `min_tokens` tokens have been generated, nothing ends
    the request: EOS and `stop_token_ids` cannot be drawn, and stop strings do not count. From
    then on, a stop string ends the request at the first occurrence that ends in the text of
    token number `min_tokens` or later (an occurrence may start earlier); occurrences that end
    earlier are ordinary text, whatever other stop strings are listed.

    Example:
        >>> SamplingParams(max_tokens=32, temperature=0.0).is_greedy
        True
        >>> SamplingParams(temperature=-1)
        Traceback (most recent call last):
        ...
        asyncllm.errors.InvalidRequestError: temperature must be a finite number >= 0, got -1
    """

    max_tokens: int | None = None
    """Most tokens to generate (at most 2**31 - 1); None runs until a stop condition or
    `max_model_len`."""
    temperature: float = 1.0
    """0 means greedy (exact argmax); so does any temperature below `GREEDY_TEMPERATURE`."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all (as does any k >= the vocabulary)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability mass reaches top_p; the most likely
    token is always kept, however small top_p is."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    seed: int | None = None
    """Per-request seed in [0, 2**64): the same seed gives the same tokens whatever else is
    batched."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on the decoded text; the stop string is not returned."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the request (besides the model's EOS)."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS tokens."""
    min_tokens: int = 0
    """No stop condition applies before this many tokens are generated (see above)."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token and of the top-n alternatives, from
    the model's own distribution (before temperature, filters and min_tokens' bans)."""
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
        object.__setattr__(self, "stop", _as_tuple("stop", self.stop))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        self._int("max_tokens", minimum=1, optional=True)
        self._float("temperature", "a finite number >= 0", lambda t: t >= 0)
        self._int("top_k", minimum=0, note=" (0 disables it)")
        self._float("top_p", "in (0, 1]", lambda p: 0.0 < p <= 1.0)
        self._float("min_p", "in [0, 1]", lambda p: 0.0 <= p <= 1.0)
        self._int("seed", minimum=0, maximum=MAX_SEED, optional=True)
        for i, text in enumerate(self.stop):
            if not (isinstance(text, str) and text and _is_unicode(text)):
                _bad(f"stop[{i}] must be a non-empty string of valid Unicode", text)
        for i, token in enumerate(self.stop_token_ids):
            if not _is_int(token, minimum=0, maximum=MAX_INT32):
                _bad(f"stop_token_ids[{i}] must be an int in [0, {show_bound(MAX_INT32)}]", token)
        object.__setattr__(self, "stop_token_ids", tuple(map(int, self.stop_token_ids)))
        _require_bool("ignore_eos", self.ignore_eos)
        self._int("min_tokens", minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _bad(f"min_tokens must not exceed max_tokens ({self.max_tokens})", self.min_tokens)
        self._int("logprobs", minimum=0, maximum=MAX_LOGPROBS, optional=True)
        self._validate_penalties_and_n()

    def _validate_penalties_and_n(self) -> None:
        self._int("n", minimum=1, maximum=MAX_N)
        limit = MAX_PRESENCE_FREQUENCY_PENALTY
        for name in ("presence_penalty", "frequency_penalty"):
            self._float(name, f"a number in [{-limit}, {limit}]", lambda v: -limit <= v <= limit)
        self._float("repetition_penalty", "a finite number > 0", lambda v: v > 0)

    def _int(
        self,
        name: str,
        *,
        minimum: int,
        maximum: int = MAX_INT32,
        optional: bool = False,
        note: str = "",
    ) -> None:
        """Check an int field against [minimum, maximum] and store it as a plain int."""
        value = getattr(self, name)
        if optional and value is None:
            return
        if not _is_int(value, minimum=minimum, maximum=maximum):
            none = " or None" if optional else ""
            _bad(f"{name} must be an int in [{minimum}, {show_bound(maximum)}]{note}{none}", value)
        object.__setattr__(self, name, int(value))

    def _float(self, name: str, rule: str, ok: Callable[[float], bool]) -> None:
        """Check a finite real field against `ok` and store it as a float."""
        value = getattr(self, name)
        if not _is_number(value) or not ok(value):
            _bad(f"{name} must be {rule}", value)
        object.__setattr__(self, name, float(value))

    @property
    def is_greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature below `GREEDY_TEMPERATURE`)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """True when any of presence, frequency or repetition penalty is on."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _as_tuple(name: str, value: object) -> tuple[Any, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray)):
        return tuple(value)
    raise InvalidRequestError(f"{name} must be a sequence, got {value!r}")


def _is_int(value: object, *, minimum: int, maximum: int | None = None) -> bool:
    """An integer (plain or numpy, never a bool) in [minimum, maximum]."""
    number = as_int(value)
    return number is not None and minimum <= number and (maximum is None or number <= maximum)


def _is_number(value: object) -> bool:
    """A finite real number (plain or numpy, never a bool)."""
    return as_finite_float(value) is not None


def _require_bool(name: str, value: object) -> None:
    # A string such as "false" is truthy: accepting it would silently mean True.
    if not isinstance(value, bool):
        _bad(f"{name} must be a bool", value)


def _is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates (which no decoded text can contain)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad(message: str, value: object) -> None:
    raise InvalidRequestError(f"{message}, got {value!r}")
