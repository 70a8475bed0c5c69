"""Stop tokens, stop strings, EOS, min_tokens and max_tokens end requests correctly."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncllm import AsyncEngine, SamplingParams
from tests.models import TINY_MODEL_DIR

PROMPT = [11, 42, 7, 99, 3]


@pytest.fixture
async def engine(random_model_dir: Path):  # type: ignore[no-untyped-def]
    async with AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", dtype="float32", num_kv_blocks=128
    ) as engine:
        yield engine


async def free_run(engine: AsyncEngine, max_tokens: int = 40) -> list[int]:
    out = await engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=max_tokens))
    assert out.finish_reason == "length" and len(out.token_ids) == max_tokens
    return out.token_ids


async def test_stop_token_ids_end_at_the_first_occurrence(engine: AsyncEngine) -> None:
    full = await free_run(engine)
    stop = full[6]
    out = await engine.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop])
    )
    assert out.finish_reason == "stop"
    assert out.token_ids == full[: full.index(stop) + 1]


async def test_min_tokens_holds_stop_tokens_back(engine: AsyncEngine) -> None:
    full = await free_run(engine)
    stop = full[1]
    out = await engine.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=40, min_tokens=8, stop_token_ids=[stop])
    )
    assert len(out.token_ids) >= 8
    assert stop not in out.token_ids[:8]
    assert out.finish_reason == "stop" or len(out.token_ids) == 40


async def test_stop_strings_truncate_the_text_and_are_not_returned(engine: AsyncEngine) -> None:
    full = await engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40))
    stop = full.text[12:15]
    cut = full.text.index(stop)
    stream = engine.stream(
        PROMPT, SamplingParams(temperature=0, max_tokens=40, stop=[stop, "\x00never"])
    )
    pieces = [t.text async for t in stream]
    out = stream.output()
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert "".join(pieces) == out.text  # the stop string never reached the stream
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


async def test_max_tokens_finishes_with_length(engine: AsyncEngine) -> None:
    out = await engine.generate(PROMPT, SamplingParams(max_tokens=5))
    assert out.finish_reason == "length" and len(out.token_ids) == 5


async def test_max_model_len_caps_unbounded_requests(random_model_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", num_kv_blocks=16, max_model_len=40
    ) as engine:
        out = await engine.generate(PROMPT, SamplingParams(temperature=0))
    assert out.finish_reason == "length"
    assert len(PROMPT) + len(out.token_ids) == 40


async def test_eos_stops_and_ignore_eos_and_min_tokens_override_it() -> None:
    async with AsyncEngine.from_pretrained(None, device="cpu") as engine:
        eos = set(engine._core.model_config.eos_token_ids)
        out = await engine.generate(
            "Once upon a time", SamplingParams(temperature=0, max_tokens=300)
        )
        assert out.finish_reason == "stop" and out.token_ids[-1] in eos
        assert eos.isdisjoint(out.token_ids[:-1])
        ignored = await engine.generate(
            "Once upon a time",
            SamplingParams(temperature=0, max_tokens=len(out.token_ids) + 5, ignore_eos=True),
        )
        assert ignored.finish_reason == "length"
        assert ignored.token_ids[: len(out.token_ids)] == out.token_ids
        held = await engine.generate(
            "Once upon a time",
            SamplingParams(temperature=0, max_tokens=400, min_tokens=len(out.token_ids) + 3),
        )
        assert eos.isdisjoint(held.token_ids[: len(out.token_ids) + 3])


async def test_streamed_text_concatenates_to_the_final_text(engine: AsyncEngine) -> None:
    stream = engine.stream(PROMPT, SamplingParams(temperature=0.8, max_tokens=50, seed=3))
    tokens = [t async for t in stream]
    out = stream.output()
    assert "".join(t.text for t in tokens) == out.text
    assert [t.token_id for t in tokens] == out.token_ids
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert tokens[-1].finish_reason == "length"
    assert all(t.finish_reason is None for t in tokens[:-1])
    assert out.text == engine.tokenizer.decode(out.token_ids)


def test_the_embedded_model_is_shipped() -> None:
    names = {p.name for p in TINY_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert sum(p.stat().st_size for p in TINY_MODEL_DIR.iterdir()) < 10 * 2**20


# ---- stop strings and min_tokens ---------------------------------------------------------------


def expected_text(pieces: list[str], stop: str, min_tokens: int) -> tuple[str, int | None]:
    """The rule, written out: a stop string counts at its first occurrence that ends in the
    text of token number `min_tokens` or later. Returns the text and the cut (None: no stop)."""
    full = "".join(pieces)
    boundary = len("".join(pieces[: max(min_tokens - 1, 0)]))
    cut = full.find(stop, max(0, boundary - len(stop) + 1))
    return (full, None) if cut < 0 else (full[:cut], cut)


async def free_pieces(engine: AsyncEngine, max_tokens: int = 24) -> list[str]:
    stream = engine.stream(PROMPT, SamplingParams(temperature=0, max_tokens=max_tokens))
    return [t.text async for t in stream]


async def test_a_stop_string_before_min_tokens_is_ignored_whatever_else_is_listed(
    engine: AsyncEngine,
) -> None:
    pieces = await free_pieces(engine)
    early = len("".join(pieces[:3]))
    stop = "".join(pieces)[early - 2 : early]  # ends in the text of token 3, before min_tokens
    want, cut = expected_text(pieces, stop, min_tokens=8)
    outputs = [
        await engine.generate(
            PROMPT, SamplingParams(temperature=0, max_tokens=24, min_tokens=8, stop=stops)
        )
        for stops in ([stop], [stop, "an unrelated and much longer stop string"])
    ]
    for out in outputs:  # the longer entry holds more text back: it must not matter
        assert out.text == want
        assert len(out.token_ids) >= 8
        assert out.finish_reason == ("length" if cut is None else "stop")


async def test_a_stop_string_that_ends_at_min_tokens_counts_even_if_it_starts_before(
    engine: AsyncEngine,
) -> None:
    pieces = await free_pieces(engine)
    full = "".join(pieces)
    # The first token k (from the 4th on) whose text and the one before it are non-empty.
    k = next(i + 1 for i in range(3, len(pieces)) if pieces[i] and pieces[i - 1])
    start = len("".join(pieces[: k - 1])) - 1
    stop = full[start : start + 2]  # last char of token k-1 + first char of token k
    out = await engine.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=24, min_tokens=k, stop=[stop, "~~~~~~"])
    )
    assert out.finish_reason == "stop"
    assert out.text == full[:start] and len(out.token_ids) == k
