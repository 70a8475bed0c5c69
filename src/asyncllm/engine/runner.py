"""The model runner: owns the model, the KV pool, the sampler and (on CUDA) a stream.

A step goes in as `SeqStep`s, is turned into device tensors by `prepare`, is enqueued by
`launch` (CUDA-graph replay for decode steps) and read back by `collect`. On CUDA every
kernel runs on the runner's own stream, and `collect` waits on an event, so the thread that
schedules the next step never blocks on the GPU.

Under tensor parallelism the same class runs on every rank, each with its shard of the model
and KV heads. Rank 0's runner also sends each step's `HostStep` to the other ranks (through
its `workers`), samples, and broadcasts the drawn tokens, which the next step's pending inputs
read on every rank; the other ranks run `launch` on what they receive and never sample.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from asyncllm.config import EngineConfig
from asyncllm.context import forward_context
from asyncllm.engine.cuda_graphs import DecodeGraphs
from asyncllm.engine.inputs import (
    HostStep,
    PinnedStaging,
    PreparedStep,
    SampleSpec,
    SeqStep,
    StepBatch,
    device_step,
    next_decode_step,
    pack_step,
)
from asyncllm.engine.memory import allocation_errors, require_fits
from asyncllm.errors import ConfigError
from asyncllm.kernels import create_attention_backend
from asyncllm.layers.attention import PagedAttention
from asyncllm.layers.sampler import Sampler, SamplerOutput
from asyncllm.model.base import CausalLM
from asyncllm.model.config import ModelConfig
from asyncllm.model.loader import load_model
from asyncllm.outputs import TokenLogprobs
from asyncllm.parallel import TPGroup, kv_head_shard
from asyncllm.sampling import SamplingParams

if TYPE_CHECKING:
    from asyncllm.engine.workers import WorkerPool

__all__ = [
    "LaunchedStep",
    "ModelRunner",
    "PreparedStep",
    "SampleSpec",
    "SeqStep",
    "StepBatch",
    "StepResult",
]

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_BYTES = 1 << 30
_LOAD_TIMEOUT_S = 3600.0  # ranks wait this long for each other to load their shards
_CLOSE_TIMEOUT_S = 60.0  # a closing runner waits this long for launched steps to finish


class StepResult(NamedTuple):
    """Tokens drawn in one step, in the order of the sequences that asked to sample (a
    decode run's: the first step's tokens, then the second's, ...)."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class LaunchedStep(NamedTuple):
    """A step enqueued on the device; `collect` reads it back."""

    token_ids: torch.Tensor
    """Drawn tokens, on the device: the next step's pending inputs come from here (a decode
    run's last step's)."""
    host: SamplerOutput | None
    """Host copies of the sampler's output (complete once `done` has fired); None on ranks
    other than 0, which do not sample."""
    done: torch.cuda.Event | None


class ModelRunner:
    """Loads a model (or, with a `TPGroup`, this rank's shard of it) onto a device, allocates
    its paged KV pool and executes steps."""

    def __init__(
        self,
        model_dir: Path,
        model_config: ModelConfig,
        config: EngineConfig,
        tp: TPGroup | None = None,
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.tp = tp or TPGroup()
        self.device = self.tp.device or config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        self.kv_dtype = config.kv_torch_dtype(self.device)
        self.block_size = config.block_size
        cuda = self.device.type == "cuda"
        self.stream = _new_stream(self.device) if cuda else None
        # Sized for the largest step, so pinned memory is allocated once, not mid-run.
        self.staging = PinnedStaging(self.device, slot_bytes=1 << 20) if cuda else None
        # More buffers than steps in flight: one is reused only after its step was collected.
        rows = config.max_num_seqs * config.num_decode_steps  # a run's tokens, step by step
        self._host_tokens = [_pinned_tokens(rows) for _ in range(6)] if cuda else []
        self._next_host = 0
        self.workers: WorkerPool | None = None
        """On rank 0 of a tensor-parallel group: the other ranks, attached once all are ready
        (until then every rank runs the same start-up steps on its own)."""
        with self.on_stream():
            self.model = self._load_model(model_dir)
            if self.tp.is_parallel:  # start measuring and capturing together
                self.tp.cpu_min(0, timeout_s=_LOAD_TIMEOUT_S)
            self.attn_backend = create_attention_backend(
                config.attention_backend,
                self.device,
                self.block_size,
                model_config.head_dim,
                self.dtype,
                kv_dtype=self.kv_dtype,
            )
            self.sampler = Sampler()
            self.graphs: DecodeGraphs | None = None
            self.num_kv_blocks = self._allocate_kv_cache()
            self.max_model_len = self._resolve_max_model_len()
            self.graphs = self._capture_graphs()
            if cuda:
                self._warm_up()

    def _load_model(self, model_dir: Path) -> CausalLM:
        """The model's weights on the device; `ConfigError` (not a raw allocator error) when
        they, or the rotary tables that position_limit sizes, cannot fit."""
        cfg = self.model_config
        extended = cfg.position_limit > cfg.max_position_embeddings
        rotary = (
            f"the rotary tables ({cfg.rotary_table_bytes} bytes for max_position_embeddings="
            f"{cfg.max_position_embeddings} in config.json"
            + (f", {cfg.position_limit} positions with its yarn scaling)" if extended else ")")
        )
        fix = "use a model with a smaller max_position_embeddings, or a device with more memory"
        require_fits(cfg.rotary_table_bytes, self.device, rotary, fix)
        with allocation_errors(self.device, f"the model's weights and {rotary}", fix):
            return load_model(model_dir, cfg, self.device, self.dtype, self.tp)

    def _capture_graphs(self) -> DecodeGraphs | None:
        """CUDA graphs of decode steps, unless on CPU, disabled, or the backend can't."""
        if self.stream is None or self.config.enforce_eager:
            return None
        if not self.attn_backend.supports_cuda_graphs:
            logger.info("attention backend %s: decode steps run eagerly", self.attn_backend.name)
            return None
        return DecodeGraphs(self.model, self.attn_backend, self.stream, self.config.max_num_seqs,
                            self.max_model_len, self.block_size,
                            collectives=self.tp.is_parallel)  # fmt: skip

    def on_stream(self) -> contextlib.AbstractContextManager[Any]:
        """Make the runner's CUDA stream current in this thread (no-op on CPU). A plain
        context manager, not a generator-based one: it is entered several times a step."""
        if self.stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.stream)

    # ---- KV pool -------------------------------------------------------------------------

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank holds (all of them at world size 1)."""
        heads = self.model_config.num_key_value_heads
        return heads // kv_head_shard(heads, self.tp)[1]

    @property
    def kv_block_bytes(self) -> int:
        """Bytes one block takes on this rank across all layers, keys and values."""
        cfg = self.model_config
        per_token = 2 * cfg.num_hidden_layers * self.num_kv_heads * cfg.head_dim
        return per_token * self.block_size * self.kv_dtype.itemsize

    def _bind_kv_cache(self, num_blocks: int) -> None:
        cfg = self.model_config
        shape = (2, cfg.num_hidden_layers, num_blocks, self.block_size,
                 self.num_kv_heads, cfg.head_dim)  # fmt: skip
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        for index, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, index], self.kv_cache[1, index]

    def _allocate_kv_cache(self) -> int:
        num_blocks = self.config.num_kv_blocks or self._blocks_that_fit()
        if self.tp.is_parallel:  # a block id means the same slots on every rank
            num_blocks = self.tp.cpu_min(num_blocks)
        nbytes = num_blocks * self.kv_block_bytes
        field = self._kv_pool_setting()
        what = f"the KV pool ({num_blocks} blocks of {self.block_size} tokens, {nbytes} bytes)"
        remedy = f"lower {field}"
        require_fits(nbytes, self.device, what, remedy)
        with allocation_errors(self.device, what, remedy):
            self._bind_kv_cache(num_blocks)
        logger.info(
            "KV pool: %d blocks of %d tokens (%.1f MiB)",
            num_blocks, self.block_size, num_blocks * self.kv_block_bytes / 2**20,
        )  # fmt: skip
        return num_blocks

    def _kv_pool_setting(self) -> str:
        """The EngineConfig field that sized the KV pool (the one to change if it fails)."""
        if self.config.num_kv_blocks is not None:
            return "num_kv_blocks"
        if self.config.kv_cache_bytes is not None or self.device.type != "cuda":
            return "kv_cache_bytes"
        return "gpu_memory_utilization"

    def _blocks_that_fit(self) -> int:
        if self.config.kv_cache_bytes is not None:
            budget = self.config.kv_cache_bytes
        elif self.device.type == "cuda":
            tokens = max(self.config.max_num_batched_tokens, self.config.max_num_seqs)
            with allocation_errors(
                self.device,
                f"the activations of a step of {tokens} tokens",
                "lower max_num_batched_tokens or max_num_seqs",
            ):
                activations = self._profile_activation_bytes()
            free, total = torch.cuda.mem_get_info(self.device)
            # What torch holds in its cache but does not use is ours to take.
            used_elsewhere = total - free - torch.cuda.memory_reserved(self.device)
            ours = torch.cuda.memory_allocated(self.device)
            budget = int(total * self.config.gpu_memory_utilization) - used_elsewhere - ours
            budget -= activations
        else:
            budget = _DEFAULT_CPU_KV_BYTES
        blocks = budget // self.kv_block_bytes
        if blocks < 1:
            raise ConfigError(
                f"no memory left for the KV cache (budget {budget} bytes); lower the model size, "
                "raise gpu_memory_utilization, or set num_kv_blocks"
            )
        return int(blocks)

    def _profile_activation_bytes(self) -> int:
        """Peak memory of the largest step the engine can schedule (on a throw-away cache)."""
        num_seqs = self.config.max_num_seqs
        num_tokens = max(self.config.max_num_batched_tokens, num_seqs)
        lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        tables, next_block = [], 0
        for length in lengths:
            count = -(-length // self.block_size)
            tables.append(list(range(next_block, next_block + count)))
            next_block += count
        self._bind_kv_cache(next_block)
        worst = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01, logprobs=20,
                               repetition_penalty=1.1, frequency_penalty=0.1)  # fmt: skip
        steps = [SeqStep([0] * n, 0, t, SampleSpec(worst, 0, 0)) for n, t in zip(lengths, tables)]
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.execute(steps)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        self._bind_kv_cache(0)  # drop the throw-away cache before free memory is read
        logger.info("profiled step of %d tokens: %.1f MiB of activations", num_tokens, peak / 2**20)
        return int(peak)

    def _warm_up(self) -> None:
        """Run one step of each kind, so kernels compile now and not under the first requests
        (a JIT compile holds the GIL for a second and stalls the event loop)."""
        if self.num_kv_blocks * self.block_size < 64:
            return  # too small a pool to host the warm-up sequences (tests only)
        greedy = SampleSpec(SamplingParams(temperature=0), 0, 0)
        sampled = SampleSpec(SamplingParams(temperature=0.7), 0, 0)
        blocks = list(range(min(self.num_kv_blocks, 64)))
        decodes = [SeqStep([1], 20 + i, blocks, greedy) for i in range(3)]
        prefills = [SeqStep([1] * 37, 0, blocks, sampled), SeqStep([2] * 5, 40, blocks, greedy)]
        self.execute(decodes + prefills)  # mixed
        self.execute(prefills)
        self.execute(decodes)
        self.execute([SeqStep([1] * 4, 0, blocks, None)])  # a chunk that samples nothing
        # The sampler's kernels with penalties: greedy rows only, then sampled ones too.
        penalised = [SamplingParams(temperature=t, repetition_penalty=1.1) for t in (0, 0.7)]
        steps = [SeqStep([1], 20 + i, blocks, SampleSpec(p, 0, 0)) for i, p in enumerate(penalised)]
        self.execute(steps[:1])
        self.execute(steps)
        self.kv_cache.zero_()

    def _resolve_max_model_len(self) -> int:
        model_limit = self.model_config.position_limit
        pool_tokens = self.num_kv_blocks * self.block_size
        asked = self.config.max_model_len
        window = self.model_config.sliding_window
        if asked is None:
            if window is not None and window < min(model_limit, pool_tokens):
                # Within the window sliding attention is full attention: serve that much.
                logger.warning("max_model_len capped at config.json's sliding_window, %d", window)
                return window
            return min(model_limit, pool_tokens)
        if asked > model_limit:
            raise ConfigError(f"max_model_len {asked} exceeds the model's limit {model_limit}")
        if window is not None and asked > window:
            raise ConfigError(
                f"max_model_len {asked} exceeds the sliding_window {window} of config.json: "
                "sliding-window attention is not supported; use max_model_len <= "
                f"{window}, where it equals full attention"
            )
        if asked > pool_tokens:
            raise ConfigError(
                f"max_model_len {asked} does not fit the KV pool ({pool_tokens} tokens); "
                "raise num_kv_blocks / memory or lower max_model_len"
            )
        return asked

    # ---- one step ------------------------------------------------------------------------

    def execute(self, steps: Sequence[SeqStep]) -> StepResult:
        """Prepare, launch and collect one step (the simple synchronous path)."""
        return self.run(self.prepare(StepBatch.from_steps(steps)))

    def run(self, prepared: PreparedStep) -> StepResult:
        """Launch a prepared step and wait for its tokens."""
        return self.collect(self.launch(prepared, None))

    def prepare(self, batch: StepBatch) -> PreparedStep:
        """Turn `batch` into device tensors (enqueued on the runner's stream); on rank 0 of a
        tensor-parallel group, also send it to the other ranks."""
        return self.prepare_packed(pack_step(batch, self.block_size))

    def prepare_packed(self, host: HostStep) -> PreparedStep:
        """`prepare` for a step already packed on the host: on rank 0 of a tensor-parallel
        group, send it to the other ranks; then its device tensors (enqueued on the stream)."""
        if self.workers is not None:
            self.workers.send_step(host)
        return self.prepare_host(host)

    def prepare_host(self, host: HostStep) -> PreparedStep:
        """Device tensors for a step already packed on the host (enqueued on the stream).
        Made in inference mode, as `launch` uses them: the step's ~20 views then skip
        autograd's view bookkeeping (~10% of `device_step`'s time, net of entering it)."""
        with self.on_stream(), torch.inference_mode():
            return device_step(host, self.device, self.attn_backend, self.staging)

    @torch.inference_mode()
    def launch(self, prepared: PreparedStep, previous: LaunchedStep | None) -> LaunchedStep:
        """Enqueue the forward pass and sampling (of every step of a decode run); returns
        without waiting on the device.

        `previous` is the step launched just before, whose drawn tokens feed this step's
        pending inputs.
        """
        with self.on_stream(), self._worker_failures():
            input_ids = prepared.input_ids
            if prepared.pending_dst is not None:
                assert previous is not None, "a pending token needs the step that drew it"
                input_ids[prepared.pending_dst] = previous.token_ids[prepared.pending_src]
                _fill_pending_outputs(prepared, previous)
            outs: list[SamplerOutput] = []
            tokens = self._forward_and_sample(prepared, input_ids, outs)
            for _ in range(1, prepared.num_steps):
                prepared = next_decode_step(prepared, tokens, self.block_size)
                tokens = self._forward_and_sample(prepared, prepared.input_ids, outs)
            if not outs:  # a rank other than 0: it never samples
                return LaunchedStep(tokens, None, None)
            out = outs[0] if len(outs) == 1 else _concat_outputs(outs)
            if self.stream is None:
                return LaunchedStep(tokens, out, None)
            host = self._to_host(out)
            done = _new_event()
            done.record(self.stream)
            return LaunchedStep(tokens, host, done)

    def _forward_and_sample(
        self, prepared: PreparedStep, input_ids: torch.Tensor, outs: list[SamplerOutput]
    ) -> torch.Tensor:
        """One forward pass; the tokens it draws (on rank 0, whose output joins `outs`, and
        which broadcasts them to the other ranks, whose next inputs they are)."""
        logits = self._logits(prepared, input_ids)
        if not self.tp.is_driver:
            return self._receive_tokens(prepared)
        out: SamplerOutput = self.sampler(logits, prepared.sampling)
        if self.tp.is_parallel and out.token_ids.numel():
            self.tp.broadcast(out.token_ids)  # every rank's next pending inputs
        outs.append(out)
        return out.token_ids

    def _to_host(self, out: SamplerOutput) -> SamplerOutput:
        """Start copying the sampler's output to pinned host memory (tokens through a ring of
        reused buffers; logprobs, which are rare, into fresh ones)."""
        tokens = self._host_tokens[self._next_host][: out.token_ids.shape[0]]
        self._next_host = (self._next_host + 1) % len(self._host_tokens)
        tokens.copy_(out.token_ids, non_blocking=True)
        return SamplerOutput(tokens, *(_to_host(t) for t in out[1:]))

    def launches_cheaply(self, prepared: PreparedStep) -> bool:
        """Whether `launch` is a graph replay (microseconds of CPU, fine on any thread) rather
        than an eager forward pass (milliseconds of Python: keep it off the event loop)."""
        return self.graphs is not None and self.graphs.fits(prepared.ctx)

    def _logits(self, prepared: PreparedStep, input_ids: torch.Tensor) -> torch.Tensor:
        if self.graphs is not None and self.graphs.fits(prepared.ctx):
            return self.graphs.replay(prepared.ctx, input_ids)
        with forward_context(prepared.ctx.with_attn_metadata()):
            return self.model.compute_logits(self.model(input_ids))

    def _receive_tokens(self, prepared: PreparedStep) -> torch.Tensor:
        """The tokens rank 0 draws this step (a rank other than 0 never samples)."""
        rows = prepared.ctx.logits_indices.shape[0]
        tokens = torch.empty(rows, dtype=torch.int64, device=self.device)
        return self.tp.broadcast(tokens) if rows else tokens

    def collect(self, launched: LaunchedStep) -> StepResult:
        """Wait for a launched step (blocking only the calling thread) and read its tokens."""
        if launched.done is not None:
            if self.workers is None:
                launched.done.synchronize()
            else:  # also notices a rank that died or hangs, instead of waiting forever
                self.workers.wait(launched.done)
        if launched.host is None:
            return StepResult([], [])
        return _to_result(launched.host)

    def _worker_failures(self) -> contextlib.AbstractContextManager[None]:
        """On rank 0 of a group: a failure caused by another rank raises as that rank's."""
        return self.workers.failures() if self.workers is not None else contextlib.nullcontext()

    def close(self) -> None:
        """Stop the other ranks (rank 0 of a group), wait for launched steps to finish on the
        device, then let go of the model, its KV pool and its graphs now, even if something
        (a failure's traceback) still holds the runner."""
        if self.workers is not None:
            # First: the workers finish the steps they were sent (which rank 0's in-flight
            # steps wait on), or a failure aborted the groups (NCCL kernels waiting on a lost
            # rank exit), so the wait below ends.
            self.workers.close()
            self.workers = None
        if self.stream is not None:
            _wait_for_stream(self.stream, timeout_s=_CLOSE_TIMEOUT_S)
        self.graphs = None
        for name in ("model", "kv_cache"):
            if hasattr(self, name):
                delattr(self, name)


def _wait_for_stream(stream: torch.cuda.Stream, timeout_s: float) -> None:
    """Wait for the work enqueued on `stream` so far; give up (logging) after `timeout_s`."""
    done = _new_event()
    done.record(stream)
    deadline = time.monotonic() + timeout_s
    while not done.query():  # type: ignore[no-untyped-call]
        if time.monotonic() > deadline:
            logger.error("launched work still runs on %s after %g s", stream.device, timeout_s)
            return
        time.sleep(0.001)


def _fill_pending_outputs(prepared: PreparedStep, previous: LaunchedStep) -> None:
    """Penalised rows count their newest output too, which is still on the device."""
    penalties = prepared.sampling.penalties
    if penalties is not None and penalties.pending_index.numel():
        penalties.output_tokens[penalties.pending_index] = previous.token_ids[penalties.pending_src]


def _new_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


def _new_event() -> torch.cuda.Event:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


def _pinned_tokens(rows: int) -> torch.Tensor:
    return torch.empty(rows, dtype=torch.int64, pin_memory=True)


def _to_host(tensor: torch.Tensor | None) -> Any:
    # Into pinned memory, so the copy is truly asynchronous; `done` says when it has landed.
    if tensor is None:
        return None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _concat_outputs(outs: list[SamplerOutput]) -> SamplerOutput:
    """A decode run's outputs as one, step after step."""
    if outs[0].logprobs is None:
        return SamplerOutput(torch.cat([o.token_ids for o in outs]), None, None, None)
    return SamplerOutput(*(torch.cat(parts) for parts in zip(*outs)))


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
