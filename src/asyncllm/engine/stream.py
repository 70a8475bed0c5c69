"""`RequestStream`: the async iterator a caller holds for one request."""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from asyncllm.errors import EngineError
from asyncllm.outputs import RequestOutput, StreamToken

if TYPE_CHECKING:
    from asyncllm.engine.async_engine import AsyncEngine
    from asyncllm.engine.request import Request

__all__ = ["RequestStream", "new_waiter_factory"]


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


class RequestStream:
    """Yields a request's tokens as the engine produces them; closing it aborts the request.

    There is no queue behind it: the stream reads the request's own output list with a
    cursor, so a slow (or absent) reader costs nothing but the tokens themselves, and wakes
    once for however many tokens arrived meanwhile.

    Breaking out of `async for`, `await stream.aclose()`, leaving `async with`, cancelling
    the reading task, or dropping the last reference all abort an unfinished request and free
    its KV blocks.

    Example:
        >>> async with engine.stream("Once upon a time") as stream:  # doctest: +SKIP
        ...     async for token in stream:
        ...         print(token.text, end="")
        ...     print(stream.output().usage)
    """

    def __init__(self, engine: AsyncEngine, request: Request) -> None:
        self._engine = engine
        self._request = request
        self._cursor = 0

    @property
    def request_id(self) -> str:
        """The request's id (as passed to `stream()` or generated)."""
        return self._request.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamToken:
        req = self._request
        while self._cursor >= req.num_streamable:
            if req.is_finished:
                if req.error is not None:
                    raise EngineError(
                        f"request {req.request_id} failed: {req.error}"
                    ) from req.error
                raise StopAsyncIteration
            waiter = req.waiter = self._engine._new_waiter()
            try:
                await waiter
            except BaseException:  # cancelled while waiting: the caller is gone
                self._engine.abort(req.request_id)
                raise
        token = req.stream_token(self._cursor)
        self._cursor += 1
        return token

    def output(self) -> RequestOutput:
        """The final `RequestOutput`; raises `EngineError` if the request failed or is not done."""
        req = self._request
        if req.error is not None:
            raise EngineError(f"request {req.request_id} failed: {req.error}") from req.error
        if not req.is_finished:
            raise EngineError(f"request {req.request_id} has not finished yet")
        return req.to_output()

    async def aclose(self) -> None:
        """Abort the request if it is still running (harmless when it is done)."""
        self._engine.abort(self._request.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # The last reference went away (e.g. `break` out of `async for engine.stream(...)`).
        if not self._request.is_finished:
            self._engine.abort_threadsafe(self._request.request_id)
