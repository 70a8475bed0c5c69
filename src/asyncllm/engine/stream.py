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

    With `SamplingParams(n=...)` one stream yields the tokens of every choice as they
    arrive, interleaved and tagged with `StreamToken.choice`; closing it aborts them all.

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
        """Tokens of `_request` (choice 0) handed out."""
        self._others = request.siblings
        """The other choices (n > 1)..."""
        self._other_cursors = [0] * len(self._others)
        """...and how many tokens of each were handed out."""
        self._waiting = False
        """A reader is waiting for tokens (a second one would take its wake-up)."""

    @property
    def request_id(self) -> str:
        """The request's id (as passed to `stream()` or generated)."""
        return self._request.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamToken:
        if self._others:
            return await self._next_of_any_choice()
        req = self._request
        while self._cursor >= req.num_streamable:
            if req.is_finished:
                _raise_if_failed(req)
                raise StopAsyncIteration
            await self._wait()
        token = req.stream_token(self._cursor)
        self._cursor += 1
        return token

    async def _wait(self, at_end: bool = False) -> None:
        """Wait until any choice makes progress (a token, its end, or a failure); with
        `at_end`, until a choice ends or fails (new tokens do not wake it)."""
        if self._waiting:  # checked before taking the waiter: the first reader keeps its wake-up
            raise StreamInUseError(
                f"the stream of request {self._request.request_id} is already being read by "
                "another task; a RequestStream has one reader at a time"
            )
        # One waiter for every choice: whichever gets a token (or fails) wakes the reader.
        waiter = self._engine._lifecycle.new_waiter()
        for req in self._request.choices:
            req.waiter, req.wakes_at_end = waiter, at_end
        self._waiting = True
        try:
            await waiter
        except BaseException:  # cancelled while waiting: the caller is gone
            self._engine._abort_request(self._request)
            raise
        finally:
            self._waiting = False

    async def _next_of_any_choice(self) -> StreamToken:
        while (token := self._take_next()) is None:
            if self._request.all_choices_finished:
                for req in self._request.choices:
                    _raise_if_failed(req)
                raise StopAsyncIteration
            await self._wait()
        return token

    def _take_next(self) -> StreamToken | None:
        """The ready token of lowest index over the choices (ties: lowest choice), so a
        reader that keeps up sees the tokens in the order the engine made them."""
        head, cursors = self._request, self._other_cursors
        best = self._cursor if self._cursor < head.num_streamable else -1
        best_other = -1
        for other, (req, cursor) in enumerate(zip(self._others, cursors)):
            if cursor < req.num_streamable and (best < 0 or cursor < best):
                best, best_other = cursor, other
        if best < 0:
            return None
        if best_other < 0:
            self._cursor += 1
            return head.stream_token(best)
        cursors[best_other] += 1
        return self._others[best_other].stream_token(best)

    async def chunks(self) -> AsyncIterator[list[StreamToken]]:
        """Iterate lists of tokens: everything available at each wake-up (never empty).

        A consumer that keeps up gets one token per list; a slow one gets fewer, larger
        lists, e.g. one server-sent event per list instead of a growing backlog.
        """
        async for first in self:
            chunk = [first]
            if self._others:
                while (token := self._take_next()) is not None:
                    chunk.append(token)
            while self._cursor < self._request.num_streamable:
                chunk.append(self._request.stream_token(self._cursor))
                self._cursor += 1
            yield chunk

    async def finished(self) -> None:
        """Wait until every choice has ended (its tokens stay readable); cheaper than reading
        them as they come, as the engine has no reader to wake for each step.

        Example:
            >>> async with engine.stream(prompt) as stream:  # doctest: +SKIP
            ...     await stream.finished()
            ...     print(stream.output().text)
        """
        while not self._request.all_choices_finished:
            await self._wait(at_end=True)

    def output(self) -> RequestOutput:
        """The final `RequestOutput` (every choice); raises `EngineError` if the request
        failed or is not done."""
        req = self._request
        for choice in req.choices:
            _raise_if_failed(choice)
        if not req.all_choices_finished:
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
        if not self._request.all_choices_finished:
            self._engine._abort_soon(self._request)


def _raise_if_failed(req: Request) -> None:
    if req.error is not None:
        raise EngineError(f"request {req.request_id} failed: {req.error!r}") from req.error
