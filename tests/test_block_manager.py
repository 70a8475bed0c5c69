"""The block manager and scheduler keep their invariants under any sequence of operations."""

from __future__ import annotations

from collections import deque

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from asyncllm.engine.block_manager import BlockManager, chain_hash
from asyncllm.engine.request import Request, RequestStatus
from asyncllm.engine.scheduler import ScheduledStep, Scheduler
from asyncllm.sampling import SamplingParams

BLOCK = 4
PARAMS = SamplingParams(max_tokens=1000)


def request(name: str, tokens: list[int], max_tokens: int = 1000) -> Request:
    return Request(
        name, tokens, PARAMS, max_tokens, seed=0, eos_token_ids=frozenset(), detokenizer=None
    )


class SchedulerMachine(RuleBasedStateMachine):
    """Random admissions, overlapped steps (up to three in flight), aborts and finishes over a
    small pool with prefix sharing. Removal of a request waits, as in the engine, until no
    step in flight includes it."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = BlockManager(num_blocks=24, block_size=BLOCK, enable_prefix_caching=True)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=5, max_num_batched_tokens=10)
        self.live: list[Request] = []
        self.in_flight: deque[ScheduledStep] = deque()
        self.next_step = 0
        self.doomed: list[Request] = []  # aborted, waiting for their steps to complete
        self.count = 0

    @rule(
        prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]),
        tail=st.lists(st.integers(0, 5), min_size=1, max_size=14),
    )
    def add(self, prefix: list[int], tail: list[int]) -> None:
        # Never more than the pool can hold alone (the engine rejects that at submission).
        tokens = (prefix + tail)[: BLOCK * 8]
        req = request(f"r{self.count}", tokens, max_tokens=BLOCK * 12 - len(tokens))
        self.count += 1
        self.live.append(req)
        self.scheduler.add(req)

    @precondition(lambda self: len(self.in_flight) < 3)
    @rule()
    def launch(self) -> None:
        step = self.scheduler.schedule(self.next_step)
        self.next_step += 1
        assert sum(step.num_tokens) <= self.scheduler.max_num_batched_tokens
        assert len(self.scheduler.running) <= self.scheduler.max_num_seqs
        for req, count in zip(step.requests, step.num_tokens):
            assert not req.is_finished
            assert req.num_computed_tokens <= req.num_tokens + req.num_pending_tokens
            assert len(req.block_ids) * BLOCK >= req.num_computed_tokens
            assert count >= 1
        if step.requests:
            self.in_flight.append(step)

    @precondition(lambda self: self.in_flight)
    @rule(token=st.integers(0, 5))
    def complete(self, token: int) -> None:
        step = self.in_flight.popleft()
        for req, samples in zip(step.requests, step.samples):
            if samples:
                req.num_pending_tokens -= 1
                assert req.num_pending_tokens >= 0
                if not req.is_finished:
                    req.append_token(token, None, 0.0)
        self.scheduler.after_step(step)
        self._reap()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.live))
        self.live.remove(req)
        req.finish("abort")
        self.doomed.append(req)
        self._reap()

    def _reap(self) -> None:
        """Finished requests leave once no step in flight includes them."""
        busy = {id(r) for step in self.in_flight for r in step.requests}
        for req in [r for r in self.live if r.is_finished]:
            self.live.remove(req)
            self.doomed.append(req)
        for req in list(self.doomed):
            if id(req) not in busy:
                self.doomed.remove(req)
                self.scheduler.remove(req)
                req.status = RequestStatus.RELEASED

    @invariant()
    def blocks_are_consistent(self) -> None:
        self.blocks.check_invariants(self.live + self.doomed)

    @invariant()
    def registered_content_matches_every_holder(self) -> None:
        # (A block computed twice in one step stays unregistered: token_ids None.)
        for req in self.live:
            for index, block_id in enumerate(req.block_ids[: req.num_registered_blocks]):
                block = self.blocks.blocks[block_id]
                if block.token_ids is not None:
                    assert block.token_ids == tuple(
                        req.token_ids[index * BLOCK : (index + 1) * BLOCK]
                    )

    @invariant()
    def every_request_is_in_exactly_one_queue(self) -> None:
        running, waiting = (
            set(map(id, self.scheduler.running)),
            set(map(id, self.scheduler.waiting)),
        )
        assert not running & waiting
        assert running | waiting == set(map(id, self.live + self.doomed))

    def teardown(self) -> None:
        # Drain: everything eventually finishes and every block comes back.
        for req in self.live:
            req.finish("abort")
        self.doomed += self.live
        self.live = []
        self.in_flight.clear()
        self._reap()
        assert self.blocks.num_free_blocks + self.blocks.num_cached_blocks == self.blocks.num_blocks


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_the_chained_hash_depends_on_the_whole_prefix() -> None:
    first = chain_hash(0, [1, 2, 3, 4])
    assert chain_hash(first, [5, 6, 7, 8]) != chain_hash(chain_hash(0, [9, 2, 3, 4]), [5, 6, 7, 8])
    assert chain_hash(first, [5, 6, 7, 8]) == chain_hash(chain_hash(0, [1, 2, 3, 4]), [5, 6, 7, 8])


def test_freed_blocks_are_reused_least_recently_freed_first() -> None:
    blocks = BlockManager(num_blocks=6, block_size=BLOCK, enable_prefix_caching=True)
    older, newer = request("a", [1] * 9), request("b", [2] * 9)
    for req in (older, newer):
        assert blocks.allocate(req, 9)
        req.num_computed_tokens = 9
        blocks.register_full_blocks(req)
    for req in (older, newer):
        blocks.free(req)
    # Two full blocks per request are cached; the partial ones went to the free pool.
    assert (blocks.num_cached_blocks, blocks.num_free_blocks) == (4, 2)
    taker = request("c", [3] * 16)
    assert blocks.allocate(taker, 16)  # the 2 free blocks, then evicts 2 cached ones
    # "a"'s prefix was evicted first; "b"'s is still reusable.
    assert blocks.cached_prefix(request("a2", [1] * 9)) == []
    assert len(blocks.cached_prefix(request("b2", [2] * 9))) == 2


def test_a_hash_collision_never_serves_wrong_blocks() -> None:
    blocks = BlockManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    owner = request("a", [1, 2, 3, 4, 5])
    assert blocks.allocate(owner, 5)
    owner.num_computed_tokens = 5
    blocks.register_full_blocks(owner)
    impostor = request("b", [9, 9, 9, 9, 9])
    impostor.block_hashes.append(owner.block_hashes[0])  # pretend its first block collides
    assert blocks.cached_prefix(impostor) == []


def test_reset_prefix_cache_forgets_everything_cached() -> None:
    blocks = BlockManager(num_blocks=6, block_size=BLOCK, enable_prefix_caching=True)
    holder, done = request("a", [1] * 9), request("b", [2] * 9)
    for req in (holder, done):
        assert blocks.allocate(req, 9)
        req.num_computed_tokens = 9
        blocks.register_full_blocks(req)
    blocks.free(done)
    blocks.reset_prefix_cache()
    assert blocks.num_cached_blocks == 0
    assert blocks.num_free_blocks == 3
    assert blocks.cached_prefix(request("a2", [1] * 9)) == []
    assert blocks.cached_prefix(request("b2", [2] * 9)) == []
    blocks.check_invariants([holder])
    blocks.free(holder)
    assert blocks.num_free_blocks == 6
