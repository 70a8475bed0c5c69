"""`SamplingParams(n=...)`: one request, n choices sharing the prompt's KV blocks, streamed
together; and `max_waiting_requests`, which refuses work with a typed error when full."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from transformers import Qwen3ForCausalLM

from asyncllm import AsyncEngine, EngineConfig, SamplingParams, StreamToken, errors
from asyncllm.engine.core import choice_seed
from tests.models import all_blocks_unused, random_prompts, reference_greedy

BLOCK = 16
PROMPT = random_prompts([50], 384, seed=21)[0]  # three full blocks and a partial one
FULL_BLOCK_TOKENS = (len(PROMPT) // BLOCK) * BLOCK


def engine_for(model_dir: Path, **overrides: Any) -> AsyncEngine:
    settings: dict[str, Any] = dict(
        device="cpu", dtype="float32", num_kv_blocks=128, block_size=BLOCK
    )
    settings.update(overrides)
    return AsyncEngine.from_pretrained(str(model_dir), **settings)


@pytest.fixture
async def engine(random_model_dir: Path) -> AsyncIterator[AsyncEngine]:
    async with engine_for(random_model_dir) as engine:
        yield engine


async def idle_stats(engine: AsyncEngine) -> Any:
    with anyio.fail_after(30):
        await engine.idle()
    return engine.stats()


# ---- outputs ---------------------------------------------------------------------------------


async def test_generate_returns_every_choice_and_choice_0_at_the_top(engine: AsyncEngine) -> None:
    out = await engine.generate(PROMPT, SamplingParams(n=3, seed=5, max_tokens=12))
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.choices)
    first = out.choices[0]
    assert (out.token_ids, out.text, out.finish_reason) == (
        first.token_ids, first.text, first.finish_reason,
    )  # fmt: skip
    assert out.usage.prompt_tokens == len(PROMPT)
    assert out.usage.completion_tokens == 36
    assert out.usage.cached_tokens == 0  # choice 0 computed the prompt


async def test_one_choice_is_the_plain_output(engine: AsyncEngine) -> None:
    out = await engine.generate(PROMPT, SamplingParams(seed=5, max_tokens=6, logprobs=2))
    assert len(out.choices) == 1
    assert out.choices[0].token_ids == out.token_ids and out.choices[0].text == out.text
    assert out.choices[0].logprobs == out.logprobs


async def test_seeded_choices_differ_and_each_is_reproducible(engine: AsyncEngine) -> None:
    params = SamplingParams(n=2, seed=99, temperature=1.0, max_tokens=16)
    first = await engine.generate(PROMPT, params)
    again = await engine.generate(PROMPT, params)
    assert [c.token_ids for c in first.choices] == [c.token_ids for c in again.choices]
    assert first.choices[0].token_ids != first.choices[1].token_ids


async def test_choice_i_draws_what_a_single_request_with_its_derived_seed_draws(
    engine: AsyncEngine,
) -> None:
    """Sharing the prompt's KV changes nothing: each choice is exactly an ordinary request."""
    params = SamplingParams(n=3, seed=7, temperature=0.9, max_tokens=16, logprobs=1)
    out = await engine.generate(PROMPT, params)
    engine.reset_prefix_cache()
    for choice in out.choices:
        single = SamplingParams(seed=choice_seed(7, choice.index), temperature=0.9,
                                max_tokens=16, logprobs=1)  # fmt: skip
        alone = await engine.generate(PROMPT, single)
        assert choice.token_ids == alone.token_ids
        assert choice.logprobs is not None and alone.logprobs is not None
        assert [lp.logprob for lp in choice.logprobs] == pytest.approx(
            [lp.logprob for lp in alone.logprobs], abs=1e-5
        )
    assert choice_seed(7, 0) == 7


async def test_greedy_choices_are_all_the_transformers_output(
    engine: AsyncEngine, random_reference: Qwen3ForCausalLM
) -> None:
    out = await engine.generate(PROMPT, SamplingParams(n=4, temperature=0, max_tokens=20))
    want = reference_greedy(random_reference, PROMPT, 20, stop_at_eos=False)
    assert [c.token_ids for c in out.choices] == [want] * 4


# ---- KV sharing ------------------------------------------------------------------------------


async def test_choices_share_the_prompts_full_blocks_through_the_prefix_cache(
    engine: AsyncEngine,
) -> None:
    await engine.generate(PROMPT, SamplingParams(n=4, seed=1, max_tokens=8))
    stats = await idle_stats(engine)
    assert stats.prefix_cache_hit_tokens >= 3 * FULL_BLOCK_TOKENS


async def test_choices_share_the_prompt_even_when_choice_0_ends_at_its_first_token(
    engine: AsyncEngine,
) -> None:
    out = await engine.generate(PROMPT, SamplingParams(n=3, seed=1, max_tokens=1))
    stats = await idle_stats(engine)
    assert stats.prefix_cache_hit_tokens >= 2 * FULL_BLOCK_TOKENS
    assert all(len(c.token_ids) == 1 for c in out.choices)


async def test_without_prefix_caching_every_choice_computes_the_prompt(
    random_model_dir: Path,
) -> None:
    params = SamplingParams(n=3, seed=3, max_tokens=10)
    async with engine_for(random_model_dir, enable_prefix_caching=False) as engine:
        out = await engine.generate(PROMPT, params)
        stats = await idle_stats(engine)
    async with engine_for(random_model_dir) as engine:
        shared = await engine.generate(PROMPT, params)
    assert stats.prefix_cache_hit_tokens == 0
    assert [c.token_ids for c in out.choices] == [c.token_ids for c in shared.choices]


# ---- streaming -------------------------------------------------------------------------------


async def test_one_stream_yields_every_choice_tagged_and_interleaved(engine: AsyncEngine) -> None:
    params = SamplingParams(n=3, seed=11, max_tokens=10)
    async with engine.stream(PROMPT, params) as stream:
        tokens = [t async for t in stream]
        out = stream.output()
    for choice in range(3):
        mine = [t for t in tokens if t.choice == choice]
        assert [t.index for t in mine] == list(range(10))
        assert [t.token_id for t in mine] == out.choices[choice].token_ids
        assert "".join(t.text for t in mine) == out.choices[choice].text
        assert [t.finish_reason for t in mine] == [None] * 9 + ["length"]
    order = [t.choice for t in tokens]
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)  # not choice after choice


async def test_chunks_carry_the_tokens_of_every_choice(engine: AsyncEngine) -> None:
    params = SamplingParams(n=2, seed=4, max_tokens=8)
    async with engine.stream(PROMPT, params) as stream:
        chunks = [chunk async for chunk in stream.chunks()]
        out = stream.output()
    tokens: list[StreamToken] = [t for chunk in chunks for t in chunk]
    for choice in range(2):
        ids = [t.token_id for t in tokens if t.choice == choice]
        assert ids == out.choices[choice].token_ids


# ---- aborts ----------------------------------------------------------------------------------


async def test_closing_the_stream_aborts_every_choice_and_frees_their_blocks(
    engine: AsyncEngine,
) -> None:
    long = SamplingParams(n=4, seed=2, max_tokens=200)
    seen: set[int] = set()
    async with engine.stream(PROMPT, long) as stream:
        async for token in stream:
            seen.add(token.choice)
            if len(seen) == 4:  # every choice is running: leave now
                break
    out = stream.output()
    assert [c.finish_reason for c in out.choices] == ["abort"] * 4
    stats = await idle_stats(engine)
    assert (stats.running, stats.waiting) == (0, 0)
    assert all_blocks_unused(stats)


async def test_aborting_by_id_before_the_other_choices_start_frees_everything(
    engine: AsyncEngine,
) -> None:
    stream = engine.stream(PROMPT, SamplingParams(n=5, max_tokens=50), request_id="many")
    assert engine.stats().waiting == 5  # choice 0 queued, four held for its prompt
    engine.abort("many")
    assert [t async for t in stream] == []
    assert [c.finish_reason for c in stream.output().choices] == ["abort"] * 5
    stats = await idle_stats(engine)
    assert (stats.running, stats.waiting) == (0, 0)
    assert all_blocks_unused(stats)


async def test_a_failing_step_reaches_a_stream_of_choices(engine: AsyncEngine) -> None:
    stream = engine.stream(PROMPT, SamplingParams(n=3, max_tokens=100))
    runner = engine._core.runner
    assert runner is not None
    collect, calls = runner.collect, [0]

    def failing(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] >= 4:
            raise RuntimeError("injected failure")
        return collect(*args)

    runner.collect = failing  # type: ignore[method-assign]
    with anyio.fail_after(30), pytest.raises(errors.EngineError, match="injected failure"):
        async for _ in stream:
            pass


# ---- max_waiting_requests --------------------------------------------------------------------


async def test_a_full_waiting_queue_refuses_new_work_and_the_engine_keeps_serving(
    random_model_dir: Path,
) -> None:
    async with engine_for(random_model_dir, max_waiting_requests=2) as engine:
        queued = [engine.stream([i + 1, 2, 3], SamplingParams(max_tokens=5)) for i in range(2)]
        with pytest.raises(errors.EngineOverloadedError, match="max_waiting_requests=2"):
            engine.stream([9, 9], SamplingParams(max_tokens=5))
        assert engine.stats().num_rejected_overloaded == 1
        for stream in queued:
            assert len([t async for t in stream]) == 5
        out = await engine.generate([9, 9], SamplingParams(max_tokens=5))
        assert out.usage.completion_tokens == 5


async def test_each_waiting_choice_counts_toward_the_limit(random_model_dir: Path) -> None:
    async with engine_for(random_model_dir, max_waiting_requests=3) as engine:
        stream = engine.stream(PROMPT, SamplingParams(n=3, max_tokens=4))
        with pytest.raises(errors.EngineOverloadedError):
            engine.stream([1, 2], SamplingParams(max_tokens=4))
        assert len([t async for t in stream]) == 12


async def test_an_overloaded_generate_many_withdraws_what_it_submitted(
    random_model_dir: Path,
) -> None:
    async with engine_for(random_model_dir, max_waiting_requests=2) as engine:
        with pytest.raises(errors.EngineOverloadedError):
            await engine.generate_many([[1, 2], [3, 4], [5, 6]], SamplingParams(max_tokens=30))
        stats = await idle_stats(engine)
        assert (stats.running, stats.waiting, stats.generated_tokens_total) == (0, 0, 0)
        assert stats.num_rejected_overloaded == 1
        assert all_blocks_unused(stats)


def test_overloaded_is_an_engine_error_not_a_bad_request() -> None:
    assert issubclass(errors.EngineOverloadedError, errors.EngineError)
    assert not issubclass(errors.EngineOverloadedError, errors.InvalidRequestError)


async def test_an_overloaded_generate_many_withdraws_every_choice_it_submitted(
    random_model_dir: Path,
) -> None:
    async with engine_for(random_model_dir, max_waiting_requests=3) as engine:
        with pytest.raises(errors.EngineOverloadedError):  # 2 + 2 choices waiting, then full
            await engine.generate_many([PROMPT, PROMPT[1:], [5, 6]], SamplingParams(n=2))
        stats = await idle_stats(engine)
        assert (stats.running, stats.waiting, stats.generated_tokens_total) == (0, 0, 0)
        assert all_blocks_unused(stats)


# ---- one id, one reader, logs and shutdown for every choice ----------------------------------


async def test_a_second_reader_of_a_stream_of_choices_is_refused_and_the_first_reads_on(
    engine: AsyncEngine,
) -> None:
    stream = engine.stream(PROMPT, SamplingParams(n=3, seed=5, max_tokens=12))
    read: dict[str, list[StreamToken]] = {}
    refused: list[str] = []

    async def reader(name: str) -> None:
        read[name] = []
        try:
            async for token in stream:
                read[name].append(token)
        except errors.StreamInUseError:
            refused.append(name)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(reader, "first")
            group.start_soon(reader, "second")
    assert len(refused) == 1
    tokens = read["first"] + read["second"]
    out = stream.output()
    for choice in range(3):  # every token of every choice, each read once
        mine = sorted((t for t in tokens if t.choice == choice), key=lambda t: t.index)
        assert [t.token_id for t in mine] == out.choices[choice].token_ids


async def test_a_request_id_stays_in_flight_until_its_last_choice_ends(
    engine: AsyncEngine,
) -> None:
    # Choice 0 ends at its first token; the others only start from its cached prompt then.
    stream = engine.stream(PROMPT, SamplingParams(n=3, max_tokens=1), request_id="trio")
    async for token in stream:
        if token.choice == 0:
            assert token.finish_reason == "length"
            with pytest.raises(errors.DuplicateRequestIdError, match="'trio'"):
                engine.stream([1, 2], request_id="trio")
    assert len(stream.output().choices) == 3
    again = await engine.generate([1, 2], SamplingParams(max_tokens=2), request_id="trio")
    assert again.usage.completion_tokens == 2  # free once every choice has ended


async def test_every_choice_logs_its_end_under_the_request_id(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncllm")
    await engine.generate(PROMPT, SamplingParams(n=3, max_tokens=4), request_id="logged")
    ends = [r for r in caplog.records if " finished " in r.getMessage()]
    assert sorted(r.getMessage().split(" finished ")[0] for r in ends) == [
        f"request logged choice {choice}" for choice in range(3)
    ]
    assert {getattr(r, "request_id", None) for r in ends} == {"logged"}


async def test_shutdown_aborts_every_choice_held_ones_included_and_frees_their_blocks(
    random_model_dir: Path,
) -> None:
    engine = engine_for(random_model_dir)
    async with engine:
        stream = engine.stream(PROMPT, SamplingParams(n=4, max_tokens=300))
        assert engine.stats().waiting == 4  # choice 0 queued, three held for its prompt
    assert [c.finish_reason for c in stream.output().choices] == ["abort"] * 4
    stats = engine.stats()
    assert (stats.running, stats.waiting) == (0, 0)
    assert all_blocks_unused(stats)


async def test_a_drained_shutdown_waits_for_every_choice(random_model_dir: Path) -> None:
    engine = engine_for(random_model_dir)
    await engine.start()
    stream = engine.stream(PROMPT, SamplingParams(n=3, max_tokens=6))
    with anyio.fail_after(30):
        await engine.shutdown(drain=True)
    out = stream.output()
    assert [c.finish_reason for c in out.choices] == ["length"] * 3
    assert out.usage.completion_tokens == 18


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", 129),
        ("n", 2.0),
        ("n", True),
        ("presence_penalty", 2.5),
        ("presence_penalty", float("nan")),
        ("frequency_penalty", -2.01),
        ("frequency_penalty", "1"),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
    ],
)
def test_invalid_n_and_penalties_are_rejected(field: str, value: Any) -> None:
    with pytest.raises(errors.InvalidRequestError, match=field):
        SamplingParams(**{field: value})


def test_extreme_valid_n_and_penalties_are_accepted() -> None:
    params = SamplingParams(n=128, presence_penalty=-2, frequency_penalty=2.0,
                            repetition_penalty=0.01)  # fmt: skip
    assert params.has_penalties and not SamplingParams().has_penalties


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_invalid_max_waiting_requests_is_rejected(value: Any) -> None:
    with pytest.raises(errors.ConfigError, match="max_waiting_requests"):
        EngineConfig(max_waiting_requests=value)
