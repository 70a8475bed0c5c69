"""The HTTP server as OpenAI's own client sees it: a real uvicorn on a loopback port, driven
by the `openai` package (sync and async clients)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from asyncllm import AsyncEngine, SamplingParams  # noqa: E402
from asyncllm.server import create_app  # noqa: E402
from tests.models import assert_reads_as_a_story  # noqa: E402
from tests.servers import serve_in_thread, wait_until_idle  # noqa: E402

KEY = "test-key"
MODEL = "tiny-chat"
MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, AsyncEngine]]:
    """The embedded model (which ships a chat template) behind a real server."""
    engine = AsyncEngine.from_pretrained(None, device="cpu", num_kv_blocks=512)
    app = create_app(engine, served_model_name=MODEL, api_key=KEY, max_body_bytes=MAX_BODY_BYTES)
    with serve_in_thread(app) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server: tuple[str, AsyncEngine]) -> Any:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def engine(server: tuple[str, AsyncEngine]) -> AsyncEngine:
    return server[1]


def greedy(engine: AsyncEngine, prompt: Any, max_tokens: int) -> Any:
    """What the engine itself answers (it runs on the server's loop; we are another thread)."""
    return engine.generate_threadsafe(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))


# ---- completions -------------------------------------------------------------------------------


def test_completion_has_openai_shape(client: Any, engine: AsyncEngine) -> None:
    before = int(time.time())
    out = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert out.id.startswith("cmpl-")
    assert out.object == "text_completion"
    assert before - 1 <= out.created <= time.time() + 1
    assert out.model == MODEL
    [choice] = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    prompt_tokens = len(engine.tokenizer.encode("Once upon a time"))
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == prompt_tokens + 8
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_text_is_what_the_engine_generates(client: Any, engine: AsyncEngine) -> None:
    out = client.completions.create(model=MODEL, prompt="One day", max_tokens=24, temperature=0)
    assert out.choices[0].text == greedy(engine, "One day", 24).text


def test_max_tokens_defaults_to_16_as_in_openai(client: Any) -> None:
    out = client.completions.create(
        model=MODEL, prompt="The cat", temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 16


def test_token_id_prompts_and_batches_give_one_choice_per_prompt(
    client: Any, engine: AsyncEngine
) -> None:
    ids = engine.tokenizer.encode("The dog ran")
    batch = ["Once upon a time", "The sun"]
    single = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    texts = client.completions.create(model=MODEL, prompt=batch, max_tokens=6, temperature=0)
    id_lists = client.completions.create(
        model=MODEL, prompt=[ids, ids[:2]], max_tokens=6, temperature=0
    )
    assert single.choices[0].text == greedy(engine, ids, 6).text
    assert [c.index for c in texts.choices] == [0, 1]
    assert [c.text for c in texts.choices] == [greedy(engine, p, 6).text for p in batch]
    assert [c.text for c in id_lists.choices] == [greedy(engine, p, 6).text for p in (ids, ids[:2])]
    assert texts.usage.prompt_tokens == sum(len(engine.tokenizer.encode(p)) for p in batch)
    assert texts.usage.completion_tokens == 12


def test_streamed_completion_adds_up_to_the_full_one(client: Any) -> None:
    full = client.completions.create(
        model=MODEL, prompt="A little bird", max_tokens=20, temperature=0
    )
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="A little bird", max_tokens=20, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)


def test_include_usage_adds_a_last_chunk_with_the_usage(client: Any) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=["Hello", "Bye"],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.total_tokens == last.usage.prompt_tokens + 10
    assert all(c.usage is None for c in content)
    assert {c.choices[0].index for c in content} == {0, 1}
    finished = [c.choices[0].index for c in content if c.choices[0].finish_reason == "length"]
    assert sorted(finished) == [0, 1]


def test_a_stop_string_ends_the_text_before_it(client: Any, engine: AsyncEngine) -> None:
    text = greedy(engine, "Once upon a time", 30).text
    stop = text.split()[3]
    out = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=0, stop=[stop]
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.index(stop)]


def test_vllm_extensions_reach_the_engine(client: Any, engine: AsyncEngine) -> None:
    plain = greedy(engine, "Once upon a time", 10)
    stop_id = plain.token_ids[4]
    out = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=10,
        temperature=0,
        extra_body={"stop_token_ids": [stop_id], "min_tokens": 0, "top_k": 5, "min_p": 0.0},
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == plain.token_ids.index(stop_id) + 1


def test_completion_logprobs_list_each_token_with_alternatives(client: Any) -> None:
    out = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(12)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3
        assert logprob <= 0
        assert top[token] == pytest.approx(logprob)  # greedy: the sampled token is the top one
        assert max(top.values()) == pytest.approx(logprob)


# ---- chat --------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "Hi!"}]


def test_chat_completion_has_openai_shape(client: Any) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0
    )
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    [choice] = out.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_renders_the_chat_template(client: Any, engine: AsyncEngine) -> None:
    ids = engine.tokenizer.apply_chat_template(MESSAGES)
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=12, temperature=0
    )
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == greedy(engine, ids, 12).text


ASK = "Tell me a story about a cat named Tom."
STORY = [{"role": "user", "content": ASK}]
ROOM = 400  # far more tokens than a story of the embedded model takes


def test_embedded_model_answers_a_chat_with_a_story_that_ends_its_turn(
    client: Any, engine: AsyncEngine
) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=ROOM, temperature=0
    )
    [choice] = out.choices
    assert choice.finish_reason == "stop" and out.usage.completion_tokens < ROOM
    assert_reads_as_a_story(choice.message.content, ASK)
    assert "Tom" in choice.message.content  # the story is the one asked for
    # It stopped at the end-of-turn token, which the reply does not spell out.
    ids = engine.generate_threadsafe(
        engine.tokenizer.apply_chat_template(STORY), SamplingParams(temperature=0, max_tokens=ROOM)
    ).token_ids
    assert engine.tokenizer.token_bytes(ids[-1]) == b"<|im_end|>"
    assert len(ids) == out.usage.completion_tokens


def test_sampled_chat_reply_is_a_story_that_ends_its_turn(client: Any) -> None:
    system = {"role": "system", "content": "You are a helpful assistant."}
    out = client.chat.completions.create(
        model=MODEL, messages=[system, *STORY], max_tokens=ROOM, temperature=0.8, seed=11
    )
    assert out.choices[0].finish_reason == "stop"
    assert_reads_as_a_story(out.choices[0].message.content, ASK)


def test_streamed_chat_reply_ends_its_turn_like_the_whole_one(client: Any) -> None:
    full = client.chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=ROOM, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=STORY, max_tokens=ROOM, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_accepts_text_content_parts(client: Any) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi!"}]}]
    plain = [{"role": "user", "content": "Hi!"}]
    a = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=plain, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_streamed_chat_announces_the_role_then_adds_up(client: Any) -> None:
    full = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=15, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, usage = chunks
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == full.choices[0].message.content
    assert content[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert usage.choices == [] and usage.usage == full.usage


def test_chat_logprobs_give_bytes_and_top_alternatives(client: Any) -> None:
    out = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=ROOM,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert out.choices[0].finish_reason == "stop"
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    # The end-of-turn token is listed, not written.
    assert entries[-1].token == "<|im_end|>"
    text = out.choices[0].message.content + "<|im_end|>"
    assert b"".join(bytes(e.bytes) for e in entries).decode() == text
    for entry in entries:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_top_logprobs_without_logprobs_is_a_400(client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, top_logprobs=2)


# ---- n and penalties (the engine's) ------------------------------------------------------------


def test_n_gives_n_choices(client: Any) -> None:
    out = client.completions.create(
        model=MODEL,
        prompt="Once",
        max_tokens=12,
        n=3,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1  # sampled independently
    assert out.usage.completion_tokens == 36  # counted over every choice
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, n=2, temperature=1.0, seed=3
    )
    assert [c.index for c in chat.choices] == [0, 1]


def test_n_with_a_batch_numbers_choices_prompt_by_prompt(client: Any) -> None:
    out = client.completions.create(
        model=MODEL,
        prompt=["Once", "The sun"],
        max_tokens=4,
        n=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: every choice the same
    assert out.usage.completion_tokens == 16


def test_streamed_n_interleaves_choices_by_index(client: Any) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=8,
            n=2,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    *content, usage = chunks
    texts = {0: "", 1: ""}
    for chunk in content:
        [choice] = chunk.choices
        texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] != ""  # greedy: both choices the same
    assert usage.usage.completion_tokens == 16


def test_penalties_reach_the_engine(client: Any) -> None:
    out = client.completions.create(
        model=MODEL,
        prompt="the the the the",
        max_tokens=8,
        temperature=0,
        presence_penalty=1.5,
        frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.3},
    )
    assert out.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model=MODEL, prompt="x", presence_penalty=5)
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        client.completions.create(model=MODEL, prompt="x", extra_body={"repetition_penalty": 0})


# ---- errors ------------------------------------------------------------------------------------


def test_an_invalid_parameter_is_a_400_naming_it(client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature") as caught:
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert caught.value.status_code == 400
    assert caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, top_p=0)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model=MODEL, prompt="x", logprobs=21)


def test_a_prompt_too_long_is_a_400_naming_the_limit(client: Any, engine: AsyncEngine) -> None:
    limit = engine.max_model_len
    with pytest.raises(openai.BadRequestError, match=f"max_model_len {limit}") as caught:
        client.completions.create(model=MODEL, prompt=[1] * (limit + 1), max_tokens=1)
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=str(limit)):
        client.completions.create(model=MODEL, prompt=[1] * 10, max_tokens=limit)


def test_a_wrong_or_missing_api_key_is_a_401(server: tuple[str, AsyncEngine]) -> None:
    wrong = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.completions.create(model=MODEL, prompt="x")
    assert caught.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_an_unknown_model_is_a_404(client: Any) -> None:
    with pytest.raises(openai.NotFoundError, match="gpt-4") as caught:
        client.completions.create(model="gpt-4", prompt="x")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_a_body_over_the_limit_is_a_413(client: Any) -> None:
    with pytest.raises(openai.APIStatusError, match="limit") as caught:
        client.completions.create(model=MODEL, prompt="x" * MAX_BODY_BYTES)
    assert caught.value.status_code == 413


def test_unsupported_openai_fields_are_refused_not_ignored(client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=MODEL, prompt="x", echo=True)
    with pytest.raises(openai.BadRequestError, match="tool"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt="x", logit_bias={"5": 1.0})
    with pytest.raises(openai.BadRequestError, match="unknown"):
        client.completions.create(model=MODEL, prompt="x", extra_body={"max_tokenz": 3})


def test_models_lists_the_served_model(client: Any, engine: AsyncEngine) -> None:
    [card] = client.models.list().data
    assert card.id == MODEL and card.object == "model" and card.owned_by == "asyncllm"
    assert card.model_extra["max_model_len"] == engine.max_model_len
    assert client.models.retrieve(MODEL).id == MODEL


def test_the_server_is_idle_after_all_of_the_above(engine: AsyncEngine) -> None:
    stats = wait_until_idle(engine)
    assert stats.kv_blocks_free + stats.kv_blocks_cached == stats.kv_blocks_total


# ---- the async client --------------------------------------------------------------------------


def test_async_client_runs_concurrent_requests(server: tuple[str, AsyncEngine]) -> None:
    async def main() -> tuple[list[str], list[str], str]:
        client = openai.AsyncOpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)
        prompts = ["Once upon a time", "The sun", "A big dog", "One day"]
        async with client:
            outs = await asyncio.gather(
                *(
                    client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0)
                    for p in prompts
                )
            )
            chats = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=MODEL,
                        max_tokens=8,
                        temperature=0,
                        messages=[{"role": "user", "content": p}],
                    )
                    for p in prompts
                )
            )
            stream = await client.completions.create(
                model=MODEL, prompt=prompts[0], max_tokens=10, temperature=0, stream=True
            )
            streamed = "".join([c.choices[0].text async for c in stream])
        return (
            [o.choices[0].text for o in outs],
            [c.choices[0].message.content or "" for c in chats],
            streamed,
        )

    texts, chats, streamed = asyncio.run(main())
    engine = server[1]
    prompts = ["Once upon a time", "The sun", "A big dog", "One day"]
    assert texts == [greedy(engine, p, 10).text for p in prompts]
    template = engine.tokenizer.apply_chat_template
    assert chats == [greedy(engine, template([{"role": "user", "content": p}]), 8).text
                     for p in prompts]  # fmt: skip
    assert streamed == texts[0]


def test_async_client_errors_match_the_sync_ones(server: tuple[str, AsyncEngine]) -> None:
    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)
        async with client:
            with pytest.raises(openai.BadRequestError):
                await client.completions.create(model=MODEL, prompt="x", max_tokens=0)
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="nope", messages=MESSAGES)

    asyncio.run(main())


# ---- a dead engine and a full queue ------------------------------------------------------------


def test_a_dead_engine_answers_503_with_retry_after() -> None:
    engine = AsyncEngine.from_pretrained(None, device="cpu", num_kv_blocks=64)
    with serve_in_thread(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        runner: Any = engine._core.runner

        def failing_launch(*args: Any) -> Any:
            raise RuntimeError("injected failure")

        runner.launch = failing_launch
        with pytest.raises(openai.InternalServerError):  # the request the engine died on
            client.completions.create(model="tiny-qwen3", prompt="x", max_tokens=4)
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model="tiny-qwen3", prompt="x", max_tokens=4)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1"
        assert "failed" in caught.value.message
        assert httpx.get(f"{url}/health").status_code == 503


def test_a_full_waiting_queue_answers_503_with_retry_after() -> None:
    engine = AsyncEngine.from_pretrained(
        None, device="cpu", num_kv_blocks=64, max_num_seqs=1, max_waiting_requests=1
    )
    with serve_in_thread(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        long = {
            "model": "tiny-qwen3",
            "prompt": "x",
            "max_tokens": 1000,  # within the tiny model's max_model_len (1024)
            "extra_body": {"ignore_eos": True},
        }
        running = client.completions.create(stream=True, **long)
        next(iter(running))  # admitted and decoding
        waiting = client.completions.create(stream=True, **long)  # fills the queue
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model="tiny-qwen3", prompt="x", max_tokens=2)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1"
        running.close()
        waiting.close()
