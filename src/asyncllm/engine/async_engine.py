"""`AsyncEngine`: the engine as an async context manager living in the caller's event loop."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from asyncllm.config import EngineConfig
from asyncllm.engine.core import EngineCore, Prompt
from asyncllm.engine.eventloop import WorkerThread, call_soon_threadsafe, new_waiter_factory, spawn
from asyncllm.engine.request import Request
from asyncllm.engine.runner import LaunchedStep, StepResult
from asyncllm.engine.scheduler import ScheduledStep
from asyncllm.engine.stream import RequestStream
from asyncllm.errors import (
    BlockingCallError,
    EngineDeadError,
    EngineError,
    EngineNotRunningError,
    InvalidRequestError,
    WrongEventLoopError,
)
from asyncllm.outputs import EngineStats, RequestOutput, StreamToken
from asyncllm.sampling import SamplingParams

__all__ = ["AsyncEngine"]

logger = logging.getLogger("asyncllm")


class AsyncEngine:
    """An inference engine whose loop runs as a task in your event loop.

    Model work runs on the engine's own worker thread (and, on a GPU, on its own CUDA
    stream), so the event loop stays responsive while steps compute. Works under asyncio,
    uvloop and trio.

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
        self._state = "created"  # -> starting -> running -> stopping -> stopped, or dead
        self._death: BaseException | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._loop_thread: int | None = None
        self._loop_scope: anyio.CancelScope | None = None
        self._loop_done = anyio.Event()
        self._loop_task: Any = None  # keeps the asyncio task referenced while it runs
        self._worker: WorkerThread | None = None
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
        """Load the model (off the loop) and start the engine loop in the current event loop."""
        if self._state != "created":
            raise EngineError(f"an engine starts once; this one is {self._state}")
        self._token = anyio.lowlevel.current_token()
        self._new_waiter = new_waiter_factory(self._token.native_token)
        self._loop_thread = threading.get_ident()
        self._worker = WorkerThread(self._token)
        self._state = "starting"
        try:
            await self._worker.run(self._core.load)
        except BaseException:
            self._state = "stopped"
            self._worker.close()
            raise
        self._loop_scope = anyio.CancelScope()
        self._loop_task = spawn(self._run, self._loop_scope)
        self._state = "running"
        logger.info("engine started: %s", self._core.stats())

    async def shutdown(self, *, drain: bool = False) -> None:
        """Stop the engine: abort what is in flight (or, with `drain=True`, let it finish
        first), stop the loop task and the worker thread, and free the model's memory.

        New requests are refused from the moment this is called. It may run in any task of
        the engine's loop; a second call does nothing. Bound a drain with a timeout of your
        own (e.g. `anyio.fail_after`); cancelling it aborts the rest.
        """
        if self._loop_scope is None:
            if self._state not in ("dead", "created"):
                self._state = "stopped"
            return
        if self._state == "running":
            self._state = "stopping"
        try:
            if drain and self._requests:
                self._drained = anyio.Event()
                await self._drained.wait()
        finally:
            for request_id in list(self._requests):
                self.abort(request_id)
            scope, self._loop_scope = self._loop_scope, None
            scope.cancel()
            await self._loop_done.wait()
            self._loop_task = None
            assert self._worker is not None
            self._worker.close()
            self._core.unload()
            if self._state != "dead":
                self._state = "stopped"
            logger.info("engine stopped")

    # ---- submitting --------------------------------------------------------------------------

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> RequestStream:
        """Submit a request and return the async iterator of its tokens.

        `prompt` is text or a list of token ids. Raises `InvalidRequestError` (or its child
        `PromptTooLongError`) at once for a bad request, and `EngineOverloadedError` when
        `EngineConfig.max_waiting_requests` sequences are already waiting; the engine keeps
        serving. With `params.n > 1` the one stream carries every choice (`StreamToken.choice`).
        """
        self._check_usable()
        if request_id is not None and request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        req = self._core.make_request(prompt, params, request_id)
        self._core.add(req)
        self._requests[req.request_id] = req
        if self._idle.is_set():
            self._idle = anyio.Event()
        self._wakeup.set()
        logger.debug("request %s added: %d prompt tokens", req.request_id, req.num_prompt_tokens)
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
        async with self.stream(prompt, params, request_id=request_id) as stream:
            async for _ in stream.chunks():
                pass
            return stream.output()

    async def generate_many(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Run many requests concurrently; outputs come back in the order of `prompts`.

        `params` is one `SamplingParams` for all, or one per prompt. `progress=True` shows a
        tqdm progress bar of finished requests. If one request fails, the rest are aborted
        and the error is raised.
        """
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(params)} params for {len(prompts)} prompts")
        streams: list[RequestStream] = []
        try:
            streams.extend(self.stream(p, sp) for p, sp in zip(prompts, params))
        except BaseException:  # e.g. EngineOverloadedError halfway: withdraw the rest
            for stream in streams:
                self.abort(stream.request_id)
            raise
        outputs: list[RequestOutput | None] = [None] * len(streams)
        bar = _progress_bar(len(streams)) if progress else None

        async def drain(index: int) -> None:
            async with streams[index] as stream:
                async for _ in stream.chunks():
                    pass
                outputs[index] = stream.output()
            if bar is not None:
                bar.update(1)

        try:
            async with anyio.create_task_group() as group:
                for index in range(len(streams)):
                    group.start_soon(drain, index)
        finally:
            if bar is not None:
                bar.close()
        return [out for out in outputs if out is not None]

    async def idle(self) -> None:
        """Wait until no request is waiting or running and every KV block is released
        (returns at once when the engine is idle or not running)."""
        while self._state in ("running", "stopping") and not self._idle.is_set():
            await self._idle.wait()

    def abort(self, request_id: str) -> None:
        """Abort a request and free its KV blocks; unknown or finished ids are ignored."""
        req = self._requests.pop(request_id, None)
        if req is None or req.all_choices_finished:
            return
        self._core.abort(req)
        self._notify(req)
        logger.debug("request %s aborted", request_id)
        self._note_if_drained()

    def abort_threadsafe(self, request_id: str) -> None:
        """`abort` from any thread (it runs on the engine's loop)."""
        if self._token is None or self._state not in ("running", "stopping"):
            return
        if threading.get_ident() == self._loop_thread:
            self.abort(request_id)
        else:
            call_soon_threadsafe(self._token, self.abort, request_id)

    # ---- from other threads ------------------------------------------------------------------

    def stream_threadsafe(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> Iterator[StreamToken]:
        """`stream()` for a thread other than the engine loop's (e.g. a WSGI worker).

        Returns a blocking iterator; each step waits on the engine's loop, so a slow reader
        holds nothing but its own tokens. Closing the iterator (or dropping it) aborts.
        """
        token = self._foreign_thread_token()
        stream = anyio.from_thread.run_sync(self.stream, prompt, params, token=token)
        return _iterate_from_thread(stream, token)

    def generate_threadsafe(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> RequestOutput:
        """`generate()` from a thread other than the engine loop's; blocks that thread."""
        token = self._foreign_thread_token()
        return anyio.from_thread.run(self.generate, prompt, params, token=token)

    def _foreign_thread_token(self) -> anyio.lowlevel.EventLoopToken:
        if self._token is None or self._state != "running":
            self._check_usable()  # raises the precise error
        if threading.get_ident() == self._loop_thread:
            raise BlockingCallError(
                "a *_threadsafe method was called on the engine's own loop thread; use the "
                "async method instead"
            )
        assert self._token is not None
        return self._token

    # ---- state -------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Queue sizes, KV-pool usage, prefix-cache counters and loop timings right now."""
        return self._core.stats()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use are not affected).

        Useful between benchmark runs, or after changing something that makes old K/V stale.
        """
        self._check_usable()
        self._core.blocks.reset_prefix_cache()

    def _check_usable(self) -> None:
        if self._state == "dead":
            raise EngineDeadError(f"the engine failed earlier: {self._death!r}") from self._death
        if self._state != "running":
            raise EngineNotRunningError(f"the engine is {self._state}; use `async with engine:`")
        try:
            token = anyio.lowlevel.current_token()
        except Exception:
            token = None
        if token != self._token:
            raise WrongEventLoopError(
                "this engine runs in another event loop (or none is running in this thread); "
                "submit from the engine's loop, or use stream_threadsafe()/generate_threadsafe()"
            )

    # ---- the loop ----------------------------------------------------------------------------

    async def _run(self, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                await self._serve()
        except Exception as exc:
            self._die(exc)
        finally:
            self._idle.set()
            self._loop_done.set()

    async def _serve(self) -> None:
        """Keep up to `pipeline_depth` steps in flight: while the device runs step N, this
        loop processes N-1's tokens and schedules and prepares N+1."""
        runner, worker = self._core.runner, self._worker
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
        sampled = self._core.sampled(step, result)
        for start in range(0, len(sampled), 64):
            with self._core.clock("process"):
                for req, token_id, logprobs in sampled[start : start + 64]:
                    if self._core.apply(req, token_id, logprobs, now):
                        self._notify(req)
                        if req.is_finished:
                            self._on_finished(req)
            await anyio.lowlevel.checkpoint()
        self._core.end_step(step)

    def _on_finished(self, req: Request) -> None:
        head = self._requests.get(req.request_id)
        if head is not None and not head.all_choices_finished:
            return  # other choices of the request are still running
        self._requests.pop(req.request_id, None)
        logger.debug(
            "request %s finished (%s): %d prompt + %d generated tokens",
            req.request_id, req.finish_reason, req.num_prompt_tokens, req.num_output_tokens,
        )  # fmt: skip
        self._note_if_drained()

    def _note_if_drained(self) -> None:
        if self._drained is not None and not self._requests:
            self._drained.set()

    def _die(self, exc: BaseException) -> None:
        """A step failed: every waiting stream gets the error, new calls fail fast."""
        logger.error("engine step failed; failing every request", exc_info=exc)
        self._state = "dead"
        self._death = exc
        for req in list(self._requests.values()):
            req.error = exc
            req.finish("abort")
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


def _iterate_from_thread(
    stream: RequestStream, token: anyio.lowlevel.EventLoopToken
) -> Iterator[StreamToken]:
    try:
        while (item := anyio.from_thread.run(_next_or_none, stream, token=token)) is not None:
            yield item
    finally:
        stream._engine.abort_threadsafe(stream.request_id)


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
