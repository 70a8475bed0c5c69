"""The HTTP server at the wire: malformed bodies, limits, keys, SSE framing, client
disconnects, and the non-OpenAI endpoints (health, metrics, tokenization)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("uvicorn")

from asyncllm import AsyncEngine, errors
from asyncllm.server import create_app
from asyncllm.server.protocol import ChatStreamChunk, CompletionStreamChunk
from tests.servers import (
    iter_sse,
    serve_in_thread,
    sse_data,
    wait_until_idle,
)

KEY = "http-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY_BYTES = 32 * 1024
LONG = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, AsyncEngine]]:
    # The embedded model, which ships a chat template. Two sequences at most: a third request
    # waits, which the disconnect tests rely on.
    engine = AsyncEngine.from_pretrained(None, device="cpu", num_kv_blocks=512, max_num_seqs=2)
    app = create_app(engine, api_key=KEY, max_body_bytes=MAX_BODY_BYTES)
    with serve_in_thread(app) as url:
        yield url, engine


@pytest.fixture(scope="module")
def http(server: tuple[str, AsyncEngine]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture
def engine(server: tuple[str, AsyncEngine]) -> Iterator[AsyncEngine]:
    engine = server[1]
    yield engine
    stats = wait_until_idle(engine)  # every test leaves nothing running and no block held
    assert stats.kv_blocks_free + stats.kv_blocks_cached == stats.kv_blocks_total


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# ---- malformed requests ------------------------------------------------------------------------


def test_malformed_json_is_a_400(http: httpx.Client, engine: AsyncEngine) -> None:
    response = http.post(
        "/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    error = error_of(response, 400)
    assert "malformed JSON" in error["message"] and error["type"] == "invalid_request_error"


def test_a_body_that_is_not_an_object_is_a_400(http: httpx.Client, engine: AsyncEngine) -> None:
    for body in ([1, 2], "text", None):
        assert "JSON object" in error_of(http.post("/v1/completions", json=body), 400)["message"]


def test_a_field_of_the_wrong_type_is_a_400_naming_it(
    http: httpx.Client, engine: AsyncEngine
) -> None:
    error = error_of(http.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}), 400)
    assert error["param"] == "max_tokens" and "max_tokens" in error["message"]
    error = error_of(http.post("/v1/completions", json={"prompt": {"text": "x"}}), 400)
    assert error["param"] == "prompt" and "list of token ids" in error["message"]
    for field, value in (("temperature", True), ("n", "2"), ("stream", 1), ("max_tokens", 2.0)):
        body = {"prompt": "x", field: value}  # JSON types are not coerced
        assert error_of(http.post("/v1/completions", json=body), 400)["param"] == field
    error = error_of(
        http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}),
        400,
    )
    assert error["param"] == "messages"


def test_an_engine_rejected_value_names_its_field(http: httpx.Client, engine: AsyncEngine) -> None:
    for field, value in (("top_p", 0), ("seed", -1), ("stop", [""]), ("logprobs", 21)):
        body = {"prompt": "x", field: value}
        error = error_of(http.post("/v1/completions", json=body), 400)
        assert error["param"] == field and field in error["message"]
    chat = {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}
    assert error_of(http.post("/v1/chat/completions", json=chat), 400)["param"] == "top_logprobs"


def test_missing_or_empty_inputs_are_a_400(http: httpx.Client, engine: AsyncEngine) -> None:
    assert error_of(http.post("/v1/completions", json={}), 400)["param"] == "prompt"
    assert "empty" in error_of(http.post("/v1/completions", json={"prompt": ""}), 400)["message"]
    assert "empty" in error_of(http.post("/v1/completions", json={"prompt": []}), 400)["message"]
    assert error_of(http.post("/v1/chat/completions", json={"messages": []}), 400)["param"] == (
        "messages"
    )


def test_a_bad_token_id_in_a_batch_names_the_prompt(
    http: httpx.Client, engine: AsyncEngine
) -> None:
    response = http.post("/v1/completions", json={"prompt": [[1, 2], [3, 10**9]], "max_tokens": 2})
    assert "prompt 1" in error_of(response, 400)["message"]


def test_image_content_is_refused(http: httpx.Client, engine: AsyncEngine) -> None:
    parts = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    response = http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]}
    )
    assert "image_url" in error_of(response, 400)["message"]


def test_a_chunked_body_over_the_limit_is_a_413(http: httpx.Client, engine: AsyncEngine) -> None:
    def body() -> Iterator[bytes]:  # no Content-Length: the server must count
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    response = http.post(
        "/v1/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert str(MAX_BODY_BYTES) in error_of(response, 413)["message"]


# ---- keys, paths -------------------------------------------------------------------------------


def test_the_key_guards_the_api_but_not_health_or_metrics(
    server: tuple[str, AsyncEngine], engine: AsyncEngine
) -> None:
    url = server[0]
    assert error_of(httpx.get(f"{url}/v1/models"), 401)["code"] == "invalid_api_key"
    bad = {"Authorization": "Bearer wrong"}
    error_of(httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers=bad), 401)
    error_of(httpx.post(f"{url}/tokenize", json={"prompt": "x"}), 401)
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_unknown_paths_and_methods_answer_in_openai_shape(
    http: httpx.Client, engine: AsyncEngine
) -> None:
    error_of(http.get("/v1/nothing-here"), 404)
    error_of(http.get("/v1/completions"), 405)


# ---- server-sent events ------------------------------------------------------------------------


def test_events_are_sse_framed_and_end_with_done(http: httpx.Client, engine: AsyncEngine) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])


def test_completion_chunks_are_the_protocol_models(http: httpx.Client, engine: AsyncEngine) -> None:
    body = {
        "prompt": ["One day", "The sun"],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "logprobs": 2,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/completions", json=body) as response:
        payloads = sse_data(response)[:-1]
    for payload in payloads:
        chunk = CompletionStreamChunk.model_validate_json(payload)
        assert chunk.model_dump(mode="json", exclude_unset=True) == json.loads(payload)
    assert json.loads(payloads[0])["choices"][0]["logprobs"]["tokens"]


def test_chat_chunks_are_the_protocol_models(http: httpx.Client, engine: AsyncEngine) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "stream": True,
        "logprobs": True,
        "top_logprobs": 1,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        payloads = sse_data(response)[:-1]
    for payload in payloads:
        chunk = ChatStreamChunk.model_validate_json(payload)
        assert chunk.model_dump(mode="json", exclude_unset=True) == json.loads(payload)


def test_a_failure_mid_stream_ends_with_an_error_event(tmp_path: Any) -> None:
    engine = AsyncEngine.from_pretrained(None, device="cpu", num_kv_blocks=64)
    with (
        serve_in_thread(create_app(engine)) as url,
        httpx.stream("POST", f"{url}/v1/completions", json=LONG, timeout=60) as response,
    ):
        events = iter_sse(response)
        assert next(events).startswith("{")
        core: Any = engine._core
        original = core.apply

        def failing_apply(*args: Any) -> Any:
            core.apply = original
            raise RuntimeError("injected failure")

        core.apply = failing_apply
        payloads = list(events)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert "injected failure" in error["message"] and error["type"] == "service_unavailable"


# ---- client disconnects ------------------------------------------------------------------------


def test_a_client_leaving_mid_stream_aborts_its_request(
    http: httpx.Client, engine: AsyncEngine
) -> None:
    generated = engine.stats().generated_tokens_total
    with http.stream("POST", "/v1/completions", json=LONG) as response:
        events = iter_sse(response)
        for _ in range(3):
            assert next(events).startswith("{")
    wait_until_idle(engine)
    assert engine.stats().generated_tokens_total - generated < 900


def occupy_both_slots(http: httpx.Client) -> list[Any]:
    """Two long streams that keep the server's two sequence slots busy (for seconds)."""
    blockers: list[Any] = []
    for _ in range(2):
        context = http.stream("POST", "/v1/completions", json={**LONG, "max_tokens": 2000})
        events = iter_sse(context.__enter__())
        next(events)  # running (the iterator is kept: dropping it would close the connection)
        blockers.append((context, events))
    return blockers


def release(blockers: list[Any]) -> None:
    for context, _ in blockers:
        context.__exit__(None, None, None)


def wait_for(condition: Any, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_leaving_before_its_first_token_aborts_the_waiting_request(
    http: httpx.Client, engine: AsyncEngine
) -> None:
    blockers = occupy_both_slots(http)
    try:
        admitted = engine.stats().prompt_tokens_total
        with http.stream("POST", "/v1/completions", json=LONG) as response:
            assert response.status_code == 200  # headers came; no token can come yet
            wait_for(lambda: engine.stats().waiting == 1)
        wait_for(lambda: engine.stats().waiting == 0)
        stats = engine.stats()
        assert stats.running == 2  # the two long ones still run
        assert stats.prompt_tokens_total == admitted  # the third was never admitted: aborted
    finally:
        release(blockers)


def test_a_client_leaving_a_non_streamed_request_aborts_it(
    server: tuple[str, AsyncEngine], http: httpx.Client, engine: AsyncEngine
) -> None:
    blockers = occupy_both_slots(http)
    try:
        body = {**LONG, "stream": False}
        gave_up = threading.Event()

        def impatient() -> None:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server[0]}/v1/completions", json=body, headers=AUTH, timeout=1.0)
            gave_up.set()

        admitted = engine.stats().prompt_tokens_total
        thread = threading.Thread(target=impatient)
        thread.start()
        wait_for(lambda: engine.stats().waiting == 1)
        thread.join()
        assert gave_up.is_set()
        wait_for(lambda: engine.stats().waiting == 0)
        stats = engine.stats()
        assert stats.running == 2
        assert stats.prompt_tokens_total == admitted
    finally:
        release(blockers)


# ---- health, metrics, models, tokenization -----------------------------------------------------


def test_health_is_ok_while_the_engine_runs(http: httpx.Client, engine: AsyncEngine) -> None:
    assert http.get("/health").json() == {"status": "ok"}


def test_metrics_are_prometheus_text_with_asyncllm_names(
    http: httpx.Client, engine: AsyncEngine
) -> None:
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "ignore_eos": True})
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    values = {
        line.split()[0]: float(line.split()[1])
        for line in response.text.splitlines()
        if line and not line.startswith("#")
    }
    stats = engine.stats()
    assert values["asyncllm_kv_blocks_total"] == stats.kv_blocks_total
    assert values["asyncllm_generated_tokens_total"] >= 3
    for name in ("requests_running", "requests_waiting", "kv_usage_ratio", "steps_total"):
        assert f"asyncllm_{name}" in values


def test_tokenize_and_detokenize_round_trip(http: httpx.Client, engine: AsyncEngine) -> None:
    text = "Once upon a time, café"
    tokens = http.post("/tokenize", json={"prompt": text}).json()
    assert tokens["tokens"] == engine.tokenizer.encode(text)
    assert tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == engine.max_model_len
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": text}


def test_tokenize_renders_chat_messages(http: httpx.Client, engine: AsyncEngine) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    tokens = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert tokens == engine.tokenizer.apply_chat_template(messages)


def test_tokenize_refuses_bad_input(http: httpx.Client, engine: AsyncEngine) -> None:
    error_of(http.post("/tokenize", json={}), 400)
    error_of(http.post("/tokenize", json={"prompt": "x", "messages": []}), 400)
    assert error_of(http.post("/detokenize", json={"tokens": [-1]}), 400)["param"] == "tokens"
    error_of(http.post("/tokenize", json={"prompt": "x", "model": "other"}), 404)


def test_a_stream_interval_gathers_tokens_into_fewer_events() -> None:
    engine = AsyncEngine.from_pretrained(None, device="cpu", num_kv_blocks=64)
    body = {"prompt": "Once upon a time", "max_tokens": 18, "ignore_eos": True, "stream": True,
            "temperature": 0, "logprobs": 0}  # fmt: skip
    with serve_in_thread(create_app(engine, stream_interval=4)) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            chunks = [json.loads(p)["choices"][0] for p in sse_data(response)[:-1]]
        whole = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}).json()
    sizes = [len(c["logprobs"]["tokens"]) for c in chunks]
    assert sizes[0] == 1 and sum(sizes) == 18  # the first token at once, then by fours
    assert all(size >= 4 for size in sizes[1:-1]) and len(sizes) <= 6
    assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]


def test_a_low_event_rate_spaces_events_out_but_loses_nothing() -> None:
    engine = AsyncEngine.from_pretrained(None, device="cpu", num_kv_blocks=64)
    body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "stream": True,
            "temperature": 0, "logprobs": 0}  # fmt: skip
    # One stream at 10 events a second: an event every 0.1 s, a token every few ms.
    with serve_in_thread(create_app(engine, max_event_rate=10)) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            chunks = [json.loads(p)["choices"][0] for p in sse_data(response)[:-1]]
        whole = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}).json()
    sizes = [len(c["logprobs"]["tokens"]) for c in chunks]
    assert sizes[0] == 1 and sum(sizes) == 40  # the first token at once
    assert max(sizes[1:]) > 1  # later events gathered the tokens of several steps
    assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("option", "value"),
    [("served_model_name", ""), ("api_key", ""), ("api_key", 5), ("max_body_bytes", 0),
     ("max_body_bytes", True), ("stream_interval", 0), ("stream_interval", 1.5),
     ("max_event_rate", -1), ("max_event_rate", "fast")],
)  # fmt: skip
def test_create_app_refuses_bad_options_naming_them(option: str, value: Any) -> None:
    engine = AsyncEngine.from_pretrained(None, device="cpu")
    with pytest.raises(errors.ConfigError, match=option):
        create_app(engine, **{option: value})
    with pytest.raises(errors.ConfigError, match="AsyncEngine"):
        create_app("not an engine")  # type: ignore[arg-type]
