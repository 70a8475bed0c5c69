"""`RequestStream`: the async iterator a caller holds for one request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING

from asyncllm.errors import EngineError, StreamInUseError
from asyncllm.outputs import RequestOutput, StreamToken

if TYPE_CHECKING:
    from asyncllm.engine.async_engine import AsyncEngine
    from asyncllm.engine.request import Request

__all__ = ["RequestStream"]


class RequestStream:
    """Yields a request's tokens as the engine produces them; closing it aborts the request.

    There is no queue behind it: the stream reads the request's own output with a cursor, so
    a slow (or absent) reader costs nothing but the tokens themselves, never blocks the
    engine or other streams, and wakes once for however many tokens arrived meanwhile
    (`chunks()` hands those over as one list).

    Breaking out of `async for`, `await stream.aclose()`, leaving `async with`, cancelling
    the reading task, or dropping the last reference all abort an unfinished request and free
    its KV blocks.

    One task reads a stream at a time: a second task that tries while the first is waiting
    for tokens gets `StreamInUseError` (the first keeps reading).

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
        self._waiting = False
        """A reader is waiting for tokens (a second one would take its wake-up)."""

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
                        f"request {req.request_id} failed: {req.error!r}"
                    ) from req.error
                raise StopAsyncIteration
            if self._waiting:
                raise StreamInUseError(
                    f"the stream of request {req.request_id} is already being read by another "
                    "task; a RequestStream has one reader at a time"
                )
            waiter = req.waiter = self._engine._lifecycle.new_waiter()
            self._waiting = True
            try:
                await waiter
            except BaseException:  # cancelled while waiting: the caller is gone
                self._engine._abort_request(req)
                raise
            finally:
                self._waiting = False
        token = req.stream_token(self._cursor)
        self._cursor += 1
        return token

    async def chunks(self) -> AsyncIterator[list[StreamToken]]:
        """Iterate lists of tokens: everything available at each wake-up (never empty).

        A consumer that keeps up gets one token per list; a slow one gets fewer, larger
        lists, e.g. one server-sent event per list instead of a growing backlog.
        """
        async for first in self:
            chunk = [first]
            while self._cursor < self._request.num_streamable:
                chunk.append(self._request.stream_token(self._cursor))
                self._cursor += 1
            yield chunk

    def output(self) -> RequestOutput:
        """The final `RequestOutput`; raises `EngineError` if the request failed or is not done."""
        req = self._request
        if req.error is not None:
            raise EngineError(f"request {req.request_id} failed: {req.error!r}") from req.error
        if not req.is_finished:
            raise EngineError(f"request {req.request_id} has not finished yet")
        return req.to_output()

    async def aclose(self) -> None:
        """Abort the request if it is still running (harmless when it is done)."""
        self._engine._abort_request(self._request)

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
            self._engine._abort_soon(self._request)
