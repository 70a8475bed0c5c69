"""Step inputs: what each sequence computes, turned into device tensors with few copies.

A `StepBatch` collects one step in flat Python lists (one `add` per sequence, decodes first),
then `pack_step` turns it into a `HostStep` (a few packed numpy arrays plus scalars) in a
handful of vectorised operations, and `device_step` moves those in one non-blocking copy per
dtype (through pinned memory on CUDA), so building step N+1 never waits for step N. This runs
every step for every sequence: it is kept lean. Under tensor parallelism the `HostStep` is
what rank 0 sends the other ranks, which run `device_step` on it themselves.
Penalties add their per-row values and token lists only to steps where some row has one.

A multi-step decode run (`StepBatch.num_steps` > 1) is packed as its first step;
`next_decode_step` derives each following step's inputs on the device from the one before
and the tokens it drew, so nothing crosses from the host between the steps of a run.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch

from asyncllm.context import ForwardContext
from asyncllm.kernels.base import AttentionBackend
from asyncllm.layers.sampler import PenaltyTensors, SamplingTensors
from asyncllm.sampling import SamplingParams

__all__ = [
    "HostStep",
    "PinnedStaging",
    "PreparedStep",
    "SampleSpec",
    "SamplingRow",
    "SeqStep",
    "StepBatch",
    "StepMeta",
    "device_step",
    "host_step",
    "next_decode_step",
    "pack_step",
    "part_offsets",
    "prepare_step",
    "sampling_row",
    "table_width",
]


_INT64_LIMIT = 2**63
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class SamplingRow(NamedTuple):
    """A sequence's sampling parameters as the step's tensors hold them (see `sampling_row`):
    worked out once per request, not every step."""

    floats: tuple[float, float, float]
    """temperature (0 for greedy, capped below float32's overflow), top_p, min_p."""
    ints: tuple[int, int, int]
    """top_k, seed (its 64 bits as an int64), logprobs asked for (-1: none)."""


def sampling_row(params: SamplingParams, seed: int) -> SamplingRow:
    """`params` and `seed` as the tensors can hold them: tiny temperatures are greedy (0),
    huge ones are capped below float32's overflow (still uniform in effect), and seeds of
    2**63 or more wrap to the negative int64 with the same 64 bits."""
    temperature = 0.0 if params.is_greedy else min(params.temperature, _FLOAT32_MAX)
    seed = seed if seed < _INT64_LIMIT else seed - 2 * _INT64_LIMIT
    logprobs = -1 if params.logprobs is None else params.logprobs
    return SamplingRow((temperature, params.top_p, params.min_p), (params.top_k, seed, logprobs))


class SampleSpec(NamedTuple):
    """How to draw the next token of a sequence this step."""

    params: SamplingParams
    seed: int
    """In [0, 2**64) (as `SamplingParams.seed`); it reaches the sampler as int64 bits."""
    offset: int
    """Index of the token being drawn among the request's outputs (keys the random stream)."""
    banned_token_ids: tuple[int, ...] = ()
    """Token ids that must not be drawn now (EOS and stop ids while under min_tokens)."""
    output_token_ids: Sequence[int] | np.ndarray = ()
    """With penalties: the tokens generated so far that the host knows (a token still
    pending on the device is added from there)."""
    prompt_token_ids: Sequence[int] | np.ndarray = ()
    """With a repetition penalty: the prompt's token ids (each distinct id once suffices)."""
    row: SamplingRow | None = None
    """`sampling_row(params, seed)`, if the caller keeps it (None: worked out here)."""


class SeqStep(NamedTuple):
    """What one sequence computes in a step (the convenient form; see `StepBatch.add`)."""

    token_ids: Sequence[int]
    """The new tokens whose K/V this step computes; the last may be missing (pending_row)."""
    start: int
    """Position of the first new token; positions [0, start) are already in the cache."""
    block_table: Sequence[int]
    """Physical KV blocks of the sequence, covering at least its new tokens."""
    sample: SampleSpec | None = None
    """None for a prefill chunk that does not reach the end of the known tokens."""
    pending_row: int | None = None
    """The last new token is the one the previous step drew in this row (still on device)."""


class StepBatch:
    """One step's sequences, accumulated in flat lists; `num_steps` > 1 makes it a decode
    run (every sequence a sampling decode) of that many steps."""

    def __init__(self, num_steps: int = 1) -> None:
        self.num_steps = num_steps
        self.tokens: list[int] = []
        self.q_lens: list[int] = []
        self.starts: list[int] = []
        self.tables: list[Sequence[int] | np.ndarray] = []
        self.pending_dst: list[int] = []
        self.pending_src: list[int] = []
        self.sampled_seqs: list[int] = []
        # One entry per sampled row (the step-wide flags are worked out when it is packed).
        self.sample_floats: list[tuple[float, float, float]] = []
        self.sample_ints: list[tuple[int, int, int]] = []
        self.offsets: list[int] = []
        self.banned: list[tuple[int, int]] = []
        self.penalties = _PenaltyLists()

    @classmethod
    def from_steps(cls, steps: Sequence[SeqStep]) -> StepBatch:
        batch = cls()
        for s in steps:
            batch.add(s.token_ids, s.start, s.block_table, s.pending_row, s.sample)
        return batch

    def add(
        self,
        token_ids: Sequence[int],
        start: int,
        block_table: Sequence[int] | np.ndarray,
        pending_row: int | None = None,
        sample: SampleSpec | None = None,
    ) -> None:
        """Add a sequence computing `token_ids` (plus the pending token, if any) at `start`."""
        self.tokens.extend(token_ids)
        q_len = len(token_ids)
        if pending_row is not None:
            self.pending_dst.append(len(self.tokens))
            self.pending_src.append(pending_row)
            self.tokens.append(0)  # overwritten on the device
            q_len += 1
        self.q_lens.append(q_len)
        self.starts.append(start)
        self.tables.append(block_table)
        if sample is not None:
            if sample.params.has_penalties:
                self.penalties.add(len(self.offsets), sample, pending_row)
            self._add_sample(sample)

    def _add_sample(self, sample: SampleSpec) -> None:
        row = sample.row or sampling_row(sample.params, sample.seed)
        self.sampled_seqs.append(len(self.q_lens) - 1)
        if sample.banned_token_ids:
            index = len(self.offsets)
            self.banned.extend((index, t) for t in sample.banned_token_ids)
        self.sample_floats.append(row.floats)
        self.sample_ints.append(row.ints)
        self.offsets.append(sample.offset)

    @property
    def num_sampled(self) -> int:
        """Sequences that draw a token this step."""
        return len(self.offsets)


class _PenaltyLists:
    """The penalised rows of a step: their values and the tokens each has seen."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.presence: list[float] = []
        self.frequency: list[float] = []
        self.repetition: list[float] = []
        self.output_tokens: list[np.ndarray] = []
        self.output_lens: list[int] = []
        self.num_output_tokens = 0
        self.prompt_tokens: list[np.ndarray] = []
        self.prompt_lens: list[int] = []
        self.pending_index: list[int] = []
        self.pending_src: list[int] = []

    def add(self, row: int, sample: SampleSpec, pending_row: int | None) -> None:
        p = sample.params
        self.rows.append(row)
        self.presence.append(p.presence_penalty)
        self.frequency.append(p.frequency_penalty)
        self.repetition.append(p.repetition_penalty)
        outputs = np.asarray(sample.output_token_ids, np.int64)
        if pending_row is not None:
            # The sequence's newest output is this step's pending input: the runner copies
            # it here on the device, as it does for the input ids.
            self.pending_index.append(self.num_output_tokens + len(outputs))
            self.pending_src.append(pending_row)
            outputs = np.append(outputs, 0)
        self.output_tokens.append(outputs)
        self.output_lens.append(len(outputs))
        self.num_output_tokens += len(outputs)
        prompt = sample.prompt_token_ids if p.repetition_penalty != 1.0 else ()
        self.prompt_tokens.append(np.asarray(prompt, np.int64))
        self.prompt_lens.append(len(prompt))

    def int_arrays(self) -> dict[str, np.ndarray]:
        rows = np.array(self.rows, np.int64)
        return {
            "output_rows": np.repeat(rows, self.output_lens),
            "output_tokens": np.concatenate(self.output_tokens),
            "prompt_rows": np.repeat(rows, self.prompt_lens),
            "prompt_tokens": np.concatenate(self.prompt_tokens),
            "pending_index": np.array(self.pending_index, np.int64),
            "pending_src": np.array(self.pending_src, np.int64),
        }

    def float_rows(self, num_rows: int) -> list[np.ndarray]:
        """[presence, frequency, repetition], each over every sampled row (the neutral 0, 0,
        1 for rows without penalties)."""
        values: list[np.ndarray] = []
        for given, neutral in ((self.presence, 0.0), (self.frequency, 0.0),
                               (self.repetition, 1.0)):  # fmt: skip
            row_values = np.full(num_rows, neutral, np.float32)
            row_values[self.rows] = given
            values.append(row_values)
        return values


class PreparedStep(NamedTuple):
    """A step's inputs on the model's device, ready for `ModelRunner.launch`."""

    ctx: ForwardContext
    input_ids: torch.Tensor
    pending_dst: torch.Tensor | None
    """Indices into input_ids to fill from the previous step's drawn tokens..."""
    pending_src: torch.Tensor | None
    """...and the rows of those tokens."""
    sampling: SamplingTensors
    num_steps: int = 1
    """Decode steps this launch runs (see `next_decode_step`)."""


class PinnedStaging:
    """Reused pinned host buffers for host-to-device copies.

    Pinning memory is slow (and can synchronise the device), so each copy goes through one
    of a ring of buffers that only grows. A buffer is reused once the copy that last read it
    has run (its event has fired): with a ring longer than the steps in flight that never
    waits in practice.
    """

    def __init__(self, device: torch.device, slots: int = 12, slot_bytes: int = 1 << 16) -> None:
        self.device = device
        self._buffers: list[torch.Tensor | None] = [
            torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)
        ]
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._next = 0

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        """`array` on the device (the copy is enqueued on the current stream)."""
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        event = self._events[slot]
        if event is not None:
            event.synchronize()
        nbytes = max(array.nbytes, 1)
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8, pin_memory=True)
            self._buffers[slot] = buffer
        staged = buffer[: array.nbytes].view(_TORCH_DTYPES[array.dtype]).view(array.shape)
        staged.numpy()[...] = array
        on_device = staged.to(self.device, non_blocking=True)
        self._events[slot] = event = event or torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        return on_device


_TORCH_DTYPES = {
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.float32): torch.float32,
}


class StepMeta(NamedTuple):
    """A step's scalars, known on the host (reading them never waits on the device)."""

    num_seqs: int
    table_width: int
    max_seqlen_q: int
    max_seqlen_k: int
    num_decode_seqs: int
    num_logprobs: int
    all_greedy: bool
    any_top_k_top_p: bool
    any_min_p: bool
    num_steps: int = 1


class HostStep(NamedTuple):
    """One step's inputs on the host, packed by dtype: what `device_step` copies to the
    device, and (under tensor parallelism) all that crosses from rank 0 to the other ranks."""

    ints: np.ndarray
    """int64 parts, concatenated in `int_sizes` order, each 16-byte aligned."""
    int_sizes: dict[str, int]
    int32s: np.ndarray
    """int32 parts, likewise."""
    int32_sizes: dict[str, int]
    floats: np.ndarray
    """float32 [rows, columns]: temperature, top-p, min-p, then on penalised steps presence,
    frequency and repetition penalty; a column per sampled row (`int_sizes["seeds"]`), padded
    to a multiple of 4 so that every row starts 16-byte aligned."""
    meta: StepMeta


def prepare_step(
    batch: StepBatch,
    block_size: int,
    device: torch.device,
    backend: AttentionBackend,
    staging: PinnedStaging | None = None,
) -> PreparedStep:
    """Device tensors for `batch` (through `staging` on CUDA)."""
    return device_step(pack_step(batch, block_size), device, backend, staging)


def pack_step(batch: StepBatch, block_size: int) -> HostStep:
    """`batch` as a few flat numpy arrays (vectorised: this runs every step)."""
    q_lens = np.array(batch.q_lens, np.int64)
    seq_lens = np.array(batch.starts, np.int64) + q_lens
    cu_q = np.zeros(len(q_lens) + 1, np.int64)
    np.cumsum(q_lens, out=cu_q[1:])
    tables = _block_tables(batch.tables)
    positions, slots = _positions_and_slots(cu_q, seq_lens, tables, block_size)
    # [3, S]: temperature, top-p, min-p; [3, S]: top-k, seed, logprobs.
    floats = np.array(batch.sample_floats, np.float32).reshape(-1, 3).T
    top_k, seeds, logprobs = np.array(batch.sample_ints, np.int64).reshape(-1, 3).T
    banned = np.array(batch.banned, np.int64).reshape(-1, 2).T
    ints = {
        "input_ids": np.array(batch.tokens, np.int64),
        "positions": positions,
        "slots": slots,
        "logits_indices": cu_q[1:][batch.sampled_seqs] - 1,
        "pending_dst": np.array(batch.pending_dst, np.int64),
        "pending_src": np.array(batch.pending_src, np.int64),
        "top_k": top_k,
        "seeds": seeds,
        "offsets": np.array(batch.offsets, np.int64),
        "banned_rows": banned[0],
        "banned_tokens": banned[1],
    }
    int32s = {"cu_q": cu_q.astype(np.int32), "seq_lens": seq_lens.astype(np.int32),
              "tables": tables.ravel()}  # fmt: skip
    float_rows: list[Sequence[float] | np.ndarray] = list(floats)
    if batch.penalties.rows:  # steps without penalties build and send nothing for them
        ints.update(_prefixed("penalty_", batch.penalties.int_arrays()))
        float_rows.extend(batch.penalties.float_rows(batch.num_sampled))
    meta = StepMeta(
        num_seqs=len(q_lens),
        table_width=tables.shape[1],
        max_seqlen_q=int(q_lens.max()),
        max_seqlen_k=int(seq_lens.max()),
        num_decode_seqs=_leading_decodes(q_lens),
        num_logprobs=int(logprobs.max(initial=-1)),
        all_greedy=not (floats[0] > 0.0).any(),
        any_top_k_top_p=bool((top_k > 0).any() or (floats[1] < 1.0).any()),
        any_min_p=bool((floats[2] > 0.0).any()),
        num_steps=batch.num_steps,
    )
    return host_step(ints, int32s, float_rows, meta)


def host_step(
    ints: dict[str, np.ndarray],
    int32s: dict[str, np.ndarray],
    float_rows: Sequence[Sequence[float] | np.ndarray],
    meta: StepMeta,
) -> HostStep:
    """The `HostStep` of a step's parts, each dtype packed into one aligned array (`ints`
    and `int32s` in the order `device_step` reads them: see `pack_step`)."""
    return HostStep(_pack(ints), _sizes(ints), _pack(int32s), _sizes(int32s),
                    _pack_rows(float_rows), meta)  # fmt: skip


def device_step(
    host: HostStep,
    device: torch.device,
    backend: AttentionBackend,
    staging: PinnedStaging | None = None,
) -> PreparedStep:
    """`host` on the model's device (one non-blocking copy per dtype through `staging` on
    CUDA), with the forward context and sampling tensors built on it."""
    to_device: Callable[[np.ndarray], torch.Tensor] = staging or torch.from_numpy
    views = _unpack(to_device(host.ints), host.int_sizes)
    views32 = _unpack(to_device(host.int32s), host.int32_sizes)
    f32, num_sampled = to_device(host.floats), host.int_sizes["seeds"]
    if f32.shape[1] != num_sampled:  # one column per sampled row, without the padding
        f32 = f32[:, :num_sampled]
    meta = host.meta
    ctx = ForwardContext(
        positions=views["positions"],
        slot_mapping=views["slots"],
        cu_seqlens_q=views32["cu_q"],
        seq_lens_k=views32["seq_lens"],
        block_tables=views32["tables"].view(meta.num_seqs, meta.table_width),
        logits_indices=views["logits_indices"],
        max_seqlen_q=meta.max_seqlen_q,
        max_seqlen_k=meta.max_seqlen_k,
        num_decode_seqs=meta.num_decode_seqs,
        attn_backend=backend,
    )
    pending = host.int_sizes["pending_dst"] > 0
    return PreparedStep(
        ctx=ctx,
        input_ids=views["input_ids"],
        pending_dst=views["pending_dst"] if pending else None,
        pending_src=views["pending_src"] if pending else None,
        sampling=_sampling(meta, views, f32),
        num_steps=meta.num_steps,
    )


def next_decode_step(prepared: PreparedStep, drawn: torch.Tensor, block_size: int) -> PreparedStep:
    """The next step of a decode run, on the device: each sequence computes the token it
    just drew (`drawn`, one per row), one position further, into the slot its block table
    gives; it draws output number offset + 1. (A run never crosses a block it does not hold,
    min_tokens or a penalty: the bans carry over and there are no penalty counts to extend.)
    """
    ctx = prepared.ctx
    positions = ctx.positions + 1
    blocks = ctx.block_tables.gather(1, (positions // block_size).unsqueeze(1)).squeeze(1)
    ctx = dataclasses.replace(
        ctx,
        positions=positions,
        slot_mapping=blocks.long() * block_size + positions % block_size,
        seq_lens_k=ctx.seq_lens_k + 1,
        max_seqlen_k=ctx.max_seqlen_k + 1,
    )
    sampling = prepared.sampling._replace(offsets=prepared.sampling.offsets + 1)
    return prepared._replace(ctx=ctx, input_ids=drawn, pending_dst=None, pending_src=None,
                             sampling=sampling)  # fmt: skip


def _block_tables(rows: list[Sequence[int] | np.ndarray]) -> np.ndarray:
    """[B, W] int32, zero-padded, filled in one vectorised masked store; W is the longest
    row rounded up to 16, so the row stride (which kernels specialise on) rarely changes.
    Rows that are int32 arrays already (a request's memoised table) are joined in C."""
    lens = np.fromiter(map(len, rows), np.int64, len(rows))
    if rows and isinstance(rows[0], np.ndarray):
        flat = np.concatenate(rows).astype(np.int32, copy=False)
    else:
        flat = np.fromiter(chain.from_iterable(rows), np.int32, int(lens.sum()))
    width = table_width(int(lens.max(initial=1)))
    tables = np.zeros((len(rows), width), np.int32)
    # Row-major order of the mask is the order of `flat`: row after row, left to right.
    tables[np.arange(width) < lens[:, None]] = flat
    return tables


def _positions_and_slots(
    cu_q: np.ndarray, seq_lens: np.ndarray, tables: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    q_lens = np.diff(cu_q)
    seq_of_token = np.repeat(np.arange(len(q_lens)), q_lens)
    # Token i of a sequence with q new tokens sits at position seq_len - q + i.
    positions = np.arange(int(cu_q[-1])) - cu_q[seq_of_token] + (seq_lens - q_lens)[seq_of_token]
    slots = tables[seq_of_token, positions // block_size].astype(np.int64) * block_size
    return positions, slots + positions % block_size


def _leading_decodes(q_lens: np.ndarray) -> int:
    multi = np.flatnonzero(q_lens != 1)
    return int(multi[0]) if len(multi) else len(q_lens)


_ALIGN_BYTES = 16


TABLE_WIDTH_STEP = 16
"""Block tables are padded to a multiple of this many columns: the row stride, which the
attention kernels specialise on, then rarely changes."""


def table_width(num_blocks: int) -> int:
    """Columns of a block table whose longest row holds `num_blocks` blocks (at least one)."""
    return _round_up(max(num_blocks, 1), TABLE_WIDTH_STEP)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pack(parts: dict[str, np.ndarray]) -> np.ndarray:
    """Concatenate `parts` (one dtype), each starting 16-byte aligned: Triton specialises
    kernels on pointer alignment, and misaligned views would recompile them mid-run."""
    arrays = list(parts.values())
    dtype = arrays[0].dtype
    step = _ALIGN_BYTES // dtype.itemsize
    pieces = []
    for array in arrays:
        pieces.append(array.ravel())
        if padding := -array.size % step:
            pieces.append(np.zeros(padding, dtype))
    return np.concatenate(pieces, dtype=dtype, casting="unsafe")  # as a slice assignment would


_NUM_SAMPLING_ROWS = 3
"""Float rows every step has (temperature, top-p, min-p); penalised steps add three more."""


def _pack_rows(rows: Sequence[Sequence[float] | np.ndarray]) -> np.ndarray:
    """`rows` (equally long) as float32 [len(rows), padded]: the padding makes each row start
    16-byte aligned, as `_pack` does for its parts (Triton specialises on alignment)."""
    width = len(rows[0])
    out = np.zeros((len(rows), _round_up(max(width, 1), _ALIGN_BYTES // 4)), np.float32)
    out[:, :width] = rows
    return out


def part_offsets(sizes: dict[str, int], itemsize: int) -> dict[str, int]:
    """Where each part of a packed array starts (in elements), given its parts' `sizes`
    (`HostStep.int_sizes` or `int32_sizes`) and their item size in bytes."""
    step = _ALIGN_BYTES // itemsize
    offsets, at = {}, 0
    for name, size in sizes.items():
        offsets[name] = at
        at += _round_up(size, step)
    return offsets


def _sizes(parts: dict[str, np.ndarray]) -> dict[str, int]:
    return {name: array.size for name, array in parts.items()}


def _unpack(flat: torch.Tensor, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Views of the parts `_pack` packed into `flat`: split in one call into each part and
    the padding after it (slicing part by part costs ~3x), as `_split_plan` says."""
    pieces, parts_of = _split_plan(tuple(sizes.values()), _ALIGN_BYTES // flat.element_size())
    return dict(zip(sizes, parts_of(flat.split_with_sizes(pieces))))


@functools.lru_cache(maxsize=512)
def _split_plan(
    sizes: tuple[int, ...], step: int
) -> tuple[list[int], Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, ...]]]:
    """The pieces to split a packed array of parts of `sizes` into (each part, then its
    padding to a multiple of `step` when it has any: a view costs ~1 us, even an empty
    one), and which of the pieces are the parts. Memoised: a run of decode steps of one
    batch repeats one layout."""
    pieces: list[int] = []
    keep: list[int] = []
    for size in sizes:
        keep.append(len(pieces))
        pieces.append(int(size))
        if padding := -int(size) % step:
            pieces.append(padding)
    take = operator.itemgetter(*keep)
    if len(keep) == 1:  # itemgetter of one index gives the item itself, not a tuple
        return pieces, lambda split: (take(split),)
    return pieces, take


def _prefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + name: array for name, array in arrays.items()}


def _sampling(
    meta: StepMeta, views: dict[str, torch.Tensor], floats: torch.Tensor
) -> SamplingTensors:
    rows = floats.unbind(0)  # one call for every row's view
    penalties = None
    if len(rows) > _NUM_SAMPLING_ROWS:  # a penalised step (see `pack_step`)
        penalties = PenaltyTensors(
            presence=rows[_NUM_SAMPLING_ROWS],
            frequency=rows[_NUM_SAMPLING_ROWS + 1],
            repetition=rows[_NUM_SAMPLING_ROWS + 2],
            output_rows=views["penalty_output_rows"],
            output_tokens=views["penalty_output_tokens"],
            prompt_rows=views["penalty_prompt_rows"],
            prompt_tokens=views["penalty_prompt_tokens"],
            pending_index=views["penalty_pending_index"],
            pending_src=views["penalty_pending_src"],
        )
    return SamplingTensors(
        temperatures=rows[0],
        top_k=views["top_k"],
        top_p=rows[1],
        min_p=rows[2],
        seeds=views["seeds"],
        offsets=views["offsets"],
        banned_rows=views["banned_rows"],
        banned_tokens=views["banned_tokens"],
        all_greedy=meta.all_greedy,
        any_top_k_top_p=meta.any_top_k_top_p,
        any_min_p=meta.any_min_p,
        num_logprobs=meta.num_logprobs,
        penalties=penalties,
    )
