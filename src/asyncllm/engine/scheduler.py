"""Continuous batching: which requests compute how many tokens in the next step.

Each step spends a token budget (`max_num_batched_tokens`): running decodes first (one token
each), then prompts being prefilled in chunks, then waiting requests in arrival order, each
starting after its cached prefix. Decodes and prefill chunks share steps, so a long prompt
never stalls running streams. When the KV pool runs dry, the newest running request is
preempted: its blocks are freed and it is recomputed later.

With overlapped execution a step is scheduled before the previous one's tokens are known: a
request that will sample in a launched step counts that token as *pending*; the next step
may already decode it (the runner feeds it from the device).

Multi-step decode (`num_decode_steps` > 1): when every running request decodes and nobody
can join, one step may cover several decode steps (a *run*): each request gets blocks for
all of them up front, and counts every token of the run as pending.
"""

from __future__ import annotations

import time
from collections import deque
from itertools import chain, compress, repeat
from operator import attrgetter, is_not
from typing import NamedTuple

import numpy as np

from asyncllm.engine.block_manager import BlockManager
from asyncllm.engine.request import (
    Counts,
    Request,
    RequestStatus,
    read_counts,
)

__all__ = ["ScheduledStep", "Scheduler"]


class ScheduledStep(NamedTuple):
    """The work of one step: `num_tokens[i]` new tokens of `requests[i]`, decodes first;
    `samples[i]` says whether requests[i] reaches its last token and so draws a new one.
    With `num_steps` > 1 every request decodes (one token, sampling) that many times in a
    row, each step feeding the token it drew to the next."""

    step_id: int
    requests: list[Request]
    num_tokens: list[int]
    samples: list[bool]
    num_steps: int = 1
    counts: Counts | None = None
    """The requests' counters as this step leaves them, when the scheduler read them anyway
    (a steady decode step), so that the step's inputs are built without reading them again."""


class Scheduler:
    """FCFS admission, chunked prefill, mixed prefill+decode steps, recompute preemption."""

    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        num_decode_steps: int = 1,
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_decode_steps = num_decode_steps
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def add_first(self, reqs: list[Request]) -> None:
        """Queue `reqs` ahead of everyone waiting (in their order)."""
        self.waiting.extendleft(reversed(reqs))

    def remove(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues and free its blocks."""
        assert req.status is not RequestStatus.RELEASED, "request removed twice"
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.blocks.free(req)

    def schedule(self, step_id: int) -> ScheduledStep:
        """Pick this step's work; computed-token counts advance as if the step already ran."""
        return self._schedule_decodes(step_id) or self._schedule_any(step_id)

    def _schedule_decodes(self, step_id: int) -> ScheduledStep | None:
        """The steady state, tested for every running request at once: when each decodes
        (or is done) and the pool covers the blocks they need, schedule them all, then admit
        whom the budget lets in, as `_schedule_any` would; None otherwise (a prefill chunk,
        too many decodes for the budget, or a preemption to make)."""
        running = self.running
        remaining, counts = _remaining_all(running)
        computed, known, pending, num_blocks = counts
        # (ufunc reductions: `ndarray.max` and `min` go through a Python wrapper)
        if not len(remaining) or np.maximum.reduce(remaining) > 1:
            return None
        # Everyone decodes (the steady state), nobody is done:
        every = bool(np.minimum.reduce(remaining))
        decodes = running[:] if every else list(compress(running, remaining.tolist()))
        if self.num_decode_steps > 1 and decodes:
            run = self._run_length(decodes)
            if run > 1:
                return self._schedule_run(step_id, decodes, run)
        if len(decodes) > self.max_num_batched_tokens:
            return None
        size = self.blocks.block_size
        if every:  # each computes one more token: those whose last block is full need one
            short = computed >= num_blocks * size
        else:
            short = (remaining > 0) & (computed + remaining > num_blocks * size)
        needy = short.nonzero()[0].tolist()
        if len(needy) > self.blocks.num_unused_blocks:
            return None  # someone is preempted: the general path decides whom
        for row in needy:  # a row whose last block is full takes one more (few a step)
            allocated = self.blocks.allocate(running[row], 1)
            assert allocated, "the new blocks were counted before"
            num_blocks[row] = len(running[row].block_ids)
        if not self.waiting:  # nobody to admit: the steady state
            # Each decode computes and samples one more token (see `_finalize_decodes`).
            if not every:
                rows = remaining > 0
                computed, known, pending = computed[rows], known[rows], pending[rows]
                num_blocks = num_blocks[rows]
            counts = Counts(computed + 1, known, pending + 1, num_blocks)
            return self._finalize_decodes(step_id, decodes, counts)
        picked = dict.fromkeys(decodes, 1)
        self._admit(picked, self.max_num_batched_tokens - len(decodes))
        return self._finalize(step_id, picked)

    def _schedule_any(self, step_id: int) -> ScheduledStep:
        """`schedule` in general: decodes, then prefill chunks, preempting when the pool runs
        dry, then admissions."""
        picked: dict[Request, int] = {}
        used = 0
        preempted = False
        decodes: list[tuple[Request, int]] = []
        prefills: list[tuple[Request, int]] = []
        for req in self.running:
            remaining = _remaining(req)
            if remaining:
                (decodes if remaining == 1 else prefills).append((req, remaining))
        if self.num_decode_steps > 1 and not prefills and decodes:
            reqs = [req for req, _ in decodes]
            run = self._run_length(reqs)
            if run > 1:
                return self._schedule_run(step_id, reqs, run)
        # Decodes before prefill chunks, so a long prompt being prefilled cannot starve them.
        for req, remaining in chain(decodes, prefills):
            if req.status is RequestStatus.RUNNING:  # else preempted earlier in this step
                count = min(remaining, self.max_num_batched_tokens - used)
                if count <= 0:
                    break
                while not self.blocks.allocate(req, count):
                    victim = self.running[-1]  # newest first: it has the least work to redo
                    used -= picked.pop(victim, 0)
                    self._preempt(victim)
                    preempted = True
                    if victim is req:
                        break
                else:
                    picked[req] = count
                    used += count
        if not preempted:
            self._admit(picked, self.max_num_batched_tokens - used)
        return self._finalize(step_id, picked)

    def _run_length(self, decodes: list[Request]) -> int:
        """How many decode steps the next step can run at once (1: an ordinary step)."""
        if self.waiting and len(self.running) < self.max_num_seqs:
            return 1  # someone may join: keep steps short
        steps = self.num_decode_steps
        needed, size = 0, self.blocks.block_size
        for req in decodes:
            steps = min(steps, _run_limit(req))
            if steps <= 1:
                return 1
        for req in decodes:
            needed += -(-(req.num_computed_tokens + steps) // size) - len(req.block_ids)
        return steps if needed <= self.blocks.num_unused_blocks else 1

    def _schedule_run(self, step_id: int, reqs: list[Request], steps: int) -> ScheduledStep:
        for req in reqs:
            allocated = self.blocks.allocate(req, steps)
            assert allocated, "a run's blocks were counted before"
            req.num_computed_tokens += steps
            req.num_pending_tokens += steps
            req.last_step_id = step_id
        ones = [1] * len(reqs)
        return ScheduledStep(step_id, reqs, ones, [True] * len(reqs), steps)

    def _admit(self, picked: dict[Request, int], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending_tokens:
                break  # preempted with a token in flight: admit once it has landed
            cached = self.blocks.cached_prefix(req)
            count = min(req.num_tokens - len(cached) * self.blocks.block_size, budget)
            if not self.blocks.allocate(req, count, cached):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self._on_admitted(req, len(cached) * self.blocks.block_size)
            picked[req] = count
            budget -= count

    def _on_admitted(self, req: Request, cached_tokens: int) -> None:
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
            req.num_cached_tokens = cached_tokens
            self.blocks.record_lookup(req.num_tokens, cached_tokens)
        req.num_computed_tokens = cached_tokens
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _finalize(self, step_id: int, picked: dict[Request, int]) -> ScheduledStep:
        counts = list(picked.values())
        order = list(picked.items())
        if counts.count(1) != len(counts):
            order.sort(key=lambda item: item[1] != 1)  # decodes first (stable)
        samples = []
        for req, count in order:  # every request of the step, every step: kept lean
            req.num_computed_tokens = computed = req.num_computed_tokens + count
            req.last_step_id = step_id
            sample = computed == len(req.token_ids) + req.num_pending_tokens
            req.num_pending_tokens += sample
            samples.append(sample)
        return ScheduledStep(step_id, [r for r, _ in order], [c for _, c in order], samples)

    def _finalize_decodes(
        self, step_id: int, decodes: list[Request], counts: Counts
    ) -> ScheduledStep:
        """`_finalize` of a step of decodes alone: each computes its last known or pending
        token and so samples (it has one token left: see `_schedule_decodes`)."""
        for req in decodes:
            req.num_computed_tokens += 1
            req.num_pending_tokens += 1
            req.last_step_id = step_id
        ones, yes = [1] * len(decodes), [True] * len(decodes)
        return ScheduledStep(step_id, decodes, ones, yes, counts=counts)

    def after_step(self, step: ScheduledStep) -> None:
        """Register the blocks the finished step filled, so later requests can reuse them."""
        if not self.blocks.enable_prefix_caching:
            return  # nothing to register
        size, running = self.blocks.block_size, RequestStatus.RUNNING
        # Plain Python, kept to a few operations a request (no call): most steps fill no
        # block for most requests; this beats a pass per counter with numpy at any size.
        for req in step.requests:
            hashable = len(req.token_ids)  # a token still pending is not known: not hashable
            if req.num_computed_tokens < hashable:
                hashable = req.num_computed_tokens
            if hashable // size > req.num_registered_blocks and req.status is running:
                self.blocks.register_full_blocks(req)


def _run_limit(req: Request) -> int:
    """Decode steps `req` can run back to back from here: up to its token limit, and not
    across min_tokens (its banned tokens change there) nor with penalties (each step's
    counts would need the tokens drawn before it in the run)."""
    if req.params.has_penalties:
        return 1
    drawn = req.num_output_tokens + req.num_pending_tokens  # index of the next token drawn
    left = req.max_tokens - drawn
    min_tokens = req.params.min_tokens
    return min(left, min_tokens - drawn) if drawn < min_tokens else left


_reason_of = attrgetter("finish_reason")
_limit_of = attrgetter("token_limit")


def _remaining_all(reqs: list[Request]) -> tuple[np.ndarray, Counts]:
    """`_remaining` of every request of `reqs`, and their `read_counts`, read with C-level
    iteration and worked out in a few vectorised operations."""
    n = len(reqs)
    counts = read_counts(reqs)
    limit = np.fromiter(map(_limit_of, reqs), np.int64, n)
    reached = counts.known + counts.pending
    remaining = reached - counts.computed
    done = reached >= limit
    if any(map(_reason_of, reqs)):  # someone finished (a reason is a non-empty str): rare
        done |= np.fromiter(map(is_not, map(_reason_of, reqs), repeat(None)), bool, n)
    remaining[done] = 0
    return remaining, counts


def _remaining(req: Request) -> int:
    """Tokens `req` still has to compute now (0 once it is finished or will be when its
    pending tokens land)."""
    if req.is_finished or req.num_output_tokens + req.num_pending_tokens >= req.max_tokens:
        return 0
    return req.num_tokens + req.num_pending_tokens - req.num_computed_tokens
