"""The embedded model chats: its template renders Qwen-style turns and its answers end the turn."""

from __future__ import annotations

from typing import Any

import jinja2
import pytest
from transformers import AutoTokenizer

from asyncllm import AsyncEngine, SamplingParams
from asyncllm.model.config import ModelConfig
from tests.models import TINY_MODEL_DIR, assert_reads_as_a_story

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
ASK = {"role": "user", "content": "Tell me a story about a brave fox named Leo."}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def render(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    text: str = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text


def test_template_renders_system_and_user_turns_then_opens_the_assistant_turn(
    tokenizer: Any,
) -> None:
    assert render(tokenizer, [SYSTEM, ASK]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nTell me a story about a brave fox named Leo.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_closes_earlier_assistant_turns(tokenizer: Any) -> None:
    answer = {"role": "assistant", "content": "Once upon a time."}
    messages = [ASK, answer, {"role": "user", "content": "Make it shorter."}]
    assert render(tokenizer, messages).endswith(
        "<|im_start|>assistant\nOnce upon a time.<|im_end|>\n"
        "<|im_start|>user\nMake it shorter.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_reads_openai_text_parts_like_plain_content(tokenizer: Any) -> None:
    parts = {"role": "user", "content": [{"type": "text", "text": ASK["content"]}]}
    assert render(tokenizer, [SYSTEM, parts]) == render(tokenizer, [SYSTEM, ASK])


def test_template_rejects_a_role_it_was_not_trained_on(tokenizer: Any) -> None:
    with pytest.raises(jinja2.TemplateError, match="not tool"):
        render(tokenizer, [{"role": "tool", "content": "42"}])


def test_turn_markers_are_single_special_tokens_and_end_of_turn_stops(tokenizer: Any) -> None:
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == start and ids[-1] == end
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHi"
    assert end in ModelConfig.from_dir(TINY_MODEL_DIR).eos_token_ids


async def test_greedy_chat_answer_is_a_story_that_ends_its_turn(tokenizer: Any) -> None:
    prompt = render(tokenizer, [SYSTEM, ASK])
    ids = tokenizer.apply_chat_template([SYSTEM, ASK], add_generation_prompt=True)["input_ids"]
    async with AsyncEngine.from_pretrained(None, device="cpu") as engine:
        assert engine.tokenizer.encode(prompt) == ids  # text and ids are the same prompt
        out = await engine.generate(ids, SamplingParams(temperature=0, max_tokens=400))
    specials = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert out.finish_reason == "stop" and out.token_ids[-1] == specials[-1]
    assert set(specials).isdisjoint(out.token_ids[:-1])
    assert_reads_as_a_story(out.text, ASK["content"])
    assert "Leo" in out.text and "fox" in out.text  # the story is the one asked for
