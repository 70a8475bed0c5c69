"""The persistent batch packs every decode step exactly as the general path (`pack_step`)
would: through joins mid-run, finishes and aborts (slots reused), preemption and resume (the
same request, new blocks), rows gaining blocks, min_tokens bans, logprobs, seeds, overlapped
scheduling and multi-step runs; and its slots never hand a request another's state."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch

from asyncllm import AsyncEngine, SamplingParams
from asyncllm.engine.block_manager import BlockManager
from asyncllm.engine.core import EngineCore
from asyncllm.engine.inputs import HostStep, _unpack, pack_step
from asyncllm.engine.persistent_batch import PersistentBatch
from asyncllm.engine.request import Counts, Request, read_counts
from asyncllm.engine.scheduler import ScheduledStep, Scheduler
from tests.models import all_blocks_unused, random_prompts

VOCAB = 384  # the random model's
BLOCK = 4


def parts(host: HostStep) -> dict[str, np.ndarray]:
    """Every named part of a packed step, as numpy arrays."""
    named = {k: v.numpy() for k, v in _unpack(torch.from_numpy(host.ints), host.int_sizes).items()}
    int32s = _unpack(torch.from_numpy(host.int32s), host.int32_sizes)
    named.update({k: v.numpy() for k, v in int32s.items()})
    return named


def assert_same_step(fast: HostStep, general: HostStep) -> None:
    assert fast.meta == general.meta
    assert fast.int_sizes == general.int_sizes
    assert fast.int32_sizes == general.int32_sizes
    np.testing.assert_array_equal(fast.ints, general.ints)
    np.testing.assert_array_equal(fast.int32s, general.int32s)
    np.testing.assert_array_equal(fast.floats, general.floats)


class Checked:
    """What the cross-check saw: decode steps packed both ways, rows that joined a running
    batch, rows whose block table grew."""

    def __init__(self) -> None:
        self.fast_steps = 0
        self.counted_steps = 0
        self.joins = 0
        self.grown_rows = 0


@contextmanager
def cross_checked(engine: AsyncEngine) -> Iterator[Checked]:
    """Pack every decode step both ways (persistent batch, then the general path from the
    same request state) and require identical host steps."""
    core: EngineCore = engine._core
    checked = Checked()
    pack = core.persistent.pack
    previous: dict[int, int] = {}

    def both(
        requests: list[Request], num_steps: int, step_id: int, counts: Counts | None = None
    ) -> HostStep | None:
        if counts is not None:  # the scheduler's counters are the requests' own
            for given, read in zip(counts, read_counts(requests)):
                np.testing.assert_array_equal(given, read)
            checked.counted_steps += 1
        rows = [(r.sample_row, r.sample_step) for r in requests]
        fast = pack(requests, num_steps, step_id, counts)
        if fast is None:
            return None
        after = [(r.sample_row, r.sample_step) for r in requests]
        for req, (row, step) in zip(requests, rows):
            req.sample_row, req.sample_step = row, step
        step_ = ScheduledStep(step_id, requests, [1] * len(requests), [True] * len(requests),
                              num_steps)  # fmt: skip
        general = pack_step(core._batch(step_), core.config.block_size)
        assert [(r.sample_row, r.sample_step) for r in requests] == after
        assert_same_step(fast, general)
        checked.fast_steps += 1
        checked.joins += sum(id(r) not in previous for r in requests)
        checked.grown_rows += sum(previous.get(id(r), 0) < len(r.block_ids) for r in requests)
        previous.clear()
        previous.update((id(r), len(r.block_ids)) for r in requests)
        return fast

    core.persistent.pack = both  # type: ignore[method-assign]
    try:
        yield checked
    finally:
        del core.persistent.pack


def crowded_engine(model_dir: Path, **overrides: Any) -> AsyncEngine:
    """A pool too small for the crowd (preemption), small blocks (rows grow often)."""
    settings: dict[str, Any] = dict(device="cpu", dtype="float32", num_kv_blocks=40,
                                    block_size=BLOCK, max_model_len=96, max_num_seqs=6,
                                    max_num_batched_tokens=32)  # fmt: skip
    settings.update(overrides)
    return AsyncEngine.from_pretrained(str(model_dir), **settings)


MIXED = [
    SamplingParams(temperature=0, max_tokens=30),
    SamplingParams(temperature=0.8, seed=3, max_tokens=25, logprobs=2),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.9, max_tokens=28, min_tokens=12),
    SamplingParams(temperature=0, max_tokens=20, min_tokens=20, stop_token_ids=[7, 9]),
    SamplingParams(temperature=1.0, min_p=0.05, seed=11, max_tokens=33),
]


@pytest.mark.parametrize(("overlap", "num_decode_steps"), [(False, 1), (True, 1), (True, 4)])
async def test_every_decode_step_packs_as_the_general_path(
    random_model_dir: Path, overlap: bool, num_decode_steps: int
) -> None:
    """Arrivals spread over the run (joins mid-run, slots reused after finishes), a pool
    that forces preemption (resume with new blocks), an abort, bans and logprobs."""
    prompts = random_prompts([9, 23, 5, 14, 31, 7, 18, 11, 26, 3, 16, 12], VOCAB, seed=31)
    engine = crowded_engine(random_model_dir, overlap_scheduling=overlap,
                            num_decode_steps=num_decode_steps)  # fmt: skip
    async with engine:
        with cross_checked(engine) as checked:
            async with anyio.create_task_group() as group:
                for index, prompt in enumerate(prompts):
                    params = MIXED[index % len(MIXED)]
                    group.start_soon(engine.generate, prompt, params)
                    await anyio.sleep(0.01 * (index % 3))
                doomed = engine.stream(prompts[0], SamplingParams(max_tokens=60, ignore_eos=True))
                async for _ in doomed:
                    break
                await doomed.aclose()
            with anyio.fail_after(10):
                await engine.idle()
        stats = engine.stats()
    assert stats.num_preemptions > 0
    assert checked.fast_steps > 20
    # Steps whose counters came from the scheduler (checked against the requests' own).
    assert checked.counted_steps > (10 if num_decode_steps == 1 else 0)
    assert checked.joins > len(engine._core.persistent.owners)  # slots were reused
    assert checked.grown_rows > 0
    if overlap:  # steady steps (every input pending) were repacked from the step before
        assert engine._core.persistent.num_repacked > 5
    assert all_blocks_unused(stats)


def request(rid: str, prompt: list[int], **params: Any) -> Request:
    return Request(rid, prompt, SamplingParams(**params), max_tokens=50, seed=1,
                   eos_token_ids=frozenset({1}), detokenizer=None)  # fmt: skip


def decoding(req: Request, blocks: list[int]) -> Request:
    """`req` as the scheduler leaves it for a decode step of its last prompt token."""
    req.block_ids = list(blocks)
    req.num_computed_tokens = req.num_tokens
    return req


def tables_of(host: HostStep) -> np.ndarray:
    return parts(host)["tables"].reshape(host.meta.num_seqs, host.meta.table_width)


def test_a_slot_freed_by_a_leaver_carries_none_of_its_blocks() -> None:
    batch = PersistentBatch(num_slots=2, block_size=BLOCK)
    a = decoding(request("a", [5] * 15), [10, 11, 12, 13])
    b = decoding(request("b", [6] * 3), [20])
    batch.pack([a, b], 1, 0)
    c = decoding(request("c", [7] * 2), [30])  # a left; c takes its slot
    host = batch.pack([b, c], 1, 1)
    assert host is not None
    assert batch.owners[0] is c and a.batch_slot == -1
    np.testing.assert_array_equal(tables_of(host)[:, :4], [[20, 0, 0, 0], [30, 0, 0, 0]])


def test_a_row_takes_the_blocks_its_request_gains() -> None:
    batch = PersistentBatch(num_slots=1, block_size=BLOCK)
    a = decoding(request("a", [5] * 4), [3])
    batch.pack([a], 1, 0)
    a.token_ids.append(8)
    a.block_ids.append(9)
    a.num_computed_tokens += 1
    host = batch.pack([a], 1, 1)
    assert host is not None
    np.testing.assert_array_equal(tables_of(host)[0, :3], [3, 9, 0])
    np.testing.assert_array_equal(parts(host)["slots"], [9 * BLOCK])


def test_a_preempted_request_resumes_with_its_new_blocks_not_its_old_row() -> None:
    batch = PersistentBatch(num_slots=1, block_size=BLOCK)
    a = decoding(request("a", [5] * 6), [3, 4])
    batch.pack([a], 1, 0)
    a.drop_blocks()  # preempted: the same number of blocks comes back, other ones
    decoding(a, [7, 8])
    host = batch.pack([a], 1, 1)
    assert host is not None
    np.testing.assert_array_equal(tables_of(host)[0, :3], [7, 8, 0])


def test_the_table_widens_for_a_row_longer_than_any_before() -> None:
    batch = PersistentBatch(num_slots=2, block_size=BLOCK)
    short = decoding(request("s", [5] * 3), [1])
    batch.pack([short], 1, 0)
    long = decoding(request("l", [6] * 70), list(range(100, 118)))
    host = batch.pack([short, long], 1, 1)
    assert host is not None
    assert host.meta.table_width == 32
    np.testing.assert_array_equal(tables_of(host)[1, :19], [*range(100, 118), 0])


def test_a_penalised_request_leaves_the_step_to_the_general_path() -> None:
    batch = PersistentBatch(num_slots=2, block_size=BLOCK)
    plain = decoding(request("p", [5] * 3), [1])
    penalised = decoding(request("q", [6] * 3, presence_penalty=0.5), [2])
    assert batch.pack([plain, penalised], 1, 0) is None


# ---- steady steps, repacked from the step before -------------------------------------------


def general_step(requests: list[Request], step_id: int) -> HostStep:
    """The general path's `HostStep` for a decode step of `requests` (leaving their sample
    rows as they were, for the persistent batch to set)."""
    rows = [(r.sample_row, r.sample_step) for r in requests]
    step = ScheduledStep(step_id, requests, [1] * len(requests), [True] * len(requests))
    host = pack_step(EngineCore.__new__(EngineCore)._batch(step), BLOCK)
    for req, (row, last) in zip(requests, rows):
        req.sample_row, req.sample_step = row, last
    return host


class SteadyRun:
    """Requests past their prefill, stepped as the overlapped engine steps them: each step
    decodes the token the step before drew (pending), taking a fresh block at a boundary;
    the step before's tokens land after the step is packed (`land`)."""

    def __init__(self, prompt_lens: list[int]) -> None:
        self.fresh = iter(range(100, 10_000))
        params = [dict(temperature=0.7, top_k=3, seed=5), dict(temperature=0),
                  dict(temperature=1.0, top_p=0.8, min_p=0.1, logprobs=1)]  # fmt: skip
        self.requests = []
        for index, length in enumerate(prompt_lens):
            req = request(f"r{index}", [3 + index] * length, **params[index % len(params)])
            req.block_ids = [next(self.fresh) for _ in range(-(-length // BLOCK))]
            req.num_computed_tokens, req.num_pending_tokens = length, 1  # the prefill sampled
            # The prefill step sampled them in another order (the first step's pending rows).
            req.sample_row, req.sample_step = len(prompt_lens) - 1 - index, 0
            self.requests.append(req)

    def schedule(self) -> None:
        for req in self.requests:
            req.num_computed_tokens += 1
            req.num_pending_tokens += 1
            while len(req.block_ids) * BLOCK < req.num_computed_tokens:
                req.block_ids.append(next(self.fresh))

    def land(self) -> None:
        for req in self.requests:
            req.num_pending_tokens -= 1
            req.token_ids.append(11)


def test_steady_steps_are_repacked_exactly_as_the_general_path_packs_them() -> None:
    """Positions, slot mappings across block boundaries, rows gaining blocks, sequence
    lengths and sampling offsets, step after step; a row outgrowing the table's width
    (16 -> 32 blocks) is packed in full, and the steps after it are repacked again."""
    run = SteadyRun([3, 9, 62])  # 62 tokens: the 17th block (a wider table) comes at step 3
    batch = PersistentBatch(num_slots=4, block_size=BLOCK)
    widths = []
    for step_id in range(1, 14):
        run.schedule()
        general = general_step(run.requests, step_id)
        counts = read_counts(run.requests) if step_id % 2 else None  # given, or read
        host = batch.pack(run.requests, 1, step_id, counts)
        assert host is not None
        assert_same_step(host, general)
        # Each request samples in its row (the next step's pending inputs read it there).
        assert [(r.sample_row, r.sample_step) for r in run.requests] == [
            (row, step_id) for row in range(3)
        ]
        widths.append(host.meta.table_width)
        # The runner writes into what it is handed (the pending inputs, on CPU): the next
        # step must not see it.
        for array in (host.ints, host.int32s, host.floats):
            array.fill(-7)
        run.land()
    assert widths[0] == 16 and widths[-1] == 32
    # Every step but the first (nothing kept yet) and the one that widened the table.
    assert batch.num_repacked == 11


def test_a_step_whose_inputs_are_known_on_the_host_is_packed_in_full() -> None:
    """Without overlap the step before's tokens land before the next step is scheduled: its
    inputs are known token ids, not pending rows, so the kept step does not fit it."""
    run = SteadyRun([5, 6])
    batch = PersistentBatch(num_slots=2, block_size=BLOCK)
    for step_id in range(1, 6):
        run.land()  # the token of the step before (first: the prefill's)
        run.schedule()
        general = general_step(run.requests, step_id)
        host = batch.pack(run.requests, 1, step_id)
        assert host is not None
        assert_same_step(host, general)
    assert batch.num_repacked == 0


def test_a_kept_step_does_not_fit_a_step_whose_inputs_have_landed_since() -> None:
    """The step before drew pending inputs (kept), then its tokens landed before the next
    step was scheduled (the pipeline had drained): that step's inputs are known tokens."""
    run = SteadyRun([5, 6])
    batch = PersistentBatch(num_slots=2, block_size=BLOCK)
    run.schedule()
    assert batch.pack(run.requests, 1, 1) is not None
    run.land()
    run.land()  # the prefill's token and step 1's
    run.schedule()
    general = general_step(run.requests, 2)
    host = batch.pack(run.requests, 1, 2)
    assert host is not None
    assert_same_step(host, general)
    assert batch.num_repacked == 0


def test_a_step_of_other_requests_or_order_is_packed_in_full() -> None:
    run = SteadyRun([5, 6, 7])
    batch = PersistentBatch(num_slots=3, block_size=BLOCK)
    run.schedule()
    batch.pack(run.requests, 1, 1)
    run.requests.reverse()  # the same requests in another order: other rows
    for req in run.requests:
        req.num_computed_tokens += 1
        req.num_pending_tokens += 1
    general = general_step(run.requests, 2)
    host = batch.pack(run.requests, 1, 2)
    assert host is not None
    assert_same_step(host, general)
    assert batch.num_repacked == 0


# ---- the scheduler's vectorised decode test -----------------------------------------------


class World:
    """A scheduler and its requests, driven by a script; `general` turns the vectorised
    decode test off, so that every step takes the general loop."""

    def __init__(self, general: bool, num_decode_steps: int) -> None:
        self.blocks = BlockManager(num_blocks=20, block_size=BLOCK, enable_prefix_caching=True)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=5, max_num_batched_tokens=12,
                                   num_decode_steps=num_decode_steps)  # fmt: skip
        if general:
            self.scheduler._schedule_decodes = lambda step_id: None  # type: ignore[method-assign]
        self.requests: dict[str, Request] = {}
        self.in_flight: deque[ScheduledStep] = deque()

    def add(self, name: str, prompt: list[int], max_tokens: int) -> None:
        req = Request(name, prompt, SamplingParams(max_tokens=max_tokens), max_tokens, seed=0,
                      eos_token_ids=frozenset(), detokenizer=None)  # fmt: skip
        self.requests[name] = req
        self.scheduler.add(req)

    def launch(self, step_id: int) -> tuple[Any, ...]:
        step = self.scheduler.schedule(step_id)
        if step.requests:
            self.in_flight.append(step)
        names = [r.request_id for r in step.requests]
        return names, step.num_tokens, step.samples, step.num_steps

    def complete(self, token: int) -> None:
        step = self.in_flight.popleft()
        for req, samples in zip(step.requests, step.samples):
            if samples:
                tokens = [token] * step.num_steps
                req.num_pending_tokens -= len(tokens)
                if not req.is_finished:
                    req.append_tokens(tokens, None, 0.0)
        self.scheduler.after_step(step)
        for req in list(self.scheduler.running):
            if req.is_finished and not any(req in s.requests for s in self.in_flight):
                self.scheduler.remove(req)

    def state(self) -> tuple[Any, ...]:
        reqs = sorted(self.requests.values(), key=lambda r: r.request_id)
        held = [(r.block_ids, r.num_computed_tokens, r.num_pending_tokens, r.status) for r in reqs]
        return held, self.blocks.num_free_blocks, self.scheduler.num_preemptions


@pytest.mark.parametrize(("in_flight", "num_decode_steps"), [(1, 1), (2, 1), (2, 4)])
def test_vectorised_decode_scheduling_picks_what_the_general_loop_picks(
    in_flight: int, num_decode_steps: int
) -> None:
    """Arrivals, decodes crossing block boundaries, a pool that runs dry (preemption),
    finishes; both worlds must schedule the same work and hold the same blocks."""
    rng = random.Random(5)
    worlds = [World(general, num_decode_steps) for general in (True, False)]
    for step_id in range(300):
        if rng.random() < 0.15:
            prompt = [rng.randrange(8) for _ in range(rng.randint(1, 14))]
            max_tokens = rng.randint(1, 30)
            for world in worlds:
                world.add(f"r{step_id:03d}", prompt, max_tokens)
        picked = [world.launch(step_id) for world in worlds]
        assert picked[0] == picked[1]
        if len(worlds[0].in_flight) >= in_flight or not picked[0][0]:
            token = rng.randrange(8)
            for world in worlds:
                if world.in_flight:
                    world.complete(token)
        assert worlds[0].state() == worlds[1].state()
    assert worlds[1].scheduler.num_preemptions > 0


def test_a_finished_request_still_running_is_not_scheduled_again() -> None:
    """An aborted request keeps its place among the running (and its blocks) until no
    launched step can write to them; the next step leaves it out, though it has a token
    left to compute."""
    blocks = BlockManager(num_blocks=20, block_size=BLOCK, enable_prefix_caching=True)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=32)
    a, b = (Request(name, [1, 2, 3], SamplingParams(max_tokens=5), 5, seed=0,
                    eos_token_ids=frozenset(), detokenizer=None) for name in "ab")  # fmt: skip
    scheduler.add(a)
    scheduler.add(b)
    for req in scheduler.schedule(0).requests:  # the prompts; each draws a token
        req.num_pending_tokens -= 1
        req.append_tokens([4], None, 0.0)
    b.finish("abort")
    step = scheduler.schedule(1)
    assert step.requests == [a]
    assert step.counts is not None  # the vectorised decode test took it


# ---- processing a decode step's tokens ----------------------------------------------------


@pytest.mark.parametrize(
    ("min_tokens", "max_tokens", "tokens"),
    [
        (0, 5, [3, 4, 5, 6, 8]),  # the limit
        (0, 5, [3, 1, 5]),  # EOS
        (2, 5, [1, 1, 1, 3]),  # EOS under min_tokens, then at it
        (0, 3, [3, 4, 9]),  # a stop id as the last allowed token: "stop", not "length"
        (3, 6, [9, 4, 9, 9]),  # a stop id before min_tokens is kept
    ],
)
def test_appending_one_token_ends_a_request_as_appending_a_list_of_one_does(
    min_tokens: int, max_tokens: int, tokens: list[int]
) -> None:
    params = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=[9])
    ends = []
    for one in (True, False):
        req = Request("r", [5, 6], params, max_tokens, seed=0, eos_token_ids=frozenset({1}),
                      detokenizer=None)  # fmt: skip
        for token in tokens:
            if req.is_finished:
                break
            if one:
                assert req.append_one(token, 0.0) == req.is_finished  # says when it ended
            else:
                req.append_tokens([token], None, 0.0)
        ends.append((req.output_token_ids, req.finish_reason, req._flush_at_end, req.token_times))
    assert ends[0] == ends[1]
    assert ends[0][1] is not None
