"""Multi-step decode (`num_decode_steps` > 1) changes how often the host runs, never what
comes out: greedy outputs stay token-identical to transformers, and every request (sampled,
seeded, with logprobs, stop rules, n > 1, penalties) gets the tokens and text it gets one step
at a time, with runs really taken; a request that stops or is aborted mid-run drops the
tokens drawn after it and gives its blocks back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from transformers import Qwen3ForCausalLM

from asyncllm import AsyncEngine, RequestOutput, SamplingParams
from tests.models import all_blocks_unused, random_prompts, reference_greedy

RUN = 4
VOCAB = 384  # the random model's


def engine_for(model_dir: Path, **overrides: Any) -> AsyncEngine:
    settings: dict[str, Any] = dict(device="cpu", dtype="float32", num_kv_blocks=256,
                                    num_decode_steps=RUN, overlap_scheduling=True)  # fmt: skip
    settings.update(overrides)
    return AsyncEngine.from_pretrained(str(model_dir), **settings)


@contextmanager
def run_lengths(engine: AsyncEngine) -> Iterator[list[int]]:
    """The number of decode steps of every step the engine schedules meanwhile."""
    lengths: list[int] = []
    core = engine._core
    schedule = core.schedule

    def recording() -> Any:
        step = schedule()
        if step is not None:
            lengths.append(step.num_steps)
        return step

    core.schedule = recording  # type: ignore[method-assign]
    try:
        yield lengths
    finally:
        del core.schedule


async def outputs_with(
    model_dir: Path, num_decode_steps: int, prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams], **overrides: Any,
) -> tuple[list[RequestOutput], list[int]]:  # fmt: skip
    """Outputs of `prompts`, and the run lengths taken (the pool must end up unused)."""
    async with engine_for(model_dir, num_decode_steps=num_decode_steps, **overrides) as engine:
        with run_lengths(engine) as lengths:
            outs = await engine.generate_many(prompts, params)
        with anyio.fail_after(10):
            await engine.idle()
        assert all_blocks_unused(engine.stats())
    return outs, lengths


def choices(outs: list[RequestOutput]) -> list[list[tuple[list[int], str, str | None]]]:
    return [[(c.token_ids, c.text, c.finish_reason) for c in out.choices] for out in outs]


PROMPTS = random_prompts([5, 17, 9, 30, 12, 3], VOCAB, seed=21)
GREEDY_30 = SamplingParams(temperature=0, max_tokens=30)


# ---- greedy parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True])
async def test_runs_keep_greedy_outputs_identical_to_transformers(
    random_model_dir: Path, random_reference: Qwen3ForCausalLM, overlap: bool
) -> None:
    """Shared prefixes, chunked prefill and preemption around the runs, too."""
    shared = random_prompts([40], VOCAB, seed=6)[0]
    prompts = random_prompts([3, 60, 11, 90, 25, 7, 33, 52], VOCAB, seed=7, prefix=shared)
    greedy = SamplingParams(temperature=0, max_tokens=45)
    async with engine_for(
        random_model_dir, num_kv_blocks=30, block_size=16, max_model_len=200,
        max_num_batched_tokens=32, max_num_seqs=16, overlap_scheduling=overlap,
    ) as engine:  # fmt: skip
        with run_lengths(engine) as lengths:
            outs = await engine.generate_many(prompts, greedy)
        stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens > 0
    assert RUN in lengths
    expected = [reference_greedy(random_reference, p, 45, stop_at_eos=False) for p in prompts]
    assert [o.token_ids for o in outs] == expected


async def test_a_run_stops_at_the_token_limit(random_model_dir: Path) -> None:
    """Limits that are no multiple of the run length: runs shorten instead of overshooting."""
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (7, 10, 13, 2, 21, 5)]
    outs, lengths = await outputs_with(random_model_dir, RUN, PROMPTS, params)
    assert [len(o.token_ids) for o in outs] == [7, 10, 13, 2, 21, 5]
    assert all(o.finish_reason == "length" for o in outs)
    assert RUN in lengths and any(1 < n < RUN for n in lengths)


# ---- same outputs as single steps ------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.9, max_tokens=19, seed=3),
        SamplingParams(temperature=1.3, top_k=20, top_p=0.8, min_p=0.02, max_tokens=19, seed=4),
        SamplingParams(temperature=0.7, n=3, max_tokens=15, seed=5),
    ],
    ids=["seeded", "filtered", "n=3"],
)
async def test_seeded_sampling_draws_the_same_tokens_as_single_steps(
    random_model_dir: Path, params: SamplingParams
) -> None:
    single, _ = await outputs_with(random_model_dir, 1, PROMPTS, params)
    multi, lengths = await outputs_with(random_model_dir, RUN, PROMPTS, params)
    assert RUN in lengths
    assert choices(multi) == choices(single)


async def test_logprobs_are_those_of_single_steps(random_model_dir: Path) -> None:
    params = SamplingParams(temperature=0.8, max_tokens=14, seed=9, logprobs=3)
    single, _ = await outputs_with(random_model_dir, 1, PROMPTS, params)
    multi, lengths = await outputs_with(random_model_dir, RUN, PROMPTS, params)
    assert RUN in lengths
    assert choices(multi) == choices(single)
    for one, many in zip(single, multi):
        assert one.logprobs is not None and many.logprobs is not None
        assert len(many.logprobs) == len(one.logprobs) == 14
        for a, b in zip(one.logprobs, many.logprobs):
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)


async def test_min_tokens_shortens_runs_to_its_boundary(random_model_dir: Path) -> None:
    """Stop tokens are banned exactly until min_tokens, whatever the runs."""
    free, _ = await outputs_with(random_model_dir, 1, PROMPTS, GREEDY_30)
    params = [
        SamplingParams(temperature=0, max_tokens=30, min_tokens=7, stop_token_ids=[o.token_ids[1]])
        for o in free
    ]
    single, _ = await outputs_with(random_model_dir, 1, PROMPTS, params)
    multi, lengths = await outputs_with(random_model_dir, RUN, PROMPTS, params)
    assert any(1 < n < RUN for n in lengths)
    assert choices(multi) == choices(single)
    assert all(len(o.token_ids) >= 7 for o in multi)


async def test_penalised_requests_decode_step_by_step_with_the_same_outputs(
    random_model_dir: Path,
) -> None:
    params = SamplingParams(temperature=0.8, max_tokens=16, seed=2, presence_penalty=0.8,
                            repetition_penalty=1.3)  # fmt: skip
    single, _ = await outputs_with(random_model_dir, 1, PROMPTS, params)
    multi, lengths = await outputs_with(random_model_dir, RUN, PROMPTS, params)
    assert set(lengths) == {1}  # a run would not see its own tokens in the penalty counts
    assert choices(multi) == choices(single)


# ---- stopping mid-run ------------------------------------------------------------------------


async def test_a_stop_token_mid_run_drops_the_tokens_drawn_after_it(
    random_model_dir: Path,
) -> None:
    free, _ = await outputs_with(random_model_dir, RUN, PROMPTS, GREEDY_30)
    # Output 6 is drawn in the middle of the second run (the first token comes from prefill).
    params = [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[o.token_ids[6]])
              for o in free]  # fmt: skip
    outs, lengths = await outputs_with(random_model_dir, RUN, PROMPTS, params)
    assert RUN in lengths
    for out, full in zip(outs, free):
        stop = full.token_ids.index(full.token_ids[6])
        assert out.token_ids == full.token_ids[: stop + 1]
        assert out.finish_reason == "stop"


async def test_a_stop_string_mid_run_cuts_text_and_stream_exactly(
    random_model_dir: Path,
) -> None:
    async with engine_for(random_model_dir) as engine:
        [prompt] = PROMPTS[:1]
        full = await engine.generate(prompt, GREEDY_30)
        stop = full.text[10:13]
        stream = engine.stream(prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop]))
        pieces = [token.text async for token in stream]
        out = stream.output()
        await engine.idle()
        assert all_blocks_unused(engine.stats())
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)] == "".join(pieces)
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


async def test_an_abort_mid_run_frees_the_blocks_and_others_carry_on(
    random_model_dir: Path, random_reference: Qwen3ForCausalLM
) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=40)
    async with engine_for(random_model_dir) as engine:
        with run_lengths(engine) as lengths:
            survivor = engine.stream(PROMPTS[1], greedy)
            received = []
            async with engine.stream(PROMPTS[0], greedy) as doomed:
                async for token in doomed:
                    received.append(token)
                    if len(received) == 6:
                        break  # leaving the block aborts it, mid-run
            async for _ in survivor:
                pass
        with anyio.fail_after(10):
            await engine.idle()
        assert all_blocks_unused(engine.stats())
    assert RUN in lengths and len(received) == 6
    assert survivor.output().token_ids == reference_greedy(random_reference, PROMPTS[1], 40,
                                                      stop_at_eos=False)  # fmt: skip


async def test_streams_see_every_token_of_a_run_in_order(random_model_dir: Path) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=22)
    async with engine_for(random_model_dir) as engine:
        stream = engine.stream(PROMPTS[3], greedy)
        chunks = [chunk async for chunk in stream.chunks()]
        out = stream.output()
    tokens = [token for chunk in chunks for token in chunk]
    assert [t.token_id for t in tokens] == out.token_ids
    assert [t.index for t in tokens] == list(range(22))
    assert "".join(t.text for t in tokens) == out.text
    assert max(map(len, chunks)) >= RUN  # a run's tokens arrive together
