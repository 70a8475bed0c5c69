"""CUDA graphs of decode steps: the whole forward pass (and LM head) as one replay.

A decode step of B sequences launches hundreds of small kernels; replaying a captured graph
turns that into one launch. Graphs are captured once per padded batch size, reading their
inputs from static buffers that a replay first fills; the forward context they were captured
with holds views of those same buffers. Padding rows write nowhere (slot -1) and attend to
nothing (length 0): every backend that captures must return finite rows for them (the
Triton and flash-attn backends return zeros; tests/gpu checks both).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from asyncllm.context import ForwardContext, forward_context
from asyncllm.engine.inputs import table_width

if TYPE_CHECKING:
    from asyncllm.kernels.base import AttentionBackend
    from asyncllm.model.base import CausalLM

__all__ = ["DecodeGraphs", "graph_batch_sizes"]

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes to capture: 1, 2, 4, 8, then every 16, up to max_num_seqs."""
    sizes = {s for s in (1, 2, 4, 8) if s <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 16))
    sizes.add(max_num_seqs)
    return sorted(sizes)


class DecodeGraphs:
    """Captured decode steps for every padded batch size up to `max_num_seqs`."""

    def __init__(
        self,
        model: CausalLM,
        backend: AttentionBackend,
        stream: torch.cuda.Stream,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        collectives: bool = False,
    ) -> None:
        self.model, self.backend, self.stream = model, backend, stream
        # A tensor-parallel model's graphs hold its NCCL collectives. Capture only this
        # thread's calls: NCCL's watchdog thread keeps querying events meanwhile.
        self._capture_mode = "thread_local" if collectives else "global"
        self.block_size = block_size
        self.sizes = graph_batch_sizes(max_num_seqs)
        device, largest = stream.device, self.sizes[-1]
        width = table_width(-(-max_model_len // block_size))  # as steps' tables are padded
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, width, dtype=torch.int32, device=device)
        # Every row is one query token: these never change.
        self.cu_seqlens_q = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(largest, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()

    def _context(self, size: int) -> ForwardContext:
        return ForwardContext(
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            cu_seqlens_q=self.cu_seqlens_q[: size + 1],
            seq_lens_k=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            logits_indices=self.logits_indices[:size],
            max_seqlen_q=1,
            max_seqlen_k=self.block_tables.shape[1] * self.block_size,
            num_decode_seqs=size,
            attn_backend=self.backend,
        )

    def _forward(self, size: int) -> torch.Tensor:
        # The backend's per-step metadata is computed inside the graph, from its buffers.
        with forward_context(self._context(size).with_attn_metadata()):
            return self.model.compute_logits(self.model(self.input_ids[:size]))

    @torch.inference_mode()
    def _capture(self) -> None:
        stream, pool = self.stream, None
        for size in reversed(self.sizes):  # largest first: the rest reuse its memory pool
            self._forward(size)  # warm-up (lazy inits)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                graph, pool=pool, stream=stream, capture_error_mode=self._capture_mode
            ):
                self.logits[size] = self._forward(size)
            self.graphs[size] = graph
            pool = graph.pool()
        logger.info("captured %d decode CUDA graphs (%s attention, batch sizes %s)",
                    len(self.sizes), self.backend.name, self.sizes)  # fmt: skip

    def padded_size(self, num_seqs: int) -> int | None:
        """The smallest captured size that holds `num_seqs` rows (None if none does)."""
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    def fits(self, ctx: ForwardContext) -> bool:
        """Whether the step described by `ctx` can replay a graph."""
        return (
            ctx.is_decode_only
            and ctx.block_tables.shape[1] <= self.block_tables.shape[1]
            and self.padded_size(ctx.num_seqs) is not None
        )

    def replay(self, ctx: ForwardContext, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the decode step of `ctx` through its graph; returns logits [num_seqs, V]."""
        rows = ctx.num_seqs
        size = self.padded_size(rows)
        assert size is not None
        self.input_ids[:rows].copy_(input_ids)
        self.positions[:rows].copy_(ctx.positions)
        self.slot_mapping[:rows].copy_(ctx.slot_mapping)
        self.seq_lens[:rows].copy_(ctx.seq_lens_k)
        self.block_tables[:rows, : ctx.block_tables.shape[1]].copy_(ctx.block_tables)
        if size > rows:  # padding rows: write nowhere, attend to nothing
            self.slot_mapping[rows:size].fill_(-1)
            self.seq_lens[rows:size].fill_(0)
        self.graphs[size].replay()
        return self.logits[size][:rows]
