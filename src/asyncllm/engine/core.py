"""The engine's synchronous core: admission checks, step building and output processing.

No event loop here: `AsyncEngine` drives this object from its loop task: `schedule()` and
`prepare()` a step, launch it on the runner, then `sampled()` / `apply()` / `end_step()`
hand the drawn tokens to their requests.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, cast

import torch
import xxhash

from asyncllm.config import EngineConfig
from asyncllm.engine.block_manager import BlockManager
from asyncllm.engine.inputs import sampling_row
from asyncllm.engine.persistent_batch import PersistentBatch
from asyncllm.engine.request import Request, RequestStatus
from asyncllm.engine.runner import ModelRunner, PreparedStep, SampleSpec, StepBatch, StepResult
from asyncllm.engine.scheduler import ScheduledStep, Scheduler
from asyncllm.engine.workers import start_runner
from asyncllm.errors import (
    EngineOverloadedError,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
)
from asyncllm.model.config import ModelConfig
from asyncllm.outputs import EngineStats, TokenLogprobs
from asyncllm.parallel import check_divisible
from asyncllm.sampling import SamplingParams
from asyncllm.tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL_DIR", "EngineCore", "Prompt", "Sampled"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-qwen3"

Prompt = str | Sequence[int]


class Sampled(NamedTuple):
    """What one step drew: a token per request of `requests` and step of the run, listed
    step by step (the first step's tokens, in the order of `requests`, then the second's)."""

    requests: list[Request]
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    num_steps: int


class _PhaseClock:
    """`EngineCore.clock`: adds the wall time of a `with` block to `seconds[phase]` (a plain
    class: a generator-based context manager costs a few microseconds more, several times a
    step)."""

    __slots__ = ("_phase", "_seconds", "_start")

    def __init__(self, seconds: dict[str, float], phase: str) -> None:
        self._seconds, self._phase, self._start = seconds, phase, 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self._seconds[self._phase] += time.perf_counter() - self._start


class EngineCore:
    """Owns the tokenizer, model runner, block manager and scheduler of one engine."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_dir = Path(config.model) if config.model is not None else DEFAULT_MODEL_DIR
        if not self.model_dir.is_dir():
            raise ModelLoadError(f"model directory {self.model_dir} does not exist")
        self.model_config = ModelConfig.from_dir(self.model_dir)
        cfg = self.model_config
        check_divisible(
            config.tensor_parallel_size, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size,
            intermediate_size=cfg.intermediate_size,
            moe_intermediate_size=cfg.moe.moe_intermediate_size if cfg.moe else None,
        )  # fmt: skip
        self.tokenizer = Tokenizer(self.model_dir)
        self._rng = random.Random(config.seed)
        # Automatic request ids: a random prefix per engine and a counter, so they never
        # collide with another engine's, nor with an id a user would plausibly choose.
        self._id_prefix = uuid.uuid4().hex
        self._ids = itertools.count()
        self.runner: ModelRunner | None = None
        self.attention_backend = ""
        self.loaded_at: float | None = None
        self.generated_tokens = 0
        self.num_steps = 0
        self.num_finished = 0
        self._next_step_id = 0
        self._processed_step_id = -1
        self._deferred: list[Request] = []
        """Finished requests whose blocks a launched step may still write to."""
        self._holding: list[Request] = []
        """Choice 0 of n > 1 requests whose other choices wait for its prompt's KV."""
        self.num_rejected_overloaded = 0
        self.step_seconds: dict[str, float] = dict.fromkeys(
            ("schedule", "prepare", "launch", "wait", "process"), 0.0
        )

    def clock(self, phase: str) -> _PhaseClock:
        """Add the wall time of the block to `step_seconds[phase]`."""
        return _PhaseClock(self.step_seconds, phase)

    # ---- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        """Load the weights, allocate the KV pool, and size `max_model_len` (slow: run it off
        the event loop)."""
        self.runner = start_runner(self.model_dir, self.model_config, self.config)
        self.attention_backend = self.runner.attn_backend.name
        self.max_model_len = self.runner.max_model_len
        self.loaded_at = time.monotonic()
        self.blocks = BlockManager(
            self.runner.num_kv_blocks, self.config.block_size, self.config.enable_prefix_caching
        )
        self.persistent = PersistentBatch(self.config.max_num_seqs, self.config.block_size)
        self.scheduler = Scheduler(
            self.blocks,
            self.config.max_num_seqs,
            self.config.max_num_batched_tokens,
            self.config.num_decode_steps,
        )

    # ---- admission ---------------------------------------------------------------------------

    def make_request(
        self, prompt: Prompt, params: SamplingParams | None, request_id: str | None
    ) -> Request:
        """Validate a submission and build its `Request` (choice 0; with n > 1 the other
        choices are its `siblings`, sharing its request id); raises `InvalidRequestError`."""
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise InvalidRequestError(f"request_id must be a non-empty str, got {request_id!r}")
        params = _check_params(params)
        token_ids = self._prompt_ids(prompt)
        max_tokens = self._check_length(len(token_ids), params)
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids must be in [0, {vocab}), got {params.stop_token_ids}"
            )
        request_id = request_id if request_id is not None else self._new_request_id()
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        choices = [
            Request(
                request_id=request_id,
                prompt_token_ids=token_ids,
                params=params,
                max_tokens=max_tokens,
                seed=choice_seed(seed, choice),
                eos_token_ids=frozenset(self.model_config.eos_token_ids),
                detokenizer=self.tokenizer.detokenizer(),
                choice=choice,
            )
            for choice in range(params.n)
        ]
        choices[0].siblings = choices[1:]
        return choices[0]

    def _new_request_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    def add(self, req: Request) -> None:
        """Queue a request from `make_request` (all its choices); raises
        `EngineOverloadedError`, changing nothing, when the waiting queue is full."""
        limit = self.config.max_waiting_requests
        if limit is not None and (waiting := self.num_waiting) >= limit:
            self.num_rejected_overloaded += 1
            raise EngineOverloadedError(
                f"the engine is overloaded: {waiting} sequences are waiting "
                f"(max_waiting_requests={limit}); retry later"
            )
        self.scheduler.add(req)
        if not req.siblings:
            return
        if self.config.enable_prefix_caching:
            # The other choices start once choice 0 has computed the prompt, from its blocks.
            for sibling in req.siblings:
                sibling.status = RequestStatus.HELD
            self._holding.append(req)
        else:
            for sibling in req.siblings:
                self.scheduler.add(sibling)

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for admission, held choices included."""
        held = RequestStatus.HELD
        num_held = sum(s.status is held for req in self._holding for s in req.siblings)
        return len(self.scheduler.waiting) + num_held

    def _prompt_ids(self, prompt: object) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)):
            raise InvalidRequestError(
                f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}"
            )
        ids: list[object] = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        for position, token in enumerate(ids):
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise InvalidRequestError(
                    f"prompt token {position} is {token!r}: token ids must be ints in [0, {vocab})"
                )
        return cast(list[int], ids)

    def _check_length(self, prompt_len: int, params: SamplingParams) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise PromptTooLongError(
                f"prompt has {prompt_len} tokens; max_model_len {self.max_model_len} leaves no "
                "room to generate"
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise PromptTooLongError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len {self.max_model_len}"
            )
        if params.min_tokens > room:
            raise PromptTooLongError(
                f"prompt ({prompt_len} tokens) + min_tokens ({params.min_tokens}) exceeds "
                f"max_model_len {self.max_model_len}"
            )
        max_tokens = params.max_tokens or room
        needed = self.blocks.blocks_needed(prompt_len + max_tokens)
        if needed > self.blocks.num_blocks:
            raise PromptTooLongError(
                f"the request needs {needed} KV blocks but the pool has {self.blocks.num_blocks}"
            )
        return max_tokens

    # ---- stepping ----------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def schedule(self) -> ScheduledStep | None:
        """Choose the next step (None when nothing can run)."""
        step = self.scheduler.schedule(self._next_step_id)
        if not step.requests:
            return None
        self._next_step_id += 1
        return step

    def prepare(self, step: ScheduledStep) -> PreparedStep:
        """Turn a scheduled step into device inputs."""
        assert self.runner is not None, "prepare() before load()"
        host = None
        if step.num_tokens.count(1) == len(step.num_tokens) and all(step.samples):
            # A decode step (the steady state): packed from the persistent batch's slots.
            host = self.persistent.pack(step.requests, step.num_steps, step.step_id, step.counts)
        if host is None:
            return self.runner.prepare(self._batch(step))
        return self.runner.prepare_packed(host)

    def _batch(self, step: ScheduledStep) -> StepBatch:
        run, step_id = step.num_steps, step.step_id
        batch, row = StepBatch(run), 0
        add = batch.add
        for req, count, samples in zip(step.requests, step.num_tokens, step.samples):
            # A run's first step computes the first of the `run` tokens it adds.
            start = req.num_computed_tokens - count * run
            tokens = req.token_ids[start : start + count]
            # A token drawn by the step before is not here yet: the runner takes it from the
            # device, from that step's row for this request.
            pending_row = None
            if len(tokens) < count:
                assert req.sample_step == step_id - 1, "a pending token skipped a step"
                pending_row = req.sample_row
            sample = None
            if samples:
                sample = self._sample_spec(req, run)
                req.sample_row, req.sample_step, row = row, step_id, row + 1
            add(tokens, start, req.block_array(), pending_row, sample)
        return batch

    @staticmethod
    def _sample_spec(req: Request, run: int) -> SampleSpec:
        drawn = len(req.token_ids) - len(req.prompt_token_ids) + req.num_pending_tokens - run
        params = req.params
        if req.sampling_row is None:
            req.sampling_row = sampling_row(params, req.seed)
        banned = req.banned_token_ids(drawn)
        if not params.has_penalties:
            return SampleSpec(params, req.seed, drawn, banned, row=req.sampling_row)
        return SampleSpec(params, req.seed, drawn, banned, req.output_array(),
                          req.distinct_prompt_array(), req.sampling_row)  # fmt: skip

    def sampled(self, step: ScheduledStep, result: StepResult) -> Sampled:
        """What a completed step drew, for `apply` to hand to its requests."""
        self._processed_step_id = step.step_id
        samplers = list(itertools.compress(step.requests, step.samples))
        return Sampled(samplers, result.token_ids, result.logprobs, step.num_steps)

    def apply(self, sampled: Sampled, start: int, stop: int, now: float) -> list[Request]:
        """Give requests `start` to `stop` of `sampled` the tokens their step drew (as many
        as their stop rules and limit let them keep); returns those that took them (the
        others had ended meanwhile)."""
        reqs = sampled.requests
        if sampled.num_steps > 1:
            return [req for row, req in enumerate(reqs[start:stop], start)
                    if self._apply_drawn(sampled, row, now)]  # fmt: skip
        # One token each: the common case, for every request every step, so for requests
        # without stop strings or logprobs (their text is decoded when read: see
        # `Request.decodes_lazily`) `_apply_drawn` is inlined, down to `Request.append_one`.
        taken = []
        for row, req in enumerate(reqs[start:stop], start):
            params = req.params
            if params.stop or params.logprobs is not None:
                if self._apply_drawn(sampled, row, now):
                    taken.append(req)
                continue
            req.num_pending_tokens -= 1
            if req.finish_reason is not None:  # aborted or stopped while the step ran
                continue
            taken.append(req)
            self.generated_tokens += 1
            if req.append_one(sampled.token_ids[row], now):
                self._release_when_idle(req)
        return taken

    def _apply_drawn(self, sampled: Sampled, row: int, now: float) -> bool:
        """`apply` of one request, in general (a decode run gives it a token per step, in
        order; logprobs); False when it had ended meanwhile."""
        req, rows = sampled.requests[row], len(sampled.requests)
        # The tokens of a run are listed step by step: a request's are every rows-th.
        tokens, logprobs = sampled.token_ids[row::rows], sampled.logprobs[row::rows]
        req.num_pending_tokens -= len(tokens)
        if req.finish_reason is not None:  # aborted or stopped while the step ran
            return False
        before = len(req.token_ids)
        if req.decodes_lazily:
            req.append_tokens(tokens, logprobs, now)
        else:
            for token_id, token_logprobs in zip(tokens, logprobs):
                req.append_token(token_id, token_logprobs, now)
                if req.is_finished:
                    break  # a run's tokens after the stop are dropped
        # max_tokens already respects max_model_len
        self.generated_tokens += len(req.token_ids) - before
        if req.is_finished:
            self._release_when_idle(req)
        return True

    def end_step(self, step: ScheduledStep) -> None:
        """Book-keeping once all of a step's tokens are applied."""
        self.num_steps += step.num_steps
        self.scheduler.after_step(step)
        self._release_deferred()
        if self._holding:
            self._release_held_choices()

    def _release_held_choices(self) -> None:
        """Queue the other choices of requests whose choice 0 has computed its prompt (its
        full blocks are registered by now), at the front: they arrived before anyone
        waiting, and so they find the prompt's blocks still cached."""
        still_holding = []
        for req in self._holding:
            if not (req.num_output_tokens or req.is_finished):
                still_holding.append(req)
                continue
            held = [s for s in req.siblings if s.status is RequestStatus.HELD]
            for sibling in held:
                sibling.status = RequestStatus.WAITING
            self.scheduler.add_first(held)
        self._holding = still_holding

    def abort(self, req: Request) -> None:
        """End `req` and its other choices now; their blocks go back at once, or as soon as
        no launched step can still write to them."""
        for choice in req.choices:
            if not choice.is_finished:
                choice.finish("abort")
                self._release_when_idle(choice)

    def _release_when_idle(self, req: Request) -> None:
        in_flight = req.last_step_id > self._processed_step_id
        if in_flight and req.status is RequestStatus.RUNNING:
            self._deferred.append(req)
        else:
            self._release(req)

    def _release_deferred(self) -> None:
        still_busy = []
        for req in self._deferred:
            if req.last_step_id > self._processed_step_id:
                still_busy.append(req)
            else:
                self._release(req)
        self._deferred = still_busy

    def _release(self, req: Request, computed: bool = True) -> None:
        """Take `req` out of the scheduler and free its blocks. With `computed` (no step
        can still write to them), its full blocks stay findable in the prefix cache first:
        e.g. a request that ends with its first token leaves its prompt to later ones."""
        if req.status is RequestStatus.RELEASED:
            return
        if computed and req.status is RequestStatus.RUNNING:
            self.blocks.register_full_blocks(req)
        if req.status is not RequestStatus.HELD:  # a held choice was never queued
            self.scheduler.remove(req)
        req.status = RequestStatus.RELEASED
        self.num_finished += 1

    def fail_all(self) -> list[Request]:
        """Drop every request (the engine died); returns them so their streams can be told."""
        held = [s for req in self._holding for s in req.siblings if s.status is RequestStatus.HELD]
        victims = [*self.scheduler.running, *self.scheduler.waiting, *held]
        self._holding.clear()
        for req in victims:
            req.finish("abort")
            self._release(req, computed=False)  # the failed step may have left K/V half-written
        return victims

    def close(self) -> None:
        """Give every request's blocks back and drop the model (the engine has stopped: no
        step is in flight any more)."""
        try:
            if hasattr(self, "scheduler"):  # loaded
                self.fail_all()
                self._deferred.clear()
        except Exception:  # a failed step may have left the bookkeeping half-updated
            logger.exception("releasing the requests at shutdown failed")
        finally:
            self.unload()

    def unload(self) -> None:
        """Drop the model, KV pool and CUDA graphs (the engine has shut down)."""
        if self.runner is not None:
            self.attention_backend = self.runner.attn_backend.name
            # Stops the other tensor-parallel ranks (if any), waits for launched steps to
            # finish on the device, and drops the model.
            self.runner.close()
            self.runner = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the freed memory back to the device

    def stats(self) -> EngineStats:
        """A snapshot of queue and KV-pool state."""
        scheduler, blocks = getattr(self, "scheduler", None), getattr(self, "blocks", None)
        return EngineStats(
            running=len(scheduler.running) if scheduler else 0,
            waiting=self.num_waiting if scheduler else 0,
            kv_blocks_total=blocks.num_blocks if blocks else 0,
            kv_blocks_free=blocks.num_free_blocks if blocks else 0,
            kv_blocks_cached=blocks.num_cached_blocks if blocks else 0,
            prefix_cache_queries=blocks.query_tokens if blocks else 0,
            prefix_cache_hit_tokens=blocks.hit_tokens if blocks else 0,
            num_steps=self.num_steps,
            num_preemptions=scheduler.num_preemptions if scheduler else 0,
            num_finished=self.num_finished,
            prompt_tokens_total=self.blocks.query_tokens if blocks else 0,
            generated_tokens_total=self.generated_tokens,
            uptime_s=time.monotonic() - self.loaded_at if self.loaded_at else 0.0,
            attention_backend=self.attention_backend,
            step_seconds=dict(self.step_seconds),
            num_rejected_overloaded=self.num_rejected_overloaded,
        )


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request seeded `seed` (both in [0, 2**64)): choice 0
    keeps the request's seed (so n=1 is unchanged), the others hash (seed, choice)."""
    if choice == 0:
        return seed
    data = seed.to_bytes(8, "little") + choice.to_bytes(8, "little")
    digest: int = xxhash.xxh3_64_intdigest(data)
    return digest


def _check_params(params: object) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
    return params
