"""The persistent batch: decode steps packed from per-slot arrays, not request by request.

Every running request that decodes holds a *slot*: a row of preallocated host arrays with
its block table, its sampling values (temperature, top-p, min-p, top-k, seed, logprobs), its
prompt length and min_tokens. A slot is filled when its request first decodes, and then only
changed where the request changed: the block-table row takes the blocks added since the last
step (a few rows a step: those that crossed a block boundary). The per-step scalars (computed,
known and pending token counts) are read from the requests with C-level iteration (or taken
from the scheduler, which read them to schedule the step: `ScheduledStep.counts`) and turned
into positions, slots, sequence lengths and sampling offsets by vectorised operations. What is
left in Python per row is the rare case: a request that joins, that gained a block, that is
under min_tokens, or whose input token is known on the host rather than pending on the device.

A step with a prefill chunk, or with a penalised request, is packed the general way
(`asyncllm.engine.inputs.pack_step`); both give the same `HostStep` for the same step
(tested), so the device side (CUDA graphs, tensor-parallel workers) does not know which packed
it.

A steady step (the same requests decoding again, right after a step this batch packed, every
input pending on the device) is packed from the step before (`_repack`): the kept copy of its
packed arrays takes the new positions, slot mapping, sampling offsets and sequence lengths
(each one vectorised store) and the blocks that rows gained; everything else in it (pending
rows, sampling values, the layout) is the same as before.

A request names its slot by a key (`Request.batch_slot`): the slot's index plus a serial
number, new each time a slot is handed out, so a key is never valid for two owners. Dropping
its blocks (preemption) clears a request's key, so it is given a fresh, refilled slot when it
decodes again. Slots are never released explicitly: a slot whose owner left the running set
(finished, aborted, preempted) is taken back when a newcomer needs one and none is free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from operator import attrgetter

import numpy as np

from asyncllm.engine.inputs import (
    TABLE_WIDTH_STEP,
    HostStep,
    StepMeta,
    host_step,
    part_offsets,
    sampling_row,
    table_width,
)
from asyncllm.engine.request import Counts, Request, read_counts
from asyncllm.sampling import SamplingParams

__all__ = ["PersistentBatch"]

_slot_of = attrgetter("batch_slot")
_row_of = attrgetter("sample_row")
_step_of = attrgetter("sample_step")


class PersistentBatch:
    """Per-slot decode state for up to `num_slots` requests (`max_num_seqs`)."""

    def __init__(self, num_slots: int, block_size: int) -> None:
        self.block_size = block_size
        self.owners: list[Request | None] = [None] * num_slots
        self._keys = np.full(num_slots, _NO_KEY, np.int64)
        """The key each slot's owner holds (`_NO_KEY`: none)."""
        self._serial = 0
        self._num_blocks = np.zeros(num_slots, np.int64)
        """Leading entries of each block-table row written (the rest are zero)."""
        self.tables = np.zeros((num_slots, TABLE_WIDTH_STEP), np.int32)
        self._floats = np.zeros((num_slots, 3), np.float32)
        self._ints = np.zeros((num_slots, 3), np.int64)
        self._prompt_lens = np.zeros(num_slots, np.int64)
        self._min_tokens = np.zeros(num_slots, np.int64)
        self._flags = np.zeros(num_slots, np.int64)
        """What each slot's sampling values imply for the step (`_SAMPLES` ... `_PENALTIES`),
        so that a step's flags are one reduction instead of one test per value."""
        self._free = list(range(num_slots - 1, -1, -1))
        self._kept: _Kept | None = None
        """The last step packed, when the next may be packed from it (see `_repack`)."""
        self.num_repacked = 0
        """Steps packed by `_repack` (for tests and benchmarks)."""

    def pack(
        self,
        requests: Sequence[Request],
        num_steps: int,
        step_id: int,
        counts: Counts | None = None,
    ) -> HostStep | None:
        """The `HostStep` of a step in which every one of `requests` decodes one token (each
        `num_steps` times in a row) and samples, as `pack_step` would give it; None when
        some request has penalties (those steps are packed the general way). `counts`: the
        requests' `read_counts`, when the caller has them at hand.

        Like the general path, it records in each request the row it samples in
        (`sample_row`, `sample_step`), which the next step's pending inputs read."""
        host = self._repack(requests, num_steps, step_id, counts)
        if host is not None:
            return host
        self._kept = None
        n = len(requests)
        slots = self._slots(requests)
        flags = int(np.bitwise_or.reduce(self._flags[slots]))
        if flags & _PENALTIES:
            return None
        counts = counts if counts is not None else read_counts(requests)
        computed, known, pending, num_blocks = counts
        tables = self._step_tables(requests, slots, num_blocks)
        starts = computed - num_steps  # a run's first step computes the first of its tokens
        rows = np.arange(n, dtype=np.int64)
        size = self.block_size
        blocks = tables[rows, starts // size].astype(np.int64)
        drawn = known - self._prompt_lens[slots] + pending - num_steps
        floats, sample_ints = self._floats[slots].T, self._ints[slots].T
        input_ids, pending_dst, pending_src = self._token_inputs(requests, starts, known, step_id)
        banned = self._banned(requests, slots, drawn) if flags & _BANS else (_NONE, _NONE)
        # The int64 parts in `pack_step`'s order (the int32 ones likewise).
        ints = {"input_ids": input_ids, "positions": starts, "slots": blocks * size + starts % size,
                "logits_indices": rows, "pending_dst": pending_dst, "pending_src": pending_src,
                "top_k": sample_ints[0], "seeds": sample_ints[1], "offsets": drawn,
                "banned_rows": banned[0], "banned_tokens": banned[1]}  # fmt: skip
        seq_lens = (starts + 1).astype(np.int32)
        int32s = {"cu_q": np.arange(n + 1, dtype=np.int32), "seq_lens": seq_lens,
                  "tables": tables.ravel()}  # fmt: skip
        meta = StepMeta(
            num_seqs=n,
            table_width=tables.shape[1],
            max_seqlen_q=1,
            max_seqlen_k=int(seq_lens.max()),
            num_decode_seqs=n,
            num_logprobs=int(sample_ints[2].max(initial=-1)),
            all_greedy=not flags & _SAMPLES,
            any_top_k_top_p=bool(flags & _TOP_K_TOP_P),
            any_min_p=bool(flags & _MIN_P),
            num_steps=num_steps,
        )
        for row, req in enumerate(requests):
            req.sample_row, req.sample_step = row, step_id
        host = host_step(ints, int32s, list(floats), meta)
        if len(pending_dst) == n and not len(banned[0]):
            self._keep(requests, host, slots, num_blocks, step_id)
        return host

    # ---- steady steps --------------------------------------------------------------------

    def _keep(
        self,
        requests: Sequence[Request],
        host: HostStep,
        slots: np.ndarray,
        num_blocks: np.ndarray,
        step_id: int,
    ) -> None:
        """Keep a step whose inputs are all pending and that bans nothing, for `_repack`: a
        copy of its arrays (the runner may write into those it is handed), whose pending
        inputs already read the rows this step samples in (its own, in order)."""
        n = len(requests)
        ints, int32s = host.ints.copy(), host.int32s.copy()
        at = part_offsets(host.int_sizes, ints.itemsize)
        at32 = part_offsets(host.int32_sizes, int32s.itemsize)
        ints[at["pending_src"] : at["pending_src"] + n] = np.arange(n)
        self._kept = _Kept(
            requests=list(requests),
            keys=list(map(_slot_of, requests)),
            step_id=step_id,
            slots=slots,
            num_blocks=num_blocks.copy(),
            drawn_base=self._prompt_lens[slots] + host.meta.num_steps,
            host=host._replace(ints=ints, int32s=int32s, floats=host.floats.copy()),
            positions=slice(at["positions"], at["positions"] + n),
            slot_mapping=slice(at["slots"], at["slots"] + n),
            offsets=slice(at["offsets"], at["offsets"] + n),
            seq_lens=slice(at32["seq_lens"], at32["seq_lens"] + n),
            tables=at32["tables"],
        )

    def _repack(
        self, requests: Sequence[Request], num_steps: int, step_id: int, counts: Counts | None
    ) -> HostStep | None:
        """`pack` of a steady step: the requests of the step just packed (`_kept`), in the
        same order and slots, decoding again with every input pending on the device (drawn by
        that step, in the same rows). Only what moved is written into the kept arrays: the
        positions, slot mapping, sampling offsets and sequence lengths (from the counters),
        and the blocks rows gained. None when the step is not such a step, or outgrew the
        table's width: it is packed in full."""
        kept = self._kept
        if (
            kept is None
            or step_id != kept.step_id + 1
            or num_steps != kept.host.meta.num_steps
            or requests != kept.requests  # identity, element by element
            or list(map(_slot_of, requests)) != kept.keys
        ):
            return None
        counts = counts if counts is not None else read_counts(requests)
        computed, known, pending, num_blocks = counts
        starts = computed - num_steps
        if np.logical_or.reduce(known > starts):
            return None  # some input is known on the host (its step was processed already)
        grown = (num_blocks != kept.num_blocks).nonzero()[0].tolist()
        if grown and not self._grow_rows(kept, requests, grown, num_blocks):
            return None
        size, host = self.block_size, kept.host
        ints, int32s = host.ints, host.int32s
        blocks = self.tables[kept.slots, starts // size]
        ints[kept.positions] = starts
        ints[kept.slot_mapping] = np.multiply(blocks, size, dtype=np.int64) + starts % size
        ints[kept.offsets] = known + pending - kept.drawn_base
        int32s[kept.seq_lens] = starts + 1
        kept.step_id = step_id
        for req in requests:  # each samples in the row it sampled in before
            req.sample_step = step_id
        self.num_repacked += 1
        meta = host.meta._replace(max_seqlen_k=int(np.maximum.reduce(starts)) + 1)
        return HostStep(ints.copy(), host.int_sizes, int32s.copy(), host.int32_sizes,
                        host.floats.copy(), meta)  # fmt: skip

    def _grow_rows(
        self, kept: _Kept, requests: Sequence[Request], rows: list[int], num_blocks: np.ndarray
    ) -> bool:
        """Write the blocks that `rows` gained into their slots' and the kept step's table
        rows; False (writing nothing) when one no longer fits the step's table width."""
        width = kept.host.meta.table_width
        counts = num_blocks[rows].tolist()
        if max(counts) > width:
            return False
        for row, count in zip(rows, counts):
            slot, start = int(kept.slots[row]), int(kept.num_blocks[row])
            assert count > start, "a request lost blocks but kept its slot's key"
            gained = requests[row].block_ids[start:count]
            self.tables[slot, start:count] = gained
            at = kept.tables + row * width
            kept.host.int32s[at + start : at + count] = gained
            self._num_blocks[slot] = kept.num_blocks[row] = count
        return True

    # ---- slots ---------------------------------------------------------------------------

    def _slots(self, requests: Sequence[Request]) -> np.ndarray:
        """Each request's slot, giving a slot (filled) to those that hold none of their own."""
        keys = np.fromiter(map(_slot_of, requests), np.int64, len(requests))
        slots = keys % len(self.owners)
        mine = self._keys[slots] == keys  # never for -1 (no slot): free slots hold `_NO_KEY`
        if not mine.all():
            for row in np.flatnonzero(~mine).tolist():
                slots[row] = self._assign(requests[row], requests)
        return slots

    def _assign(self, req: Request, step: Sequence[Request]) -> int:
        if not self._free:
            self._reclaim(step)
        slot = self._free.pop()
        old = int(self._num_blocks[slot])
        self.tables[slot, :old] = 0
        key = self._serial * len(self.owners) + slot
        self._serial += 1
        self.owners[slot], self._keys[slot] = req, key
        self._num_blocks[slot] = 0
        if req.sampling_row is None:
            req.sampling_row = sampling_row(req.params, req.seed)
        self._floats[slot], self._ints[slot] = req.sampling_row.floats, req.sampling_row.ints
        self._prompt_lens[slot] = req.num_prompt_tokens
        self._min_tokens[slot] = req.params.min_tokens
        self._flags[slot] = _slot_flags(self._floats[slot], self._ints[slot], req.params)
        req.batch_slot = key
        return slot

    def _reclaim(self, step: Sequence[Request]) -> None:
        """Free every slot but those of `step`'s requests: their owners left the running set
        or do not decode now (they get a slot again, refilled, when they next do)."""
        in_step = {id(req) for req in step}
        for slot, owner in enumerate(self.owners):
            if owner is not None and (
                id(owner) not in in_step or owner.batch_slot != self._keys[slot]
            ):
                self._release(slot)
        assert self._free, "more decoding requests than slots"

    def _release(self, slot: int) -> None:
        owner = self.owners[slot]
        if owner is not None and owner.batch_slot == self._keys[slot]:
            owner.batch_slot = -1
        self.owners[slot], self._keys[slot] = None, _NO_KEY
        self._free.append(slot)

    # ---- block tables --------------------------------------------------------------------

    def _step_tables(
        self, requests: Sequence[Request], slots: np.ndarray, num_blocks: np.ndarray
    ) -> np.ndarray:
        """The step's block tables (its rows, as wide as `table_width` of the longest), after
        writing into them the blocks their requests gained since the last step (a request
        that dropped its blocks has a fresh slot: see `Request.drop_blocks`)."""
        width = table_width(int(num_blocks.max()))
        if width > self.tables.shape[1]:
            self.tables = np.pad(self.tables, ((0, 0), (0, width - self.tables.shape[1])))
        written = self._num_blocks[slots]
        for row in np.flatnonzero(num_blocks != written).tolist():
            slot, count, start = int(slots[row]), int(num_blocks[row]), int(written[row])
            assert count > start, "a request lost blocks but kept its slot's key"
            self.tables[slot, start:count] = requests[row].block_ids[start:count]
            self._num_blocks[slot] = count
        return self.tables[slots, :width]

    # ---- per-row inputs ------------------------------------------------------------------

    @staticmethod
    def _token_inputs(
        requests: Sequence[Request], starts: np.ndarray, known: np.ndarray, step_id: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids (known tokens), and the pending ones (pending_dst, pending_src): those
        the step before drew, which the runner copies on the device from that step's rows."""
        n = len(requests)
        is_pending = starts >= known
        input_ids = np.zeros(n, np.int64)
        if is_pending.all():  # the steady state: every input is the token drawn just before
            pending_dst, waiting = np.arange(n, dtype=np.int64), requests
        else:
            pending_dst = np.flatnonzero(is_pending)
            rows = np.flatnonzero(~is_pending).tolist()
            input_ids[rows] = [
                requests[r].token_ids[s] for r, s in zip(rows, starts[rows].tolist())
            ]
            if not len(pending_dst):
                return input_ids, pending_dst, _NONE
            waiting = [requests[r] for r in pending_dst.tolist()]
        pending_src = np.fromiter(map(_row_of, waiting), np.int64, len(waiting))
        last = np.fromiter(map(_step_of, waiting), np.int64, len(waiting))
        assert (last == step_id - 1).all(), "a pending token skipped a step"
        return input_ids, pending_dst, pending_src

    def _banned(
        self, requests: Sequence[Request], slots: np.ndarray, drawn: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, token ids) the sampler must not draw: stop tokens of rows under min_tokens."""
        pairs: list[tuple[int, int]] = []
        for row in np.flatnonzero(drawn < self._min_tokens[slots]).tolist():
            pairs.extend((row, t) for t in requests[row].banned_token_ids(int(drawn[row])))
        banned = np.array(pairs, np.int64).reshape(-1, 2).T
        return banned[0], banned[1]


@dataclasses.dataclass(slots=True)
class _Kept:
    """The last step `pack` packed, kept for `_repack` (its arrays private copies)."""

    requests: list[Request]
    keys: list[int]
    step_id: int
    slots: np.ndarray
    """Each row's slot."""
    num_blocks: np.ndarray
    """Blocks each row of the step's table holds."""
    drawn_base: np.ndarray
    """Prompt length + num_steps of each row: its sampling offset is known + pending - it."""
    host: HostStep
    positions: slice
    """Where positions, slot mapping and sampling offsets lie in `host.ints`..."""
    slot_mapping: slice
    offsets: slice
    seq_lens: slice
    """...and the sequence lengths in `host.int32s`."""
    tables: int
    """Where the block table starts in `host.int32s`."""


_NO_KEY = -2
"""The key of a free slot: no request holds it (one without a slot holds -1)."""

_NONE = np.empty(0, np.int64)

# What a slot's sampling values imply for the step's `StepMeta` (bits of `_flags`).
_SAMPLES = 1  # temperature > 0: not greedy
_TOP_K_TOP_P = 2
_MIN_P = 4
_BANS = 8  # min_tokens: stop tokens banned until then
_PENALTIES = 16


def _slot_flags(floats: np.ndarray, ints: np.ndarray, params: SamplingParams) -> int:
    """The `_flags` bits of a slot holding `floats` (temperature, top-p, min-p, as float32,
    tested as `pack_step` tests them) and `ints` (top-k, ...)."""
    temperature, top_p, min_p = map(float, floats)
    return (
        _SAMPLES * (temperature > 0.0)
        | _TOP_K_TOP_P * (int(ints[0]) > 0 or top_p < 1.0)
        | _MIN_P * (min_p > 0.0)
        | _BANS * (params.min_tokens > 0)
        | _PENALTIES * params.has_penalties
    )
