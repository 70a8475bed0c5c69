"""An OpenAI-compatible HTTP server around an `AsyncEngine` (needs `pip install asyncllm[server]`).

    server/
      protocol.py   request and response bodies (pydantic models)
      convert.py    requests -> prompts + SamplingParams; outputs -> responses and SSE events
      routes.py     the endpoints: they only call AsyncEngine
      streaming.py  server-sent events and client-disconnect handling
      errors.py     OpenAI's error shape and status codes
      app.py        create_app: the app, its lifespan, API key and body limit
      serve.py      `asyncllm serve`: uvicorn, graceful SIGTERM

Example:
    >>> from asyncllm import AsyncEngine
    >>> from asyncllm.server import create_app
    >>> app = create_app(AsyncEngine.from_pretrained(None), api_key="secret")  # doctest: +SKIP
"""

from __future__ import annotations

_MISSING: list[str] = []
for _name in ("fastapi", "prometheus_client"):
    try:
        __import__(_name)
    except ImportError:
        _MISSING.append(_name)
if _MISSING:
    raise ImportError(
        f"asyncllm.server needs {', '.join(_MISSING)}: pip install 'asyncllm[server]'"
    )

from asyncllm.server.app import create_app  # noqa: E402  (after the check above)

__all__ = ["create_app"]
