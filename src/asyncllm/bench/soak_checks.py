"""What the soak checks about each request once it has ended, and the tally of how they ended.

Every violation is one line that starts with a tag in brackets (`[tokens]`, `[blocks]`, ...),
so a test can tell which check fired.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from asyncllm.bench.soak_workload import Job
from asyncllm.outputs import RequestOutput, TokenLogprobs

__all__ = [
    "Divergence",
    "Outcome",
    "check_accounting",
    "check_outcome",
    "find_divergence",
    "status_of",
]


class Outcome(NamedTuple):
    """How one request ended, as its client saw it."""

    number: int
    received: list[int]
    """Token ids the client read, in order."""
    finish_reason: str | None
    """"stop", "length" or "abort"; None if the client could not tell."""
    final: RequestOutput | None = None
    """The request's final output, when the client (or the soak) can see it."""
    streamed_text: str | None = None
    """The text of every token read, joined; None when the client read no stream."""
    logprobs: list[TokenLogprobs | None] | None = None
    """Logprobs of the tokens read (None when the client read no stream)."""
    error: str | None = None
    """The exception the client got, if any."""

    @property
    def tokens(self) -> list[int]:
        """The request's whole output when known, else what the client read."""
        return self.final.token_ids if self.final is not None else self.received


class Divergence(NamedTuple):
    """Where a checked request's tokens first differ from its key's isolated run."""

    number: int
    position: int
    soak_token: int | None
    """None: the soak's output ended here (or went on) where the isolated run did not."""
    isolated_token: int | None


def status_of(outcome: Outcome) -> str:
    """ "errored", "finished" (stop or length), "aborted", or "unknown"."""
    if outcome.error is not None:
        return "errored"
    if outcome.finish_reason in ("stop", "length"):
        return "finished"
    return "aborted" if outcome.finish_reason == "abort" else "unknown"


def check_outcome(job: Job, outcome: Outcome, vocab_size: int) -> list[str]:
    """Everything one request's ending must satisfy on its own."""
    name = f"request {job.number} ({job.way})"
    if outcome.error is not None:
        return [f"[error] {name} raised {outcome.error}"]
    if outcome.finish_reason is None:
        return [f"[ending] {name} ended without a finish reason"]
    problems = []
    if not job.cancels and outcome.finish_reason == "abort":
        problems.append(f"[ending] {name} was aborted although its client read to the end")
    problems += _check_final(name, outcome)
    if outcome.finish_reason != "abort":
        problems += _check_limits(name, job, outcome)
    problems += _check_logprobs(name, job, outcome, vocab_size)
    return problems


def _check_final(name: str, outcome: Outcome) -> list[str]:
    final = outcome.final
    if final is None:
        return []
    problems = []
    if final.token_ids[: len(outcome.received)] != outcome.received:
        problems.append(
            f"[stream] {name}: tokens read {outcome.received} are not a prefix "
            f"of its output {final.token_ids}"
        )
    if final.finish_reason != outcome.finish_reason:
        problems.append(
            f"[stream] {name}: the stream said {outcome.finish_reason!r}, the "
            f"output says {final.finish_reason!r}"
        )
    if final.usage.completion_tokens != len(final.token_ids):
        problems.append(
            f"[stream] {name}: usage counts {final.usage.completion_tokens} "
            f"tokens, the output has {len(final.token_ids)}"
        )
    read_all = len(outcome.received) == len(final.token_ids)
    if outcome.streamed_text is not None and read_all and outcome.streamed_text != final.text:
        problems.append(
            f"[stream] {name}: streamed text {outcome.streamed_text!r} differs "
            f"from the output's {final.text!r}"
        )
    return problems


def _check_limits(name: str, job: Job, outcome: Outcome) -> list[str]:
    """Stop rules of a request that finished on its own."""
    params, tokens = job.params, outcome.tokens
    assert params.max_tokens is not None
    problems = []
    if len(tokens) > params.max_tokens or (
        outcome.finish_reason == "length" and len(tokens) != params.max_tokens
    ):
        problems.append(
            f"[limits] {name} ended by {outcome.finish_reason!r} with "
            f"{len(tokens)} tokens, max_tokens {params.max_tokens}"
        )
    if len(tokens) < params.min_tokens:
        problems.append(
            f"[limits] {name} stopped after {len(tokens)} tokens, min_tokens {params.min_tokens}"
        )
    text = outcome.final.text if outcome.final is not None else outcome.streamed_text
    for stop in params.stop:
        if text is not None and stop in text:
            problems.append(f"[limits] {name}: stop string {stop!r} is in its text {text!r}")
    return problems


def _check_logprobs(name: str, job: Job, outcome: Outcome, vocab_size: int) -> list[str]:
    entries = outcome.final.logprobs if outcome.final is not None else outcome.logprobs
    want = job.params.logprobs
    if entries is None:
        if want is not None and outcome.final is not None:
            return [f"[logprobs] {name} asked for logprobs and got none"]
        return []
    if want is None:
        if any(entry is not None for entry in entries):
            return [f"[logprobs] {name} got logprobs it did not ask for"]
        return []
    if len(entries) != len(outcome.tokens) and outcome.final is not None:
        return [f"[logprobs] {name}: {len(entries)} logprobs for {len(outcome.tokens)} tokens"]
    for position, entry in enumerate(entries):
        if entry is None or not _logprobs_well_formed(entry, min(want, vocab_size)):
            return [f"[logprobs] {name}: malformed logprobs at token {position}: {entry}"]
    return []


def _logprobs_well_formed(entry: TokenLogprobs, count: int) -> bool:
    values = [entry.logprob, *(value for _, value in entry.top)]
    finite = all(math.isfinite(v) and v <= 1e-4 for v in values)
    ordered = all(a >= b for a, b in itertools.pairwise(values[1:]))
    return finite and ordered and len(entry.top) == count


def find_divergence(job: Job, outcome: Outcome, isolated: Sequence[int]) -> Divergence | None:
    """Where a keyed request departs from its isolated run: a finished request must equal
    it, an aborted one must be a prefix of it. None when it agrees."""
    tokens = outcome.tokens
    finished = status_of(outcome) == "finished"
    if tokens == list(isolated) or (not finished and tokens == list(isolated[: len(tokens)])):
        return None
    position = next(
        (i for i, (a, b) in enumerate(zip(tokens, isolated)) if a != b),
        min(len(tokens), len(isolated)),
    )
    return Divergence(
        job.number,
        position,
        tokens[position] if position < len(tokens) else None,
        isolated[position] if position < len(isolated) else None,
    )


def check_accounting(
    jobs: Sequence[Job],
    outcomes: Mapping[int, Outcome],
    duplicates: Iterable[int],
    engine_finished: int,
) -> list[str]:
    """Every submitted request ended exactly once, and the engine released each once."""
    problems = [f"[accounting] request {i} ended twice" for i in sorted(set(duplicates))]
    missing = [job.number for job in jobs if job.number not in outcomes]
    if missing:
        problems.append(f"[accounting] {len(missing)} requests never ended: {missing[:20]}")
    tally = Counter(status_of(outcome) for outcome in outcomes.values())
    ended = tally["finished"] + tally["aborted"] + tally["errored"]
    if tally["unknown"] or ended != len(jobs):
        problems.append(
            f"[accounting] {len(jobs)} submitted, but finished {tally['finished']}"
            f" + aborted {tally['aborted']} + errored {tally['errored']} = {ended}"
            f" ({tally['unknown']} unknown)"
        )
    if engine_finished != len(jobs):
        problems.append(
            f"[accounting] the engine released {engine_finished} requests, "
            f"{len(jobs)} were submitted"
        )
    return problems
