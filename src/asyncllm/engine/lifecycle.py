"""An engine's lifecycle: a small state machine that binds it to one event loop.

    created -> starting -> running -> stopping -> stopped
                   |                                ^
                   +--------------------------------+   (start failed or was cancelled)

`Lifecycle` owns what exists only while the engine runs: the event loop it is bound to, the
worker thread, and the loop task, which runs in a fresh `contextvars.Context` owned by the
engine (never in the context of whichever task called `start()`). The engine hands it the
work: how to load the model, what the loop task runs, how to abort every request, and what to
release at the end.

Stopping is cancellation-safe: once begun, the teardown (abort everything, stop the loop
task, join the worker thread, free the model) runs to the end even if the caller is cancelled
meanwhile, and the cancellation is raised after it. A failed step does not change the state:
it records `failure`, after which the engine refuses work but still has to be stopped.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel

from asyncllm.engine.eventloop import (
    WorkerThread,
    call_soon_threadsafe,
    new_waiter_factory,
    spawn,
    wait_uncancelled,
)
from asyncllm.errors import (
    EngineDeadError,
    EngineError,
    EngineNotRunningError,
    WrongEventLoopError,
)

__all__ = ["EngineState", "Lifecycle"]

logger = logging.getLogger("asyncllm")


class EngineState(enum.Enum):
    """Where an engine is in its life (see the module docstring for the transitions)."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Lifecycle:
    """Starts and stops one engine in the event loop that calls `start()`.

    `load` runs on the worker thread; `serve` is the loop task's body (cancelled by `stop`);
    `abort_all` ends every request in flight (on the loop, synchronously); `release` frees
    the model and KV pool once the loop task and the worker are gone.
    """

    def __init__(
        self,
        *,
        load: Callable[[], None],
        serve: Callable[[], Awaitable[None]],
        abort_all: Callable[[], None],
        release: Callable[[], None],
    ) -> None:
        self._load, self._serve, self._abort_all, self._release = load, serve, abort_all, release
        self.state = EngineState.CREATED
        self.failure: BaseException | None = None
        """The exception that killed the engine, if a step failed."""
        self.context = contextvars.Context()
        """The engine's own context: the loop task and the engine's callbacks run in it."""
        self.token: anyio.lowlevel.EventLoopToken | None = None
        self.worker: WorkerThread | None = None
        self.new_waiter: Callable[[], Any] = _unbound_waiter
        """A new one-shot wake-up for a stream reader, native to the engine's loop."""
        self._loop_thread: int | None = None
        self._loop_scope: anyio.CancelScope | None = None
        self._loop_task: Any = None  # asyncio keeps only weak references to running tasks
        self._loop_done: anyio.Event | None = None
        self._started: anyio.Event | None = None
        self._stopped: anyio.Event | None = None

    # ---- queries -----------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """True while requests may be in flight (running, or stopping)."""
        return self.state in (EngineState.RUNNING, EngineState.STOPPING)

    def in_loop_thread(self) -> bool:
        """True when called from the thread that runs the engine's event loop."""
        return threading.get_ident() == self._loop_thread

    def check_running(self) -> None:
        """Raise `EngineDeadError` or `EngineNotRunningError` unless new work is welcome."""
        if self.failure is not None:
            raise EngineDeadError(f"the engine failed earlier: {self.failure!r}") from self.failure
        if self.state is not EngineState.RUNNING:
            raise EngineNotRunningError(
                f"the engine is {self.state.value}; use `async with engine:`"
            )

    def check_loop(self) -> None:
        """Raise `WrongEventLoopError` unless called in the engine's event loop (no-op before
        the engine is started: it has no loop yet)."""
        if self.token is None:
            return
        try:
            token = anyio.lowlevel.current_token()
        except RuntimeError:  # no event loop runs in this thread
            token = None
        if token != self.token:
            raise WrongEventLoopError(
                "this engine runs in another event loop (or none is running in this thread); "
                "call it from the engine's loop, or use stream_threadsafe()/generate_threadsafe()"
            )

    def check_usable(self) -> None:
        """`check_running()` and `check_loop()`: the gate of every submission."""
        self.check_running()
        self.check_loop()

    # ---- transitions -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind to the running loop, load the model on the worker thread, spawn the loop task.

        A cancelled (or failed) start waits for the load in progress to finish (a thread
        cannot be interrupted), frees it, ends `stopped`, and raises.
        """
        if self.state is not EngineState.CREATED:
            raise EngineError(f"an engine starts once; this one is {self.state.value}")
        self._bind()
        assert self.worker is not None and self._started is not None
        self.state = EngineState.STARTING
        try:
            await self.worker.run(self._load)
            await anyio.lowlevel.checkpoint_if_cancelled()  # a cancel that came during the load
        except BaseException:
            self._free()
            raise
        else:
            self._loop_scope = anyio.CancelScope()
            self._loop_task = spawn(self._run_loop, self._loop_scope, context=self.context)
            self.state = EngineState.RUNNING
        finally:
            self._started.set()

    async def stop(self, drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """Stop the engine: await `drain()` first when given (cancellable: a cancelled drain
        aborts the rest), then tear everything down whatever happens.

        Must run in the engine's loop (else `WrongEventLoopError`, at once). A call while
        another one is stopping the engine waits for that one and returns.
        """
        self.check_loop()
        if self.state is EngineState.CREATED:
            self.state = EngineState.STOPPED  # never started: nothing to free
            return
        if self.state is EngineState.STARTING:
            assert self._started is not None
            await self._started.wait()  # a start in progress ends running or stopped
        if self.state is EngineState.STOPPING:  # another call is stopping it: wait for that
            assert self._stopped is not None
            await self._stopped.wait()
        if self.state is EngineState.STOPPED:
            return
        self.state = EngineState.STOPPING
        try:
            if drain is not None:
                await drain()
        finally:
            await self._tear_down()

    def fail(self, exc: BaseException) -> None:
        """Record that a step failed: from now on the engine refuses new work."""
        self.failure = exc

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the engine's loop soon, in (a copy of) the engine's context;
        never inline, so it is safe from finalisers and from any thread."""
        assert self.token is not None, "the engine has not started"
        call_soon_threadsafe(self.token, fn, *args, context=self.context.copy())

    # ---- internals ---------------------------------------------------------------------------

    def _bind(self) -> None:
        self.token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        self.new_waiter = new_waiter_factory(self.token.native_token)
        self.worker = WorkerThread(self.token)
        self._loop_done, self._started, self._stopped = anyio.Event(), anyio.Event(), anyio.Event()

    async def _run_loop(self, scope: anyio.CancelScope) -> None:
        assert self._loop_done is not None
        try:
            with scope:
                await self._serve()
        finally:
            self._loop_task = None
            self._loop_done.set()

    async def _tear_down(self) -> None:
        """Abort every request, stop the loop task, join the worker, free the model: all of
        it, even when a step raises or the caller is cancelled meanwhile."""
        try:
            self._abort_all()
        finally:
            try:
                if self._loop_scope is not None:
                    assert self._loop_done is not None
                    self._loop_scope.cancel()
                    await wait_uncancelled(self._loop_done)
            finally:
                self._free()

    def _free(self) -> None:
        """Join the (idle) worker thread and release the model; the engine is stopped."""
        assert self._stopped is not None
        try:
            if self.worker is not None:
                self.worker.close()  # no work is pending: every run is waited for to the end
            self._release()
        finally:
            self.state = EngineState.STOPPED
            self._stopped.set()
            logger.info("engine stopped")


def _unbound_waiter() -> Any:
    raise EngineNotRunningError("the engine has not started")
