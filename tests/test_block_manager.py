"""The block manager and scheduler keep their invariants under any sequence of operations."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from asyncllm.engine.block_manager import BlockManager, chain_hash
from asyncllm.engine.request import Request, RequestStatus
from asyncllm.engine.scheduler import Scheduler
from asyncllm.sampling import SamplingParams

BLOCK = 4
PARAMS = SamplingParams(max_tokens=1000)


def request(name: str, tokens: list[int]) -> Request:
    return Request(
        name, tokens, PARAMS, max_tokens=1000, seed=0, eos_token_ids=frozenset(), detokenizer=None
    )


class SchedulerMachine(RuleBasedStateMachine):
    """Random admissions, steps, aborts and finishes over a small pool with prefix sharing."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = BlockManager(num_blocks=24, block_size=BLOCK, enable_prefix_caching=True)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=5, max_num_batched_tokens=10)
        self.live: list[Request] = []
        self.count = 0

    @rule(
        prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]),
        tail=st.lists(st.integers(0, 5), min_size=1, max_size=14),
    )
    def add(self, prefix: list[int], tail: list[int]) -> None:
        # Never more than the pool can hold alone (the engine rejects that at submission).
        tokens = (prefix + tail)[: BLOCK * 12]
        req = request(f"r{self.count}", tokens)
        self.count += 1
        self.live.append(req)
        self.scheduler.add(req)

    @rule(tokens=st.lists(st.integers(0, 5), min_size=8, max_size=8))
    def step(self, tokens: list[int]) -> None:
        step = self.scheduler.schedule()
        assert sum(step.num_tokens) <= self.scheduler.max_num_batched_tokens
        assert len(self.scheduler.running) <= self.scheduler.max_num_seqs
        for index, req in enumerate(step.requests):
            assert req.num_computed_tokens <= req.num_tokens
            assert len(req.block_ids) * BLOCK >= req.num_computed_tokens
            if step.samples(index) and req.num_tokens < BLOCK * 12:
                req.token_ids.append(tokens[index % len(tokens)])
        self.scheduler.after_step(step)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.live))
        self.live.remove(req)
        self.scheduler.remove(req)
        req.status = RequestStatus.RELEASED

    @invariant()
    def blocks_are_consistent(self) -> None:
        self.blocks.check_invariants(self.live)
        assert (
            self.blocks.num_free_blocks
            + self.blocks.num_cached_blocks
            + sum(len(r.block_ids) for r in self.live)
            >= self.blocks.num_blocks
        )  # shared blocks are counted once per holder

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
        assert running | waiting == set(map(id, self.live))


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
