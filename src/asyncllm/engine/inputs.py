"""Step inputs: what each sequence computes, turned into device tensors with few copies.

The host side builds numpy arrays; on CUDA they travel through one pinned buffer per dtype
and one non-blocking copy each, on the engine's stream, so building step N+1 never waits for
step N to finish.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from asyncllm.context import ForwardContext
from asyncllm.kernels.base import AttentionBackend
from asyncllm.layers.sampler import SamplingTensors
from asyncllm.sampling import SamplingParams

__all__ = ["PreparedStep", "SampleSpec", "SeqStep", "prepare_step"]


class SampleSpec(NamedTuple):
    """How to draw the next token of a sequence this step."""

    params: SamplingParams
    seed: int
    offset: int
    """Index of the token being drawn among the request's outputs (keys the random stream)."""
    banned_token_ids: tuple[int, ...] = ()
    """Token ids that must not be drawn now (EOS and stop ids while under min_tokens)."""


class SeqStep(NamedTuple):
    """What one sequence computes in a step."""

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


class PreparedStep(NamedTuple):
    """A step's inputs on the model's device, ready for `ModelRunner.launch`."""

    ctx: ForwardContext
    input_ids: torch.Tensor
    pending_dst: torch.Tensor | None
    """Indices into input_ids to fill from the previous step's drawn tokens..."""
    pending_src: torch.Tensor | None
    """...and the rows of those tokens."""
    sampling: SamplingTensors


def prepare_step(
    steps: Sequence[SeqStep], block_size: int, device: torch.device, backend: AttentionBackend
) -> PreparedStep:
    """Device tensors for `steps` (decodes first, for the best attention kernels)."""
    ints, int32s, floats = _host_arrays(steps, block_size)
    to_device = _copier(device)
    i64 = to_device(np.concatenate(list(ints.values())))
    i32 = to_device(np.concatenate([a.ravel() for a in int32s.values()]))
    f32 = to_device(np.stack(list(floats.values())))
    views = _split(i64, {k: len(v) for k, v in ints.items()})
    views32 = _split(i32, {k: v.size for k, v in int32s.items()})
    num_seqs = len(steps)
    has_pending = len(ints["pending_dst"]) > 0
    ctx = ForwardContext(
        positions=views["positions"],
        slot_mapping=views["slots"],
        cu_seqlens_q=views32["cu_q"],
        seq_lens_k=views32["seq_lens"],
        block_tables=views32["tables"].view(num_seqs, -1),
        logits_indices=views["logits_indices"],
        max_seqlen_q=int(np.diff(int32s["cu_q"]).max()),
        max_seqlen_k=int(int32s["seq_lens"].max()),
        num_decode_seqs=_leading_decodes(int32s["cu_q"]),
        attn_backend=backend,
    )
    ctx = dataclasses.replace(ctx, attn_metadata=backend.build_metadata(ctx))
    return PreparedStep(
        ctx=ctx,
        input_ids=views["input_ids"],
        pending_dst=views["pending_dst"] if has_pending else None,
        pending_src=views["pending_src"] if has_pending else None,
        sampling=_sampling(steps, views, f32),
    )


def _host_arrays(
    steps: Sequence[SeqStep], block_size: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    num_seqs = len(steps)
    q_lens = np.fromiter((_q_len(s) for s in steps), np.int64, num_seqs)
    starts = np.fromiter((s.start for s in steps), np.int64, num_seqs)
    seq_lens = starts + q_lens
    cu_q = np.zeros(num_seqs + 1, np.int64)
    np.cumsum(q_lens, out=cu_q[1:])
    num_tokens = int(cu_q[-1])
    seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
    positions = np.arange(num_tokens) - cu_q[seq_of_token] + starts[seq_of_token]

    width = int((seq_lens.max() + block_size - 1) // block_size)
    tables = np.zeros((num_seqs, width), np.int32)
    for row, s in enumerate(steps):
        used = min(len(s.block_table), width)
        tables[row, :used] = s.block_table[:used]
    slots = tables[seq_of_token, positions // block_size].astype(np.int64) * block_size
    slots += positions % block_size

    input_ids = np.zeros(num_tokens, np.int64)
    pending = [(i, s.pending_row) for i, s in enumerate(steps) if s.pending_row is not None]
    for row, s in enumerate(steps):
        known = len(s.token_ids)
        input_ids[cu_q[row] : cu_q[row] + known] = s.token_ids
    specs = [s.sample for s in steps if s.sample is not None]
    banned = [(r, t) for r, spec in enumerate(specs) for t in spec.banned_token_ids]
    ints = {
        "input_ids": input_ids,
        "positions": positions,
        "slots": slots,
        "logits_indices": (cu_q[1:] - 1)[[s.sample is not None for s in steps]],
        "pending_dst": np.array([cu_q[i + 1] - 1 for i, _ in pending], np.int64),
        "pending_src": np.array([r for _, r in pending], np.int64),
        "top_k": np.array([spec.params.top_k for spec in specs], np.int64),
        "seeds": np.array([spec.seed for spec in specs], np.int64),
        "offsets": np.array([spec.offset for spec in specs], np.int64),
        "banned_rows": np.array([r for r, _ in banned], np.int64),
        "banned_tokens": np.array([t for _, t in banned], np.int64),
    }
    int32s = {
        "cu_q": cu_q.astype(np.int32),
        "seq_lens": seq_lens.astype(np.int32),
        "tables": tables,
    }
    floats = {
        "temperatures": np.array([spec.params.temperature for spec in specs], np.float32),
        "top_p": np.array([spec.params.top_p for spec in specs], np.float32),
        "min_p": np.array([spec.params.min_p for spec in specs], np.float32),
    }
    return ints, int32s, floats


def _q_len(step: SeqStep) -> int:
    return len(step.token_ids) + (step.pending_row is not None)


def _leading_decodes(cu_q: np.ndarray) -> int:
    multi = np.flatnonzero(np.diff(cu_q) != 1)
    return int(multi[0]) if len(multi) else len(cu_q) - 1


def _copier(device: torch.device) -> Callable[[np.ndarray], torch.Tensor]:
    if device.type == "cpu":
        return torch.from_numpy

    def copy(array: np.ndarray) -> torch.Tensor:
        # Pinned staging: the copy is asynchronous, and the caching host allocator keeps the
        # buffer alive until the copy has run.
        return torch.from_numpy(array).pin_memory().to(device, non_blocking=True)

    return copy


def _split(flat: torch.Tensor, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    return dict(zip(sizes, torch.split(flat, list(sizes.values()))))


def _sampling(
    steps: Sequence[SeqStep], views: dict[str, torch.Tensor], floats: torch.Tensor
) -> SamplingTensors:
    params = [s.sample.params for s in steps if s.sample is not None]
    asked = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingTensors(
        temperatures=floats[0],
        top_k=views["top_k"],
        top_p=floats[1],
        min_p=floats[2],
        seeds=views["seeds"],
        offsets=views["offsets"],
        banned_rows=views["banned_rows"],
        banned_tokens=views["banned_tokens"],
        all_greedy=all(p.is_greedy for p in params),
        any_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in params),
        any_min_p=any(p.min_p > 0.0 for p in params),
        num_logprobs=max(asked, default=-1),
    )
