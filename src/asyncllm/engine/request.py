"""A request's life inside the engine: its tokens, its KV blocks, and its output so far."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from asyncllm.outputs import (
    CompletionChoice,
    FinishReason,
    RequestMetrics,
    RequestOutput,
    StreamToken,
    TokenLogprobs,
    Usage,
)
from asyncllm.sampling import SamplingParams

if TYPE_CHECKING:
    from asyncllm.tokenizer import IncrementalDetokenizer

__all__ = ["Counts", "Request", "RequestStatus", "read_counts"]


_NO_BLOCKS = np.empty(0, np.int32)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"
    """A choice > 0 of an n > 1 request, kept out of the scheduler until choice 0 has
    computed (and registered) the prompt's KV blocks, so that it starts from them."""
    RELEASED = "released"
    """Finished and out of the scheduler; it holds no KV blocks."""


@dataclass(eq=False, slots=True)
class Request:
    """One request. The scheduler reads and moves the token/block fields; the engine appends
    outputs with `append_token`, which also applies the stop rules."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    """Resolved limit: params.max_tokens, or whatever room max_model_len leaves."""
    seed: int
    eos_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer | None
    arrival_time: float = field(default_factory=time.monotonic)
    choice: int = 0
    """Which of the request's `params.n` choices this is; each choice is its own Request
    (same request_id), and choice 0 holds the others in `siblings`."""
    siblings: list[Request] = field(default_factory=list)
    """On choice 0 of an n > 1 request: choices 1..n-1."""

    token_ids: list[int] = field(init=False)
    """Prompt followed by the generated tokens."""
    token_limit: int = field(init=False)
    """The most tokens it can hold: its prompt's and `max_tokens`."""
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache (reset to 0 by preemption)."""
    num_cached_tokens: int = 0
    """Prompt tokens served by the prefix cache when the request was first admitted."""
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    """Chained hashes of the request's full blocks, memoised (they depend on tokens only)."""
    num_registered_blocks: int = 0
    """Leading blocks of block_ids already offered to the prefix cache."""
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_pending_tokens: int = 0
    """Tokens drawn by launched steps but not appended yet (overlapped execution)."""
    last_step_id: int = -1
    """The latest step that computes any of this request's tokens."""
    sample_row: int = -1
    """This request's row among the tokens drawn by step `sample_step`."""
    sample_step: int = -1
    batch_slot: int = -1
    """The key of its slot in the engine's persistent batch (-1: none; see
    `engine.persistent_batch`)."""

    pieces: list[str] = field(default_factory=list)
    """Streamable text of each generated token decoded so far (all of them with stop strings;
    without, tokens are decoded when their text is read: see `decodes_lazily`). Outputs are
    kept as plain ints and strs (not one object per token): objects the garbage collector
    tracks, accumulating by the hundred thousand, would trigger full collections that stall
    the event loop for 100s of ms."""
    token_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    """Per generated token, only when the request asked for logprobs."""
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    first_scheduled_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    waiter: Any = None
    """What a reader waits on for new outputs (set by the engine, then dropped)."""
    wakes_at_end: bool = False
    """The reader waiting on `waiter` wants only the request's end (`generate`,
    `generate_many`): the engine does not wake it for tokens."""
    _held: str = ""
    """Decoded text not streamed yet: it could still be the start of a stop string."""
    _flush_at_end: bool = False
    """A stop rule ended the request: its last piece takes what the detokenizer held back."""
    _stop_ids: frozenset[int] = frozenset()
    _banned: tuple[int, ...] = ()
    _distinct_prompt_ids: np.ndarray | None = None
    _output_array: np.ndarray | None = None
    _block_array: np.ndarray = field(default_factory=lambda: _NO_BLOCKS)
    sampling_row: Any = None
    """What the step builder memoises of `params` and `seed` (`asyncllm.engine.inputs.
    SamplingRow`), so that it is worked out once, not every step."""

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.token_limit = len(self.prompt_token_ids) + self.max_tokens
        stop_ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stop_ids |= self.eos_token_ids
        self._stop_ids = frozenset(stop_ids)
        self._banned = tuple(sorted(stop_ids))

    # ---- counts ---------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        """True once a stop rule, limit or abort ended the request (its blocks may still be
        held until the step that computes it completes)."""
        return self.finish_reason is not None

    @property
    def choices(self) -> list[Request]:
        """Every choice of the request, choice 0 (this one) first."""
        return [self, *self.siblings]

    @property
    def all_choices_finished(self) -> bool:
        return self.is_finished and all(s.is_finished for s in self.siblings)

    def block_array(self) -> np.ndarray:
        """`block_ids` as int32, memoised: blocks are only ever appended, until `drop_blocks`
        gives them all back."""
        known = self._block_array
        if len(known) != len(self.block_ids):
            new = np.array(self.block_ids[len(known) :], np.int32)
            self._block_array = known = np.concatenate((known, new)) if len(known) else new
        return known

    def drop_blocks(self) -> None:
        """Forget every KV block (the block manager took them back)."""
        self.block_ids.clear()
        self.num_registered_blocks = 0
        self.batch_slot = -1  # its persistent-batch row lists the blocks just dropped
        self._block_array = _NO_BLOCKS

    def distinct_prompt_array(self) -> np.ndarray:
        """The prompt's distinct token ids (what a repetition penalty needs), memoised."""
        if self._distinct_prompt_ids is None:
            self._distinct_prompt_ids = np.unique(np.array(self.prompt_token_ids, np.int64))
        return self._distinct_prompt_ids

    def output_array(self) -> np.ndarray:
        """The generated tokens as int64, extended by the new ones on each call: penalties
        read them every step, and converting the whole list each time would cost O(length)
        in Python."""
        known = self._output_array if self._output_array is not None else np.empty(0, np.int64)
        if len(known) < self.num_output_tokens:
            new = self.token_ids[self.num_prompt_tokens + len(known) :]
            known = np.concatenate([known, np.array(new, np.int64)])
        self._output_array = known
        return known

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens (a copy)."""
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def decodes_lazily(self) -> bool:
        """Whether tokens are decoded to text only when it is read (`append_tokens`), not as
        they come: only stop strings need the text at once."""
        return not self.params.stop

    def banned_token_ids(self, num_generated: int) -> tuple[int, ...]:
        """Ids the sampler must not draw as output number `num_generated`: stop tokens while
        under min_tokens."""
        return self._banned if num_generated < self.params.min_tokens else ()

    # ---- outputs --------------------------------------------------------------------------

    def append_tokens(
        self, tokens: list[int], logprobs: list[TokenLogprobs | None] | None, now: float
    ) -> None:
        """Record tokens drawn one after another (a request that `decodes_lazily`): the stop
        tokens and the token limit end it (dropping what comes after), as `append_token`
        would one at a time; their text is decoded when it is read."""
        generated = len(self.token_ids) - len(self.prompt_token_ids)
        count = len(tokens)
        reason: FinishReason | None = None
        room = self.max_tokens - generated
        if count >= room:
            count, reason = room, "length"
        stop_ids = self._stop_ids
        if stop_ids and not stop_ids.isdisjoint(tokens):
            # Output number generated + j + 1 may stop from min_tokens on.
            for j in range(max(0, self.params.min_tokens - generated - 1), count):
                if tokens[j] in stop_ids:
                    count, reason = j + 1, "stop"
                    break
        self.token_ids.extend(tokens if count == len(tokens) else tokens[:count])
        if count == 1:
            self.token_times.append(now)
        else:
            self.token_times.extend([now] * count)
        top_n = self.params.logprobs
        if top_n is not None:
            assert logprobs is not None, "a request asking for logprobs got none"
            self.token_logprobs.extend(
                None if lp is None else TokenLogprobs(lp.logprob, lp.top[:top_n])
                for lp in logprobs[:count]
            )
        if reason is not None:
            self.finish_reason = reason
            self._flush_at_end = True

    def append_one(self, token_id: int, now: float) -> bool:
        """`append_tokens([token_id], None, now)` for a request without logprobs: the
        common case of every decode step, kept to a few operations. True when the token
        ended the request."""
        self.token_ids.append(token_id)
        self.token_times.append(now)
        generated = len(self.token_ids) - len(self.prompt_token_ids)
        if token_id in self._stop_ids and generated >= self.params.min_tokens:
            self.finish_reason, self._flush_at_end = "stop", True
        elif generated >= self.max_tokens:
            self.finish_reason, self._flush_at_end = "length", True
        else:
            return False
        return True

    def _decode_pending(self) -> None:
        """Decode the text of tokens `append_tokens` recorded and nobody has read yet."""
        start, end = len(self.pieces), len(self.token_ids) - len(self.prompt_token_ids)
        if start == end:
            return
        first = len(self.prompt_token_ids)
        outputs = self.token_ids[first + start : first + end]
        if self.detokenizer is None:
            self.pieces.extend([""] * len(outputs))
        else:
            self.pieces.extend(map(self.detokenizer.push, outputs))
        if self._flush_at_end and self.detokenizer is not None:
            self.pieces[-1] += self.detokenizer.flush(self.token_ids[first:])

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None, now: float) -> None:
        """Record a sampled token, decode its text, and finish the request if a rule says so.

        The token's `StreamToken.text` is what may be streamed now: with stop strings, the
        last (longest stop - 1) characters wait until they cannot start a match any more.
        """
        if len(self.pieces) < len(self.token_ids) - len(self.prompt_token_ids):
            self._decode_pending()  # after `append_tokens`: the pieces must stay aligned
        self.token_ids.append(token_id)
        self.token_times.append(now)
        generated = len(self.token_ids) - len(self.prompt_token_ids)
        held = len(self._held)
        text = self._held + (self.detokenizer.push(token_id) if self.detokenizer else "")
        self._held = ""
        reason: FinishReason | None = None
        stop = self.params.stop
        cut = None
        if generated >= self.params.min_tokens:
            if token_id in self._stop_ids:
                reason = "stop"
            elif stop and (cut := _find_stop(text, stop, held)) is not None:
                text, reason = text[:cut], "stop"
        if reason is None and generated >= self.max_tokens:
            reason = "length"
        if reason is None and stop:
            split = max(0, len(text) - max(map(len, stop)) + 1)
            text, self._held = text[:split], text[split:]
        elif reason is not None and cut is None and self.detokenizer is not None:
            text += self.detokenizer.flush(self.token_ids[len(self.prompt_token_ids) :])
        self.finish_reason = reason
        self.pieces.append(text)
        if self.params.logprobs is not None:
            if logprobs is not None:
                logprobs = TokenLogprobs(logprobs.logprob, logprobs.top[: self.params.logprobs])
            self.token_logprobs.append(logprobs)

    @property
    def num_streamable(self) -> int:
        """Generated tokens whose `StreamToken` can be read."""
        if self.decodes_lazily:
            return len(self.token_ids) - len(self.prompt_token_ids)
        return len(self.pieces)

    def stream_token(self, index: int) -> StreamToken:
        """The `StreamToken` of generated token `index` (built on demand)."""
        if index >= len(self.pieces):
            self._decode_pending()
        last = index == len(self.pieces) - 1
        return StreamToken(
            token_id=self.token_ids[len(self.prompt_token_ids) + index],
            text=self.pieces[index],
            index=index,
            logprobs=self.token_logprobs[index] if self.token_logprobs else None,
            finish_reason=self.finish_reason if last else None,
            choice=self.choice,
        )

    @property
    def text(self) -> str:
        """The output text so far: exactly what has been streamed."""
        self._decode_pending()
        return "".join(self.pieces)

    def finish(self, reason: FinishReason) -> None:
        """End the request from outside the stop rules (abort); held-back text is dropped,
        so the final text stays what was streamed."""
        if self.finish_reason is None:
            self.finish_reason = reason

    def to_output(self) -> RequestOutput:
        """The final `RequestOutput` of this request and its siblings (call once all are
        finished): choice 0 at the top level, every choice in `choices`."""
        assert self.all_choices_finished, "to_output() before every choice finished"
        choices = tuple(c.to_choice() for c in self.choices)
        first = choices[0]
        metrics = self._metrics()
        if self.siblings:
            metrics = metrics._replace(
                e2e_latency=max(c._metrics().e2e_latency for c in self.choices),
                num_preemptions=sum(c.num_preemptions for c in self.choices),
            )
        completion_tokens = sum(c.num_output_tokens for c in self.choices)
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_token_ids),
            token_ids=first.token_ids,
            text=first.text,
            finish_reason=first.finish_reason,
            usage=Usage(self.num_prompt_tokens, completion_tokens, self.num_cached_tokens),
            metrics=metrics,
            logprobs=first.logprobs,
            choices=choices,
        )

    def to_choice(self) -> CompletionChoice:
        """This choice's part of the output (call once finished)."""
        assert self.finish_reason is not None, "to_choice() before the choice finished"
        logprobs = None
        if self.params.logprobs is not None:
            logprobs = [lp for lp in self.token_logprobs if lp is not None]
        return CompletionChoice(
            index=self.choice,
            token_ids=self.output_token_ids,
            text=self.text,
            finish_reason=self.finish_reason,
            logprobs=logprobs,
        )

    def _metrics(self) -> RequestMetrics:
        end = self.token_times[-1] if self.token_times else time.monotonic()
        started = self.first_scheduled_time or end
        times = self.token_times
        return RequestMetrics(
            arrival_time=self.arrival_time,
            queue_time=started - self.arrival_time,
            ttft=times[0] - self.arrival_time if times else None,
            itl=tuple(b - a for a, b in itertools.pairwise(times)),
            e2e_latency=end - self.arrival_time,
            num_preemptions=self.num_preemptions,
        )


def _find_stop(text: str, stops: tuple[str, ...], new_from: int) -> int | None:
    """Start of the earliest stop string in `text` that ends after `text[:new_from]`, or None.

    Only matches that end in the new text count: one that ends in the held-back text was
    either seen by an earlier call already or was produced under min_tokens, where it does not
    count (how much text is held back depends on the longest stop string, so counting such a
    match would make one stop string's fate depend on the others).
    """
    found = [i for s in stops if (i := text.find(s, max(0, new_from - len(s) + 1))) >= 0]
    return min(found) if found else None


# Field getters for the hot path's loops over every running request: `map(getter, reqs)`
# reads a field with C-level iteration (shared by the scheduler and the persistent batch).
tokens_of = attrgetter("token_ids")
blocks_of = attrgetter("block_ids")
pending_of = attrgetter("num_pending_tokens")
computed_of = attrgetter("num_computed_tokens")


class Counts(NamedTuple):
    """Counters of a list of requests, one array entry per request (see `read_counts`)."""

    computed: np.ndarray
    """`num_computed_tokens`"""
    known: np.ndarray
    """`len(token_ids)`"""
    pending: np.ndarray
    """`num_pending_tokens`"""
    num_blocks: np.ndarray
    """`len(block_ids)`"""


def read_counts(reqs: Sequence[Request]) -> Counts:
    """The `Counts` of `reqs` (a pass over them per counter, C-level)."""
    n = len(reqs)
    return Counts(
        np.fromiter(map(computed_of, reqs), np.int64, n),
        np.fromiter(map(len, map(tokens_of, reqs)), np.int64, n),
        np.fromiter(map(pending_of, reqs), np.int64, n),
        np.fromiter(map(len, map(blocks_of, reqs)), np.int64, n),
    )
