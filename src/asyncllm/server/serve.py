"""`asyncllm serve`: the app on uvicorn, draining in-flight requests on SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import Any

from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.server.app import DEFAULT_MAX_EVENT_RATE, create_app

__all__ = ["API_KEY_ENV", "SERVE_DECODE_STEPS", "serve", "serving_overrides"]

API_KEY_ENV = "ASYNCLLM_API_KEY"

SERVE_DECODE_STEPS = 4
"""`asyncllm serve`'s `num_decode_steps` unless given: the engine shares the server's one
thread, and four steps a launch quarter its host work. The price: a stream's tokens come up
to four at a time (under load the event pacing sends several an event anyway). On the
H200, 256 streams: HTTP at 90.2% of in-process with it, 87.9% without (docs/benchmarks.md)."""

logger = logging.getLogger("asyncllm.server")


def serve(args: argparse.Namespace, engine_overrides: dict[str, Any]) -> int:
    """Run the server until SIGTERM or Ctrl-C, then drain and return 0.

    On the signal uvicorn stops accepting connections and waits up to
    `args.shutdown_timeout` seconds for the responses in flight; the engine then shuts down
    (aborting whatever is left) when the app's lifespan ends.
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError("asyncllm serve needs uvicorn: pip install 'asyncllm[server]'") from exc
    engine = AsyncEngine.from_pretrained(args.model, **serving_overrides(engine_overrides))
    app = create_app(
        engine,
        served_model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_body_bytes=args.max_body_bytes,
        stream_interval=args.stream_interval,
        max_event_rate=DEFAULT_MAX_EVENT_RATE
        if args.max_event_rate is None
        else args.max_event_rate,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    server = uvicorn.Server(config)
    _exit_normally_after_signals()
    server.run()
    return 0 if server.started else 1


def serving_overrides(engine_overrides: dict[str, Any]) -> dict[str, Any]:
    """The engine options `asyncllm serve` runs with: the given ones over its defaults."""
    return {"num_decode_steps": SERVE_DECODE_STEPS, **engine_overrides}


def _exit_normally_after_signals() -> None:
    """uvicorn handles SIGTERM/SIGINT itself (graceful shutdown), then re-raises the signal
    to whatever handler was there before it started, which by default would kill the process
    with the signal's status. The shutdown was orderly, so that handler does nothing."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _after_shutdown)


def _after_shutdown(signum: int, frame: object) -> None:
    logger.info("shut down after %s", signal.Signals(signum).name)
