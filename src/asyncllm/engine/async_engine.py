"""`AsyncEngine`: the engine as an async context manager living in the caller's event loop."""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from asyncllm.config import EngineConfig
from asyncllm.engine.core import EngineCore, Prompt
from asyncllm.engine.eventloop import running_event_loop
from asyncllm.engine.lifecycle import EngineState, Lifecycle
from asyncllm.engine.request import Request
from asyncllm.engine.runner import LaunchedStep, StepResult
from asyncllm.engine.scheduler import ScheduledStep
from asyncllm.engine.stream import RequestStream
from asyncllm.errors import (
    BlockingCallError,
    DuplicateRequestIdError,
    EngineNotRunningError,
    InvalidRequestError,
)
from asyncllm.outputs import EngineStats, RequestOutput, StreamToken
from asyncllm.sampling import SamplingParams

__all__ = ["AsyncEngine"]

logger = logging.getLogger("asyncllm")


class AsyncEngine:
    """An inference engine whose loop runs as a task in your event loop.

    Model work runs on the engine's own worker thread (and, on a GPU, on its own CUDA
    stream), so the event loop stays responsive while steps compute. Works under asyncio,
    uvloop and trio. The engine's loop task runs in its own `contextvars.Context`; log
    records about one request carry its id as `record.request_id`.

    Example:
        >>> engine = AsyncEngine.from_pretrained()  # the embedded tiny model
        >>> async def main():
        ...     async with engine:
        ...         async for token in engine.stream("Once upon a time"):
        ...             print(token.text, end="")
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._core = EngineCore(config)
        self._requests: dict[str, Request] = {}
        """Requests in flight by id: submitted, not finished or aborted yet."""
        self._lifecycle = Lifecycle(
            load=self._core.load,
            serve=self._serve_until_stopped,
            abort_all=self._abort_all,
            release=self._core.close,
        )
        self._wakeup = anyio.Event()
        self._drained: anyio.Event | None = None
        self._idle = anyio.Event()

    @classmethod
    def from_pretrained(cls, path: str | None = None, **overrides: Any) -> AsyncEngine:
        """An engine for the model in `path` (None: the embedded tiny model).

        `overrides` are `EngineConfig` fields; an unknown one raises `ConfigError`. The config
        and tokenizer are read now; weights load when the engine starts.
        """
        return cls(EngineConfig().replace(model=path, **overrides))

    @property
    def tokenizer(self) -> Any:
        """The model's `asyncllm.tokenizer.Tokenizer`."""
        return self._core.tokenizer

    @property
    def state(self) -> str:
        """Where the engine is in its life: "created", "starting", "running", "stopping" or
        "stopped"; "dead" from a failed step until it is stopped (it accepts no work)."""
        life = self._lifecycle
        if life.failure is not None and life.state is not EngineState.STOPPED:
            return "dead"
        return life.state.value

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output a request may have (known once the engine has started)."""
        if self._lifecycle.state in (EngineState.CREATED, EngineState.STARTING):
            raise EngineNotRunningError("max_model_len is sized when the engine starts")
        return self._core.max_model_len

    # ---- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Load the model (off the loop) and start the engine loop in the current event loop.

        Cancelling it (e.g. `asyncio.wait_for`) waits for the load in progress to finish,
        frees the model again, and leaves the engine stopped.
        """
        await self._lifecycle.start()
        logger.info("engine started: %s", self._core.stats())

    async def shutdown(self, *, drain: bool = False) -> None:
        """Stop the engine: abort what is in flight (or, with `drain=True`, let it finish
        first), stop the loop task and the worker thread, and free the model's memory.

        New requests are refused from the moment this is called. It must be awaited in the
        engine's event loop (else `WrongEventLoopError`), from any task; a call while another
        is stopping the engine waits for that one to finish. Bound a drain with a timeout of
        your own (e.g. `anyio.fail_after`): cancelling it aborts the rest. Cancelled at any
        point, it still finishes stopping and freeing everything, then raises the
        cancellation.
        """
        await self._lifecycle.stop(self._wait_drained if drain else None)

    # ---- submitting --------------------------------------------------------------------------

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> RequestStream:
        """Submit a request and return the async iterator of its tokens.

        `prompt` is text or a list of token ids. Raises `InvalidRequestError` (or its
        children `PromptTooLongError`, `DuplicateRequestIdError` for the id of a request still
        in flight) at once for a bad request, and `EngineOverloadedError` when
        `EngineConfig.max_waiting_requests` sequences are already waiting; the engine keeps
        serving. Without `request_id` the engine makes one that no other request of any engine
        shares. With `params.n > 1` the one stream carries every choice (`StreamToken.choice`),
        and they all share the request id.
        """
        self._lifecycle.check_usable()
        req = self._core.make_request(prompt, params, request_id)
        if req.request_id in self._requests:  # its head choice, while any choice runs
            raise DuplicateRequestIdError(
                f"request id {req.request_id!r} is already in flight; choose another, or "
                "leave request_id out to get a unique one"
            )
        self._core.add(req)  # last check (EngineOverloadedError): it queues the request
        self._requests[req.request_id] = req
        if self._idle.is_set():
            self._idle = anyio.Event()
        self._wakeup.set()
        _log_request(logging.DEBUG, req, "added: %d prompt tokens", req.num_prompt_tokens)
        return RequestStream(self, req)

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> RequestOutput:
        """Run one request to completion and return its `RequestOutput` (with every choice
        in `choices` when `params.n > 1`)."""
        return await _read_to_end(self.stream(prompt, params, request_id=request_id))

    async def generate_many(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Run many requests concurrently; outputs come back in the order of `prompts`.

        `prompts` is a list (one prompt alone is an `InvalidRequestError`: use `generate`).
        `params` is one `SamplingParams` for all, or one per prompt. `progress=True` shows a
        tqdm progress bar of finished requests. Every prompt is checked before any runs: a
        bad one raises and submits nothing. If one request fails, the rest are aborted and
        its error (an `EngineError`) is raised.
        """
        streams = self._submit_all(prompts, params)
        outputs: list[RequestOutput | None] = [None] * len(streams)
        failures: list[Exception] = []
        bar = _progress_bar(len(streams)) if progress else None

        async def drain(index: int, group: anyio.abc.TaskGroup) -> None:
            try:
                outputs[index] = await _read_to_end(streams[index])
            except Exception as exc:  # raised as itself below, not inside an ExceptionGroup
                failures.append(exc)
                group.cancel_scope.cancel()  # the other streams abort as they unwind
                return
            if bar is not None:
                bar.update(1)

        try:
            async with anyio.create_task_group() as group:
                for index in range(len(streams)):
                    group.start_soon(drain, index, group)
        finally:
            if bar is not None:
                bar.close()
        if failures:
            raise failures[0]
        return [out for out in outputs if out is not None]

    def _submit_all(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[RequestStream]:
        """One stream per prompt, or none: a rejected prompt aborts those submitted before."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise InvalidRequestError(
                f"prompts must be a list of prompts, got {type(prompts).__name__}; "
                "use generate() for one prompt"
            )
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(params)} params for {len(prompts)} prompts")
        streams: list[RequestStream] = []
        try:
            for prompt, sampling in zip(prompts, params):
                streams.append(self.stream(prompt, sampling))
        except BaseException:
            for stream in streams:
                self._abort_request(stream._request)
            raise
        return streams

    async def idle(self) -> None:
        """Wait until no request is waiting or running and every KV block is released
        (returns at once when the engine is idle or not running)."""
        self._lifecycle.check_loop()
        while self._lifecycle.serving and not self._idle.is_set():
            await self._idle.wait()

    def abort(self, request_id: str) -> None:
        """Abort a request (every choice of it) and free its KV blocks; unknown or finished
        ids are ignored.

        Call it in the engine's event loop (else `WrongEventLoopError`); from another thread,
        use `abort_threadsafe`.
        """
        self._lifecycle.check_loop()
        req = self._requests.get(request_id)
        if req is not None:
            self._abort_request(req)

    def abort_threadsafe(self, request_id: str) -> None:
        """`abort` from any thread (it runs on the engine's loop)."""
        if not self._lifecycle.serving:
            return
        if self._lifecycle.in_loop_thread():
            self.abort(request_id)
        else:
            self._lifecycle.call_soon_threadsafe(self.abort, request_id)

    def _abort_request(self, req: Request) -> None:
        """Abort `req` itself (a stream aborts its own request, never a later one that
        reuses its id)."""
        if self._requests.get(req.request_id) is not req:
            return  # finished already: nothing to do
        del self._requests[req.request_id]
        self._core.abort(req)
        self._notify(req)
        _log_request(logging.DEBUG, req, "aborted")
        self._note_if_drained()

    def _abort_soon(self, req: Request) -> None:
        """`_abort_request` from any thread or finaliser: queued onto the engine's loop, never
        run inline (a finaliser may fire in the middle of a step)."""
        if self._lifecycle.serving:
            self._lifecycle.call_soon_threadsafe(self._abort_request, req)

    def _abort_all(self) -> None:
        for req in list(self._requests.values()):
            self._abort_request(req)

    # ---- from other threads ------------------------------------------------------------------

    def stream_threadsafe(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> Iterator[StreamToken]:
        """`stream()` for a thread other than the engine loop's (e.g. a WSGI worker).

        Returns a blocking iterator; each step waits on the engine's loop, so a slow reader
        holds nothing but its own tokens. Closing the iterator (or dropping it, or an
        exception such as Ctrl-C while it waits) aborts.
        """
        token = self._foreign_thread_token()
        stream = self._submit_from_thread(token, prompt, params, request_id)
        return _iterate_from_thread(stream, token)

    def generate_threadsafe(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> RequestOutput:
        """`generate()` from a thread other than the engine loop's; blocks that thread.

        An exception raised in the waiting thread (Ctrl-C) aborts the request.
        """
        token = self._foreign_thread_token()
        stream = self._submit_from_thread(token, prompt, params, request_id)
        try:
            return anyio.from_thread.run(_read_to_end, stream, token=token)
        except BaseException:  # e.g. KeyboardInterrupt here, while the request runs on
            self._abort_soon(stream._request)
            raise

    def _submit_from_thread(
        self,
        token: anyio.lowlevel.EventLoopToken,
        prompt: Prompt,
        params: SamplingParams | None,
        request_id: str | None,
    ) -> RequestStream:
        submit = functools.partial(self.stream, prompt, params, request_id=request_id)
        return anyio.from_thread.run_sync(submit, token=token)

    def _foreign_thread_token(self) -> anyio.lowlevel.EventLoopToken:
        self._lifecycle.check_running()
        if self._lifecycle.in_loop_thread():
            raise BlockingCallError(
                "a *_threadsafe method was called on the engine's own loop thread; use the "
                "async method instead"
            )
        if (loop := running_event_loop()) is not None:
            raise BlockingCallError(
                f"a *_threadsafe method blocks and would freeze the {loop} event loop running "
                "in this thread; call it from a plain thread"
            )
        assert self._lifecycle.token is not None
        return self._lifecycle.token

    # ---- state -------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Queue sizes, KV-pool usage, prefix-cache counters and loop timings right now."""
        return self._core.stats()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use are not affected).

        Useful between benchmark runs, or after changing something that makes old K/V stale.
        """
        self._lifecycle.check_usable()
        self._core.blocks.reset_prefix_cache()

    # ---- the loop ----------------------------------------------------------------------------

    async def _serve_until_stopped(self) -> None:
        """The loop task: serve until shutdown cancels it; a failing step kills the engine."""
        try:
            await self._serve()
        except Exception as exc:
            self._die(exc)
        finally:
            self._idle.set()

    async def _serve(self) -> None:
        """Keep up to `pipeline_depth` steps in flight: while the device runs step N, this
        loop processes N-1's tokens and schedules and prepares N+1."""
        runner, worker = self._core.runner, self._lifecycle.worker
        assert runner is not None and worker is not None
        depth = self.config.pipeline_depth(runner.device)
        in_flight: deque[tuple[ScheduledStep, LaunchedStep]] = deque()
        clock = self._core.clock
        while True:
            # Yield between phases (and inside the long ones), so no burst of this loop's
            # CPU work delays the event loop's other tasks for more than a millisecond or so.
            await anyio.lowlevel.checkpoint()
            with clock("schedule"):
                step = self._core.schedule() if len(in_flight) < depth else None
            if step is not None:
                await anyio.lowlevel.checkpoint()
                with clock("prepare"):
                    prepared = self._core.prepare(step)
                previous = in_flight[-1][1] if in_flight else None
                with clock("launch"):
                    if runner.launches_cheaply(prepared):
                        # A graph replay only enqueues device work: launching it right here
                        # avoids handing the GIL to the worker thread and back.
                        launched = runner.launch(prepared, previous)
                    else:
                        launched = await worker.run(runner.launch, prepared, previous)
                in_flight.append((step, launched))
            elif in_flight:
                step, launched = in_flight.popleft()
                with clock("wait"):
                    result = await worker.run(runner.collect, launched)
                await self._process(step, result)
            else:
                if self._core.has_work():
                    logger.error("work is pending but nothing can be scheduled")
                self._idle.set()
                self._wakeup = anyio.Event()
                await self._wakeup.wait()

    async def _process(self, step: ScheduledStep, result: StepResult) -> None:
        """Hand a completed step's tokens to their streams, yielding every 64 requests."""
        now = time.monotonic()
        core = self._core
        with core.clock("process"):
            sampled = core.sampled(step, result)
        for start in range(0, len(sampled.requests), 64):
            with core.clock("process"):
                for req in core.apply(sampled, start, start + 64, now):
                    # A reader that waits for the end only is woken by the end.
                    if req.waiter is not None and (
                        req.finish_reason is not None or not req.wakes_at_end
                    ):
                        self._notify(req)
                    if req.finish_reason is not None:
                        self._on_finished(req)
            await anyio.lowlevel.checkpoint()
        with core.clock("process"):
            core.end_step(step)

    def _on_finished(self, req: Request) -> None:
        _log_request(
            logging.DEBUG, req, "%sfinished (%s): %d prompt + %d generated tokens",
            _choice_label(req), req.finish_reason, req.num_prompt_tokens, req.num_output_tokens,
        )  # fmt: skip
        head = self._requests.get(req.request_id)
        if head is None or not any(choice is req for choice in head.choices):
            return  # an earlier request that ended already, whose id a later one may reuse
        if not head.all_choices_finished:
            return  # other choices of the request are still running
        del self._requests[req.request_id]
        self._note_if_drained()

    async def _wait_drained(self) -> None:
        """Wait until every request in flight has finished (shutdown with drain=True)."""
        if self._requests:
            self._drained = anyio.Event()
            await self._drained.wait()

    def _note_if_drained(self) -> None:
        if self._drained is not None and not self._requests:
            self._drained.set()

    def _die(self, exc: BaseException) -> None:
        """A step failed: every waiting stream gets the error, new calls fail fast."""
        logger.error("engine step failed; failing every request", exc_info=exc)
        self._lifecycle.fail(exc)
        for req in list(self._requests.values()):
            for choice in req.choices:
                if not choice.is_finished:  # a choice that ended before keeps its result
                    choice.error = exc
                    choice.finish("abort")
            self._notify(req)
        self._requests.clear()
        self._note_if_drained()
        try:
            self._core.fail_all()
        except Exception:  # the failure may have left the bookkeeping half-updated
            logger.exception("releasing requests after the failure also failed")

    @staticmethod
    def _notify(req: Request) -> None:
        if req.waiter is not None:
            req.waiter.set()
            req.waiter = None


def _choice_label(req: Request) -> str:
    """ "choice <i> " for a choice of an n > 1 request (they share its id), else ""."""
    return f"choice {req.choice} " if req.params.n > 1 else ""


def _log_request(level: int, req: Request, message: str, *args: object) -> None:
    """Log about one request: "request <id> <message>", with `record.request_id` set."""
    if logger.isEnabledFor(level):
        logger.log(
            level, "request %s " + message, req.request_id, *args,
            extra={"request_id": req.request_id},
        )  # fmt: skip


async def _read_to_end(stream: RequestStream) -> RequestOutput:
    """Read `stream` to its end and return its output; leaving early aborts the request."""
    async with stream:
        await stream.finished()
        return stream.output()


def _iterate_from_thread(
    stream: RequestStream, token: anyio.lowlevel.EventLoopToken
) -> Iterator[StreamToken]:
    try:
        while (item := anyio.from_thread.run(_next_or_none, stream, token=token)) is not None:
            yield item
    finally:
        stream._engine._abort_soon(stream._request)


async def _next_or_none(stream: RequestStream) -> StreamToken | None:
    # StopAsyncIteration must not cross the thread boundary: it is not an ordinary error
    # to the loop's task machinery.
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="requests", unit="req")
