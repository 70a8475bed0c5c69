"""Client disconnects: a response that streams server-sent events, and a way to run a
non-streamed request, both cancelled the moment the client goes away.

Cancelling is all it takes to free the engine: the routes hold each `RequestStream` in
`async with`, which aborts the request (and releases its KV blocks) when left by
cancellation. Starlette alone would notice a gone client only at its next write, i.e. after
the first token, which may be a long queue away.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from asyncllm.errors import AsyncLLMError
from asyncllm.server.errors import APIError, from_engine_error

__all__ = ["Emit", "EventStreamResponse", "Pacer", "run_unless_disconnected"]

logger = logging.getLogger("asyncllm.server")

T = TypeVar("T")
Emit = Callable[[str], Awaitable[None]]
"""Writes already-framed SSE text to the client (call it from one task at a time)."""

_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # proxies like nginx must not buffer the events
}


class Pacer:
    """Spaces each stream's events so that all streams together send about `max_event_rate`
    events a second at most.

    Every event costs the server's thread, which is also the engine's, the same CPU time
    whatever it carries (waking the reader, framing, a socket write). With few streams every
    token goes out at once; with many, a stream sleeps between events and its next event
    carries the tokens of the steps it slept through, so the HTTP work per second stays
    bounded while the engine keeps its pace. 0 turns pacing off (one event per step).
    """

    def __init__(self, max_event_rate: float) -> None:
        self.max_event_rate = max_event_rate
        self.active = 0
        """Streams being sent now (a request with n choices counts n times)."""

    def gap_s(self) -> float:
        """How long a stream should wait after an event, given how many are active."""
        return self.active / self.max_event_rate if self.max_event_rate > 0 else 0.0

    async def pause(self) -> None:
        """Sleep out the gap (no pause under a millisecond: steps are slower than that)."""
        gap = self.gap_s()
        if gap >= 1e-3:
            await anyio.sleep(gap)


class EventStreamResponse(Response):
    """A response of server-sent events: whatever `produce(emit)` emits, then `data: [DONE]`,
    then `close()`.

    If the client disconnects, `produce` is cancelled. An error inside it is reported as one
    last event in OpenAI's error shape (the status line has gone out already).
    """

    def __init__(
        self, produce: Callable[[Emit], Awaitable[None]], close: Callable[[], None]
    ) -> None:
        # Like Starlette's StreamingResponse: no body attribute, hence no Content-Length.
        self.status_code = 200
        self.background = None
        self.init_headers(_HEADERS)
        self._produce = produce
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream; `close()` runs in the end whatever happened (it aborts the requests)."""
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with anyio.create_task_group() as group:
                group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope)
                # In a task of its own, not this one: each token resumes the streaming
                # coroutine, which here would sit under the middleware stack's chain of awaits.
                group.start_soon(self._stream, send, group.cancel_scope)
        except OSError:
            pass  # the client was gone before the first byte
        finally:
            self._close()

    async def _stream(self, send: Send, scope: anyio.CancelScope) -> None:
        async def emit(text: str) -> None:
            if text:
                await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

        try:
            try:
                await self._produce(emit)
            except OSError:
                raise  # the client is gone (below)
            except (APIError, AsyncLLMError) as exc:
                await emit(_error_event(exc))
            except Exception as exc:  # never end a stream silently
                logger.error("streaming a response failed", exc_info=exc)
                await emit(_error_event(exc))
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        except OSError:
            pass  # the connection broke while writing: there is nobody left to tell
        finally:
            scope.cancel()


def _error_event(exc: BaseException) -> str:
    if isinstance(exc, AsyncLLMError):
        exc = from_engine_error(exc)
    if not isinstance(exc, APIError):
        exc = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
    return f"data: {json.dumps(exc.body())}\n\n"


async def run_unless_disconnected(
    receive: Receive, work: Callable[[], Awaitable[T]]
) -> tuple[bool, T | None]:
    """Run `work()`; if the client disconnects first, cancel it.

    Returns (True, result), or (False, None) when the client went away. Exceptions of
    `work` propagate unchanged.
    """
    error: Exception | None = None
    done, result = False, None
    async with anyio.create_task_group() as group:
        group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope)
        try:
            result = await work()
            done = True
        except Exception as exc:  # re-raised below: out here it would be wrapped in a group
            error = exc
        finally:
            group.cancel_scope.cancel()
    if error is not None:
        raise error
    return done, result


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel `scope` when the client disconnects (the request body has been read by now)."""
    while True:
        message: Any = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
