"""`LLM`: a blocking facade for scripts, running an `AsyncEngine` on a private loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future, wait
from types import TracebackType
from typing import Any, TypeVar

from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.engine.core import Prompt
from asyncllm.engine.eventloop import running_event_loop
from asyncllm.errors import BlockingCallError, EngineNotRunningError
from asyncllm.outputs import EngineStats, RequestOutput, StreamToken
from asyncllm.sampling import SamplingParams

__all__ = ["LLM"]

T = TypeVar("T")


class LLM:
    """Blocking inference for scripts and threaded apps (no event loop needed).

    The engine lives on a private event-loop thread; every method may be called from any
    thread that is not running an event loop (inside one, asyncio's or trio's, it raises
    `BlockingCallError`: use `AsyncEngine` there). An exception raised in the waiting
    thread, such as Ctrl-C's `KeyboardInterrupt`, aborts what the call submitted before it
    propagates. After `close()`, calls raise `EngineNotRunningError`.

    Example:
        >>> with LLM() as llm:  # doctest: +SKIP
        ...     [out] = llm.generate("Once upon a time", SamplingParams(max_tokens=16))
        ...     print(out.text)
    """

    def __init__(self, model: str | None = None, **overrides: Any) -> None:
        _refuse_inside_loop("LLM()")
        self._engine = AsyncEngine.from_pretrained(model, **overrides)
        self._loop = asyncio.new_event_loop()
        self._closing = threading.Lock()  # close() from two threads at once stops it once
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="asyncllm-llm", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._engine.start)
        except BaseException:
            self._stop_loop()
            raise

    @property
    def engine(self) -> AsyncEngine:
        """The `AsyncEngine` behind this facade (it runs on the facade's own loop)."""
        return self._engine

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Run `prompts` to completion; outputs in the same order.

        `prompts` is a list of prompts, or one prompt (a str, or a list of token ids), which
        gives a list of one output, as vLLM's `LLM.generate` does.
        """
        _refuse_inside_loop("LLM.generate()")
        batch = _as_batch(prompts)
        return self._call(self._engine.generate_many, batch, params, progress=progress)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamToken]:
        """Iterate one request's tokens, blocking for each; closing the iterator aborts it."""
        _refuse_inside_loop("LLM.stream()")
        self._check_open()
        return self._engine.stream_threadsafe(prompt, params)

    def stats(self) -> EngineStats:
        """The engine's current `EngineStats`."""
        return self._engine.stats()

    def close(self) -> None:
        """Shut the engine down and stop the loop thread (idempotent, from any thread)."""
        with self._closing:
            if self._loop.is_closed():
                return
            try:
                self._call(self._engine.shutdown)
            finally:
                self._stop_loop()

    def __enter__(self) -> LLM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._loop.is_closed():
            raise EngineNotRunningError("this LLM is closed; create a new one")

    def _call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` as a task on the loop thread and wait for its result.

        If this thread is interrupted while it waits (Ctrl-C raises `KeyboardInterrupt`
        here), the task is cancelled, which aborts what it submitted, and waited for before
        the interruption propagates: nothing it started outlives the call.
        """
        self._check_open()
        outcome: Future[T] = Future()
        tasks: list[asyncio.Task[T]] = []

        def start() -> None:  # on the loop thread
            try:
                task = self._loop.create_task(fn(*args, **kwargs))
            except BaseException as exc:
                outcome.set_exception(exc)
                return
            tasks.append(task)
            task.add_done_callback(lambda done: _settle(outcome, done))

        def cancel() -> None:  # on the loop thread, after start() if that was queued at all
            for task in tasks:
                task.cancel()
            if not tasks and not outcome.done():  # interrupted before start() was queued
                outcome.cancel()
                outcome.set_running_or_notify_cancel()

        try:
            # Inside the try: Ctrl-C can land while this call writes to the loop's self-pipe,
            # after start() is queued (callbacks run in order, so cancel() comes after it).
            self._loop.call_soon_threadsafe(start)
            return outcome.result()
        except BaseException:
            if not outcome.done():  # this thread was interrupted, the task is still running
                self._loop.call_soon_threadsafe(cancel)
                wait([outcome])  # whatever it settles to
            raise

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def _settle(outcome: Future[T], task: asyncio.Task[T]) -> None:
    """Copy a finished task's result, exception or cancellation onto `outcome`."""
    if task.cancelled():
        outcome.cancel()
        outcome.set_running_or_notify_cancel()  # wakes `wait()`, which cancel() alone does not
    elif (exc := task.exception()) is not None:
        outcome.set_exception(exc)
    else:
        outcome.set_result(task.result())


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> Sequence[Prompt]:
    """A single prompt (text, or a flat list of token ids) is a batch of one."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # type: ignore[list-item]  # a flat list of ints is one prompt
    return prompts  # type: ignore[return-value]


def _refuse_inside_loop(what: str) -> None:
    loop = running_event_loop()
    if loop is not None:
        raise BlockingCallError(
            f"{what} blocks and would freeze the running {loop} event loop; use AsyncEngine instead"
        )
