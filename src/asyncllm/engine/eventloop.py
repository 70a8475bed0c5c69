"""Event-loop glue that works the same on asyncio, uvloop and trio (through anyio).

- `spawn`: start the engine loop as a background task without borrowing the caller's task
  group (an asyncio task, or a trio system task), so start and shutdown may happen in
  different tasks, in a `contextvars.Context` of the engine's choosing.
- `call_soon_threadsafe`: schedule a callback on the loop from any thread.
- `wait_uncancelled`: wait for an event however the caller is cancelled meanwhile.
- `WorkerThread`: the engine's one thread for model work, awaited without blocking the loop.
- waiters: the cheapest one-shot wake-up each backend offers, for streams.
- `running_event_loop`: which event loop (if any) runs in this thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sys
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar, cast

import anyio
import anyio.lowlevel

__all__ = [
    "WorkerThread",
    "call_soon_threadsafe",
    "new_waiter_factory",
    "running_event_loop",
    "spawn",
    "wait_uncancelled",
]

T = TypeVar("T")


def spawn(fn: Callable[..., Any], *args: Any, context: contextvars.Context) -> Any:
    """Start `fn(*args)` as a background task of the running loop, running in `context`
    (not in the caller's context variables); returns the task handle."""
    loop = anyio.lowlevel.current_token().native_token
    name = "asyncllm-engine-loop"
    if hasattr(loop, "create_task"):  # asyncio and uvloop
        if sys.version_info >= (3, 11):
            return loop.create_task(fn(*args), name=name, context=context)
        return context.run(loop.create_task, fn(*args), name=name)  # the task copies `context`
    import trio

    return trio.lowlevel.spawn_system_task(fn, *args, name=name, context=context)


def call_soon_threadsafe(
    token: anyio.lowlevel.EventLoopToken,
    fn: Any,
    *args: Any,
    context: contextvars.Context | None = None,
) -> None:
    """Run `fn(*args)` on the loop of `token` soon (in `context`, when given: otherwise in a
    copy of the calling thread's); a closed loop is ignored."""
    native = token.native_token
    try:
        if hasattr(native, "call_soon_threadsafe"):  # asyncio and uvloop
            native.call_soon_threadsafe(fn, *args, context=context)
        elif context is not None:  # trio
            cast(Any, native).run_sync_soon(context.run, fn, *args)
        else:
            cast(Any, native).run_sync_soon(fn, *args)
    except RuntimeError:
        pass  # the loop has closed: nobody is left to tell


async def wait_uncancelled(event: anyio.Event) -> None:
    """Wait until `event` is set, even if the caller is cancelled meanwhile; a cancellation
    that arrived is raised once the event is set.

    For clean-up that must finish (a half-loaded model, a worker thread to join). A shielded
    scope keeps anyio and trio cancellations out; a native asyncio `task.cancel()` (e.g. from
    `asyncio.wait_for`) goes through shields, so it is caught here and re-raised at the end.
    """
    cancelled: BaseException | None = None
    with anyio.CancelScope(shield=True):
        while not event.is_set():
            try:
                await event.wait()
            except asyncio.CancelledError as exc:
                cancelled = exc
    if cancelled is not None:
        raise cancelled


def running_event_loop() -> str | None:
    """The name of the event loop running in this thread ("asyncio" or "trio"), or None."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return "asyncio"
    trio = sys.modules.get("trio")  # never imported here: if trio runs, it is imported already
    if trio is not None and trio.lowlevel.in_trio_run():
        return "trio"
    return None


class WorkerThread:
    """A dedicated thread for model work (forward passes, waits on the device).

    One thread, not a pool: steps run strictly in order, the thread is the engine's own, and
    `close` joins it. Everything runs in one `contextvars.Context` owned by the thread (never
    the context of whoever submitted the work); one thread, so it is never entered twice.
    """

    def __init__(self, token: anyio.lowlevel.EventLoopToken) -> None:
        self._token = token
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="asyncllm-worker")
        self._context = contextvars.Context()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the thread and return its result, keeping the loop free.

        Uncancellable: once submitted, the work is waited for even if the caller is
        cancelled (the cancellation is raised after it), so nothing is left running on the
        device behind the engine's back.
        """
        future: Future[T] = self._executor.submit(self._context.run, fn, *args)
        done = anyio.Event()
        future.add_done_callback(lambda _: call_soon_threadsafe(self._token, done.set))
        await wait_uncancelled(done)
        return future.result()

    def close(self) -> None:
        """Stop the thread (after the work in hand, if any)."""
        self._executor.shutdown(wait=True)


class _FutureWaiter:
    """A one-shot wake-up on an asyncio (or uvloop) future: the cheapest primitive there
    (anyio.Event costs ~4x as much per wake-up, which adds up at 256 streams per step)."""

    __slots__ = ("_future",)

    def __init__(self, loop: Any) -> None:
        self._future = loop.create_future()

    def set(self) -> None:
        if not self._future.done():  # a cancelled reader leaves a cancelled future behind
            self._future.set_result(None)

    def __await__(self) -> Generator[Any, None, None]:
        return self._future.__await__()  # type: ignore[no-any-return]


class _EventWaiter:
    """A one-shot wake-up on any other backend (trio), through anyio."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def __await__(self) -> Generator[Any, None, None]:
        return self._event.wait().__await__()


def new_waiter_factory(native_loop: Any) -> Callable[[], _FutureWaiter | _EventWaiter]:
    """How streams of an engine running in `native_loop` wait for new tokens."""
    if hasattr(native_loop, "create_future"):  # asyncio and uvloop
        return functools.partial(_FutureWaiter, native_loop)
    return _EventWaiter
