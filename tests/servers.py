"""Test helpers for the HTTP server: a real uvicorn on a free loopback port, a chat template for
models without one, and server-sent-event parsing."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

TEST_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def with_chat_template(model_dir: Path, directory: Path) -> Path:
    """A copy of `model_dir` in `directory` whose tokenizer has a small chat template (for
    models that ship none, such as the random test models)."""
    shutil.copytree(model_dir, directory, dirs_exist_ok=True)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEST_CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run `app` on uvicorn in a daemon thread; yields the base URL, stops it on exit."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "uvicorn failed to start"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def iter_sse(response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a server-sent-event response, as they arrive."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


def sse_data(response: httpx.Response) -> list[str]:
    """All the `data:` payloads of a server-sent-event response, in order."""
    return list(iter_sse(response))


def wait_until_idle(engine: Any, timeout_s: float = 30) -> Any:
    """Poll (from another thread) until the engine runs and queues nothing; its stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine.stats()
        if stats.running == 0 and stats.waiting == 0:
            return stats
        assert time.monotonic() < deadline, f"still busy: {stats}"
        time.sleep(0.02)
