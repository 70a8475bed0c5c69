"""`create_app`: the ASGI application around one engine."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.engine.core import DEFAULT_MODEL_DIR
from asyncllm.errors import ConfigError
from asyncllm.server.errors import error_response, install_error_handlers
from asyncllm.server.routes import ServerContext, build_router
from asyncllm.server.streaming import Pacer
from asyncllm.validation import as_finite_float, as_int

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_EVENT_RATE", "create_app"]

DEFAULT_MAX_BODY_BYTES = 16 * 2**20
"""Largest request body accepted (16 MiB: a batch of long token-id prompts fits)."""

DEFAULT_MAX_EVENT_RATE = 5_000.0
"""Streamed events a second over all streams before each stream's events are spaced out.
An event costs the server's thread, which is also the engine's, ~10 us of CPU: 5,000 a
second keep that near 5%. Up to ~30 streams at a step every ~6 ms get every token at once;
256 streams get one event per ~50 ms (about 8 tokens)."""

OPEN_PATHS = frozenset({"/health", "/metrics"})
"""Paths served without the API key (for load balancers and scrapers)."""


def create_app(
    engine: AsyncEngine,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    stream_interval: int = 1,
    max_event_rate: float = DEFAULT_MAX_EVENT_RATE,
) -> FastAPI:
    """An OpenAI-compatible ASGI app (FastAPI) serving `engine`.

    The engine starts in the app's lifespan and shuts down with it (if it is already
    running, the app leaves its lifecycle to you). `served_model_name` is the `model` clients
    send (default: the model path, or "tiny-qwen3" for the embedded model); `api_key`, when
    set, must come as `Authorization: Bearer <key>` on every path but /health and /metrics;
    bodies over `max_body_bytes` get 413. `stream_interval` > 1 gathers that many tokens into
    each streamed event (but the first and the last): fewer, larger events cost the server
    less per token, at the price of burstier streams. `max_event_rate` caps the streamed
    events a second over all streams (0: no cap): with many streams, each event then carries
    several tokens (see `asyncllm.server.streaming.Pacer`). A bad argument raises
    `ConfigError`.

    Run it with any ASGI server, or mount it in your own app (whose lifespan must then run
    the engine: see examples/fastapi_app.py):

        >>> app = create_app(AsyncEngine.from_pretrained(None))  # doctest: +SKIP
        >>> uvicorn.run(app, port=8000)  # doctest: +SKIP
    """
    _check_options(engine, served_model_name, api_key, max_body_bytes, stream_interval)
    rate = as_finite_float(max_event_rate)
    if rate is None or rate < 0:
        raise ConfigError(f"max_event_rate must be a number >= 0, got {max_event_rate!r}")
    name = served_model_name or _default_name(engine)
    ctx = ServerContext(
        engine, name, int(time.time()), _metrics_renderer(engine), stream_interval, Pacer(rate)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine.state != "created":  # started by the caller, who also stops it
            yield
            return
        async with engine:
            yield

    app = FastAPI(
        title="asyncllm",
        summary="OpenAI-compatible server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.engine = engine
    app.state.model_name = name
    install_error_handlers(app)
    app.include_router(build_router(ctx))
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def _check_options(
    engine: object, name: object, api_key: object, max_body_bytes: object, interval: object
) -> None:
    """`ConfigError` naming the first bad argument of `create_app`."""
    if not isinstance(engine, AsyncEngine):
        raise ConfigError(f"create_app needs an AsyncEngine, got {type(engine).__name__}")
    for option, value in (("served_model_name", name), ("api_key", api_key)):
        if value is not None and not (isinstance(value, str) and value):
            raise ConfigError(f"{option} must be a non-empty string or None, got {value!r}")
    for option, value in (("max_body_bytes", max_body_bytes), ("stream_interval", interval)):
        number = as_int(value)
        if number is None or number < 1:
            raise ConfigError(f"{option} must be an int >= 1, got {value!r}")


def _default_name(engine: AsyncEngine) -> str:
    return engine.config.model or DEFAULT_MODEL_DIR.name


def _metrics_renderer(engine: AsyncEngine) -> Any:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    from asyncllm.metrics import register_prometheus

    registry = CollectorRegistry()  # per app: two apps in a process must not collide
    register_prometheus(engine, registry)

    def render() -> tuple[bytes, str]:
        return generate_latest(registry), CONTENT_TYPE_LATEST

    return render


class _Guard:
    """ASGI middleware: the API key (401) and the body limit (413), before any routing.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would sit between the
    routes and the client's disconnect messages.
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _reply(
                    scope, receive, send, 401, "missing or wrong API key", code="invalid_api_key"
                )
                return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(scope, receive, send, 413, self._too_large())
            return
        body = await self._read_body(receive)
        if body is None:
            await _reply(scope, receive, send, 413, self._too_large())
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> str:
        return f"request body exceeds the server's limit of {self.max_body_bytes} bytes"

    async def _read_body(self, receive: Receive) -> list[Message] | None:
        """The body's messages (None past the limit: a chunked body declares no length)."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives the buffered body first, then the client's later messages
    (the routes watch for `http.disconnect`)."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _reply(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    message: str,
    code: str | None = None,
) -> None:
    await error_response(status, message, code=code)(scope, receive, send)
