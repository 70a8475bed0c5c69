"""The soak's workload: who arrives when, with which prompt and params, and how each client
reads or walks away. Everything here is drawn from one seed, so a run can be replayed.

Most requests take their prompt from a small pool built around shared prefixes, and their
params from a few fixed variants: many requests then share a (prompt, params) *key*, whose
output one isolated run can check, and the shared prefixes keep the prefix cache busy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

from asyncllm.sampling import SamplingParams

__all__ = [
    "CANCEL_FORMS",
    "READ_WAYS",
    "THREAD_WAYS",
    "Job",
    "WorkloadShape",
    "build_workload",
]

CANCEL_FORMS = (
    "break",  # break out of `async for engine.stream(...)` (the stream is dropped)
    "aclose",  # await stream.aclose()
    "async_with",  # leave `async with engine.stream(...)` early
    "task_cancel",  # asyncio: cancel the task that reads
    "scope_cancel",  # anyio: cancel the task group whose task reads
    "drop",  # del the stream (+ gc.collect())
    "abort",  # engine.abort(request_id)
    "timeout",  # anyio.move_on_after around the reading loop
    "thread_close",  # close a stream_threadsafe iterator early, from another thread
)
"""Every way a client walks away from its request before reading it to the end."""

READ_WAYS = ("read", "chunks", "generate", "thread_read", "thread_generate")
"""Every way a client reads its request to the end."""

THREAD_WAYS = frozenset({"thread_read", "thread_generate", "thread_close"})
"""Clients that run in a thread other than the engine loop's (the `*_threadsafe` API)."""

# Weights of READ_WAYS: mostly `async for`, a fifth of the readers in other threads.
_READ_WEIGHTS = (4, 2, 2, 1, 1)
# Short strings that appear often in English text (the embedded model writes stories).
_STOP_CANDIDATES = (".", ",", " the", "\n", "e", " and", "!")


class Job(NamedTuple):
    """One client of the soak."""

    number: int
    prompt: list[int]
    params: SamplingParams
    key: tuple[int, int] | None
    """(pool prompt, params variant) when the job's output is deterministic and checked
    against one isolated run of that key; None for jobs that are not checked that way."""
    way: str
    """How the client reads (READ_WAYS) or walks away (CANCEL_FORMS)."""
    cancel_after_tokens: int
    """Cancel forms: tokens the client reads before it walks away."""
    cancel_after_s: float
    """Time-based forms (timeout, task/scope cancel): the latest moment to walk away."""
    arrival_s: float
    """Arrival time, from the soak's start."""
    slow_reader: bool
    """Sleeps a little after every token (a reader that lags behind the engine)."""
    reset_prefix_cache: bool
    """Calls engine.reset_prefix_cache() when it arrives."""

    @property
    def cancels(self) -> bool:
        return self.way in CANCEL_FORMS

    @property
    def in_thread(self) -> bool:
        return self.way in THREAD_WAYS


@dataclass(frozen=True, slots=True)
class WorkloadShape:
    """The knobs of the workload (the soak's options pass them through)."""

    num_requests: int
    seed: int
    vocab_size: int
    cancel_fraction: float
    arrival_rate: float
    """Mean arrivals per second (Poisson); 0 puts every arrival at time 0."""
    max_prompt_len: int
    max_new_tokens: int
    pool_prompts: int
    pool_fraction: float
    reset_probability: float


def build_workload(shape: WorkloadShape) -> list[Job]:
    """Every job of the soak, in arrival order, reproducible from `shape.seed`."""
    rng = random.Random(shape.seed)
    pool = _prompt_pool(rng, shape)
    variants = _param_variants(rng, shape.max_new_tokens)
    jobs, clock = [], 0.0
    for index in range(shape.num_requests):
        if shape.arrival_rate > 0:
            clock += rng.expovariate(shape.arrival_rate)
        if rng.random() < shape.pool_fraction:
            # Hot prompts: squaring the draw favours the start of the pool.
            prompt_index = int(len(pool) * rng.random() ** 2)
            variant = rng.randrange(len(variants))
            prompt, params = pool[prompt_index], variants[variant]
            key: tuple[int, int] | None = (prompt_index, variant)
        else:
            prompt = _random_tokens(rng, rng.randint(1, shape.max_prompt_len), shape.vocab_size)
            params, key = _random_params(rng, shape.max_new_tokens), None
        jobs.append(_job(rng, shape, index, prompt, params, key, clock))
    return jobs


def _job(
    rng: random.Random,
    shape: WorkloadShape,
    index: int,
    prompt: list[int],
    params: SamplingParams,
    key: tuple[int, int] | None,
    arrival_s: float,
) -> Job:
    if rng.random() < shape.cancel_fraction:
        way = rng.choice(CANCEL_FORMS)
    else:
        way = rng.choices(READ_WAYS, _READ_WEIGHTS)[0]
    assert params.max_tokens is not None
    return Job(
        number=index,
        prompt=prompt,
        params=params,
        key=key,
        way=way,
        cancel_after_tokens=rng.randint(0, params.max_tokens),
        cancel_after_s=rng.uniform(0.0, 0.5),
        arrival_s=arrival_s,
        slow_reader=rng.random() < 0.1,
        reset_prefix_cache=rng.random() < shape.reset_probability,
    )


def _random_tokens(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(length)]


def _prompt_pool(rng: random.Random, shape: WorkloadShape) -> list[list[int]]:
    """Prompts in groups of four sharing a prefix; one prompt of each group is the bare
    prefix, so it is also a prefix of its siblings (a hit ending mid-block)."""
    pool: list[list[int]] = []
    while len(pool) < shape.pool_prompts:
        prefix_len = rng.randint(1, max(1, shape.max_prompt_len * 2 // 3))
        prefix = _random_tokens(rng, prefix_len, shape.vocab_size)
        pool.append(prefix)
        room = shape.max_prompt_len - prefix_len
        for _ in range(3):
            if room > 0 and len(pool) < shape.pool_prompts:
                pool.append(prefix + _random_tokens(rng, rng.randint(1, room), shape.vocab_size))
    return pool


def _param_variants(rng: random.Random, max_new: int) -> list[SamplingParams]:
    """The fixed params of pooled jobs: greedy ones and seeded sampled ones (both must give
    the same tokens as an isolated run), with stop strings, logprobs and min_tokens."""

    def length() -> int:
        return rng.randint(1, max_new)

    def seed() -> int:
        return rng.randrange(2**31)

    min_tokens = length()
    return [
        SamplingParams(temperature=0, max_tokens=length()),
        SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=length(), stop=_stops(rng)),
        SamplingParams(temperature=0, max_tokens=length(), logprobs=rng.randint(1, 5)),
        SamplingParams(temperature=0, max_tokens=max(min_tokens, length()), min_tokens=min_tokens),
        SamplingParams(temperature=0.8, top_p=0.9, seed=seed(), max_tokens=length()),
        SamplingParams(temperature=1.0, top_k=20, seed=seed(), max_tokens=length(), logprobs=2),
        SamplingParams(
            temperature=0.7, min_p=0.05, seed=seed(), max_tokens=length(), stop=_stops(rng)
        ),
    ]


def _random_params(rng: random.Random, max_new: int) -> SamplingParams:
    """Params of an unpooled job: greedy, seeded or unseeded, with random extras."""
    kind = rng.choice(("greedy", "seeded", "unseeded", "unseeded"))
    temperature = 0.0 if kind == "greedy" else rng.uniform(0.3, 1.5)
    return SamplingParams(
        max_tokens=rng.randint(1, max_new),
        temperature=temperature,
        top_k=rng.choice((0, 0, 5, 50)),
        top_p=rng.choice((1.0, 1.0, 0.8)),
        seed=rng.randrange(2**31) if kind == "seeded" else None,
        stop=_stops(rng) if rng.random() < 0.2 else (),
        logprobs=rng.randint(0, 5) if rng.random() < 0.2 else None,
        ignore_eos=rng.random() < 0.2,
    )


def _stops(rng: random.Random) -> tuple[str, ...]:
    return tuple(rng.sample(_STOP_CANDIDATES, rng.randint(1, 2)))
