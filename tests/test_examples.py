"""Every example in examples/ runs and does what it says."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    return done.stdout


def test_stream_example_prints_a_story() -> None:
    out = run_example("stream.py", "Once upon a time", "--max-tokens", "24")
    assert out.startswith("Once upon a time")
    assert "[length: 24 tokens" in out


def test_offline_batch_example_runs_every_prompt() -> None:
    out = run_example("offline_batch.py", "--num-prompts", "12", "--max-tokens", "16")
    assert "12 prompts, 192 tokens" in out


def test_trio_example_streams_and_cancels() -> None:
    out = run_example("trio_stream.py")
    assert "Once upon a time" in out
    assert "impatient reader gave up" in out
    free = out.rsplit("KV blocks free or cached:", 1)[1].split()
    assert free[0] == free[2]  # nothing leaked by the cancelled request


def test_from_thread_example_serves_every_worker() -> None:
    lines = run_example("from_thread.py", "--workers", "3").strip().splitlines()
    assert [line.split()[0] for line in lines] == [str(i) for i in range(8)]


# ---- the FastAPI app, served for real by uvicorn ----------------------------------------------


def load_app() -> Any:
    spec = importlib.util.spec_from_file_location("fastapi_app", EXAMPLES / "fastapi_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    uvicorn = pytest.importorskip("uvicorn")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(load_app(), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not instance.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=30)


def events(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


def test_fastapi_streams_server_sent_events(server: str) -> None:
    with httpx.stream(
        "GET",
        f"{server}/generate",
        params={"prompt": "Once upon a time", "max_tokens": 20},
        timeout=60,
    ) as r:
        received = list(events(r))  # fmt: skip
    assert received[-1] == "[DONE]"
    assert json.loads(received[-2]) == {"finish_reason": "length"}
    text = "".join(json.loads(e)["text"] for e in received[:-2])
    assert text.strip()


def test_fastapi_rejects_a_bad_request(server: str) -> None:
    response = httpx.get(f"{server}/generate", params={"prompt": "", "max_tokens": 5})
    assert response.status_code == 400
    assert "empty" in response.json()["detail"]


def test_fastapi_serves_the_openai_api_mounted_beside_its_own_routes(server: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/openai/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12,
                                    temperature=0)  # fmt: skip
    with httpx.stream("GET", f"{server}/generate", timeout=60,
                      params={"prompt": "Once upon a time", "max_tokens": 12}) as r:  # fmt: skip
        received = list(events(r))
    assert out.choices[0].text == "".join(json.loads(e)["text"] for e in received[:-2])
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_fastapi_client_disconnect_aborts_the_request(server: str) -> None:
    with httpx.stream(
        "GET", f"{server}/generate", params={"prompt": "One day", "max_tokens": 1500}, timeout=60
    ) as r:
        first = next(events(r))  # fmt: skip
        assert "text" in json.loads(first)
    # The connection is closed: the server must abort the request and free its blocks.
    deadline = time.monotonic() + 30
    while True:
        stats = httpx.get(f"{server}/stats").json()
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"request still running: {stats}"
        time.sleep(0.05)
    assert stats["kv_blocks_free"] + stats["kv_blocks_cached"] == stats["kv_blocks_total"]
    assert stats["generated_tokens_total"] < 1500
