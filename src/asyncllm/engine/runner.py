"""The model runner: owns the model, the KV pool and the sampler; runs one step at a time.

A step comes in as a list of `SeqStep`s (what each sequence computes now) and goes out as a
`StepResult` (one sampled token per sequence that asked for one). The runner turns the steps
into tensors, binds the `ForwardContext`, runs the model, and samples.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from asyncllm.config import EngineConfig
from asyncllm.context import ForwardContext, forward_context
from asyncllm.errors import ConfigError
from asyncllm.kernels import create_attention_backend
from asyncllm.layers.attention import PagedAttention
from asyncllm.layers.sampler import Sampler, SamplerOutput, SamplingTensors
from asyncllm.model.config import ModelConfig
from asyncllm.model.loader import load_model
from asyncllm.outputs import TokenLogprobs
from asyncllm.sampling import SamplingParams

__all__ = ["ModelRunner", "PreparedStep", "SampleSpec", "SeqStep", "StepResult"]

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_BYTES = 1 << 30


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
    """The new tokens whose K/V this step computes and writes."""
    start: int
    """Position of token_ids[0]; positions [0, start) are already in the cache."""
    block_table: Sequence[int]
    """Physical KV blocks of the sequence, covering at least start + len(token_ids) tokens."""
    sample: SampleSpec | None
    """None for a prefill chunk that does not reach the end of the known tokens."""


class StepResult(NamedTuple):
    """Tokens drawn in one step, in the order of the steps that asked to sample."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class PreparedStep(NamedTuple):
    """A step's inputs on the model's device, ready for `ModelRunner.run`."""

    ctx: ForwardContext
    input_ids: torch.Tensor
    sampling: SamplingTensors


class ModelRunner:
    """Loads a model onto a device, allocates its paged KV pool and executes steps."""

    def __init__(self, model_dir: Path, model_config: ModelConfig, config: EngineConfig) -> None:
        self.config = config
        self.model_config = model_config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        self.block_size = config.block_size
        self.model = load_model(model_dir, model_config, self.device, self.dtype)
        self.attn_backend = create_attention_backend(
            config.attention_backend,
            self.device,
            self.block_size,
            model_config.head_dim,
            self.dtype,
        )
        self.sampler = Sampler()
        self.num_kv_blocks = self._allocate_kv_cache()

    # ---- KV pool -------------------------------------------------------------------------

    @property
    def kv_block_bytes(self) -> int:
        """Bytes one block takes across all layers, keys and values."""
        cfg = self.model_config
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
        return per_token * self.block_size * self.dtype.itemsize

    def _allocate_kv_cache(self) -> int:
        num_blocks = self.config.num_kv_blocks or self._blocks_that_fit()
        cfg = self.model_config
        shape = (
            2,
            cfg.num_hidden_layers,
            num_blocks,
            self.block_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        for index, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, index], self.kv_cache[1, index]
        logger.info(
            "KV pool: %d blocks of %d tokens (%.1f MiB)",
            num_blocks,
            self.block_size,
            num_blocks * self.kv_block_bytes / 2**20,
        )
        return num_blocks

    def _blocks_that_fit(self) -> int:
        if self.config.kv_cache_bytes is not None:
            budget = self.config.kv_cache_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used_elsewhere = total - free
            budget = int(total * self.config.gpu_memory_utilization) - used_elsewhere
        else:
            budget = _DEFAULT_CPU_KV_BYTES
        blocks = budget // self.kv_block_bytes
        if blocks < 1:
            raise ConfigError(
                f"no memory left for the KV cache (budget {budget} bytes); lower the model size, "
                "raise gpu_memory_utilization, or set num_kv_blocks"
            )
        return int(blocks)

    # ---- one step ------------------------------------------------------------------------

    def execute(self, steps: Sequence[SeqStep]) -> StepResult:
        """Prepare and run one step (decodes first for the best kernels)."""
        return self.run(self.prepare(steps))

    def prepare(self, steps: Sequence[SeqStep]) -> PreparedStep:
        """Turn `steps` into device tensors. Reads the steps' lists, so the caller must not
        change them until this returns; the result is owned by the step alone."""
        ctx, input_ids = self._inputs(steps)
        return PreparedStep(ctx, input_ids, self._sampling_tensors(steps))

    @torch.inference_mode()
    def run(self, prepared: PreparedStep) -> StepResult:
        """Run the model with the step's forward context bound, then sample."""
        with forward_context(prepared.ctx):
            hidden = self.model(prepared.input_ids)
            logits = self.model.compute_logits(hidden)
        return _to_result(self.sampler(logits, prepared.sampling))

    def _inputs(self, steps: Sequence[SeqStep]) -> tuple[ForwardContext, torch.Tensor]:
        bs = self.block_size
        q_lens = np.fromiter((len(s.token_ids) for s in steps), np.int64, len(steps))
        starts = np.fromiter((s.start for s in steps), np.int64, len(steps))
        seq_lens = starts + q_lens
        cu_q = np.zeros(len(steps) + 1, np.int64)
        np.cumsum(q_lens, out=cu_q[1:])
        num_tokens = int(cu_q[-1])
        seq_of_token = np.repeat(np.arange(len(steps)), q_lens)
        positions = np.arange(num_tokens) - cu_q[seq_of_token] + starts[seq_of_token]

        max_blocks = int((seq_lens.max() + bs - 1) // bs)
        tables = np.zeros((len(steps), max_blocks), np.int64)
        for row, s in enumerate(steps):
            n = min(len(s.block_table), max_blocks)
            tables[row, :n] = s.block_table[:n]
        slots = tables[seq_of_token, positions // bs] * bs + positions % bs

        token_ids = np.fromiter((t for s in steps for t in s.token_ids), np.int64, num_tokens)
        sampled_rows = [i for i, s in enumerate(steps) if s.sample is not None]
        logits_indices = cu_q[1:][sampled_rows] - 1
        num_decodes = int(np.argmax(q_lens != 1)) if (q_lens != 1).any() else len(steps)

        def dev(array: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device, dtype, non_blocking=True)

        ctx = ForwardContext(
            positions=dev(positions),
            slot_mapping=dev(slots),
            cu_seqlens_q=dev(cu_q, torch.int32),
            seq_lens_k=dev(seq_lens, torch.int32),
            block_tables=dev(tables, torch.int32),
            logits_indices=dev(logits_indices),
            max_seqlen_q=int(q_lens.max()),
            max_seqlen_k=int(seq_lens.max()),
            num_decode_seqs=num_decodes,
            attn_backend=self.attn_backend,
        )
        ctx = dataclasses.replace(ctx, attn_metadata=self.attn_backend.build_metadata(ctx))
        return ctx, dev(token_ids)

    def _sampling_tensors(self, steps: Sequence[SeqStep]) -> SamplingTensors:
        specs = [s.sample for s in steps if s.sample is not None]
        params = [spec.params for spec in specs]
        banned = [(row, t) for row, spec in enumerate(specs) for t in spec.banned_token_ids]

        def dev(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        return SamplingTensors(
            temperatures=dev([p.temperature for p in params], torch.float32),
            top_k=dev([p.top_k for p in params], torch.int64),
            top_p=dev([p.top_p for p in params], torch.float32),
            min_p=dev([p.min_p for p in params], torch.float32),
            seeds=dev([spec.seed for spec in specs], torch.int64),
            offsets=dev([spec.offset for spec in specs], torch.int64),
            banned_rows=dev([row for row, _ in banned], torch.int64),
            banned_tokens=dev([t for _, t in banned], torch.int64),
            all_greedy=all(p.is_greedy for p in params),
            any_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in params),
            any_min_p=any(p.min_p > 0.0 for p in params),
            num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
        )


def _to_result(out: SamplerOutput) -> StepResult:
    token_ids: list[int] = out.token_ids.tolist()
    if out.logprobs is None or out.top_ids is None or out.top_logprobs is None:
        return StepResult(token_ids, [None] * len(token_ids))
    chosen = out.logprobs.tolist()
    top_ids, top_lp = out.top_ids.tolist(), out.top_logprobs.tolist()
    logprobs: list[TokenLogprobs | None] = [
        TokenLogprobs(chosen[i], tuple(zip(top_ids[i], top_lp[i]))) for i in range(len(chosen))
    ]
    return StepResult(token_ids, logprobs)
