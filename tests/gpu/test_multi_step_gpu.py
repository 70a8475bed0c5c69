"""Multi-step decode on a GPU: a run replays the decode CUDA graph once per step, feeding each
step's tokens to the next on the device; outputs stay those of single steps (float32)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from asyncllm import AsyncEngine, SamplingParams
from tests.gpu.test_engine_gpu import GPU_SHAPE, prompts_of
from tests.models import all_blocks_unused, load_reference, reference_greedy, write_random_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RUN = 4
# Crowded, chunked, prefix-sharing and preempted (as test_engine_gpu's float32 parity).
TIGHT = dict(device="cuda", dtype="float32", num_kv_blocks=48, block_size=16,
             max_num_batched_tokens=256, max_model_len=256, max_num_seqs=64)  # fmt: skip


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("gpu-model-multi-step")
    write_random_model(directory, seed=3, **GPU_SHAPE)
    return directory


@contextmanager
def graph_replays(engine: AsyncEngine) -> Iterator[list[int]]:
    """The batch size of every decode-graph replay meanwhile (one per step of a run)."""
    runner = engine._core.runner
    assert runner is not None and runner.graphs is not None
    graphs, replays = runner.graphs, []
    replay = graphs.replay

    def counting(ctx: Any, input_ids: torch.Tensor) -> torch.Tensor:
        replays.append(ctx.num_seqs)
        return replay(ctx, input_ids)

    graphs.replay = counting  # type: ignore[method-assign]
    try:
        yield replays
    finally:
        del graphs.replay


async def outputs(model_dir: Path, prompts: list[list[int]], params: SamplingParams,
                  **overrides: Any) -> tuple[list[list[int]], int, int]:  # fmt: skip
    """Token ids of every prompt, the steps run, and the steps scheduled (launches)."""
    async with AsyncEngine.from_pretrained(str(model_dir), **(TIGHT | overrides)) as engine:
        launches = 0
        schedule = engine._core.schedule

        def counting() -> Any:
            nonlocal launches
            step = schedule()
            launches += step is not None
            return step

        engine._core.schedule = counting  # type: ignore[method-assign]
        graphed = engine._core.runner is not None and engine._core.runner.graphs is not None
        if graphed:
            with graph_replays(engine) as replays:
                outs = await engine.generate_many(prompts, params)
            assert replays  # decode steps went through the graphs
        else:
            outs = await engine.generate_many(prompts, params)
        with anyio.fail_after(30):
            await engine.idle()
        stats = engine.stats()
        assert all_blocks_unused(stats)
    return [o.token_ids for o in outs], stats.num_steps, launches


@pytest.mark.parametrize("overlap", [True, False])
async def test_runs_with_cuda_graphs_give_single_step_greedy_outputs(
    gpu_model_dir: Path, overlap: bool
) -> None:
    shared = prompts_of(1, 2048, seed=5, max_len=80)[0]
    prompts = [shared + p for p in prompts_of(24, 2048, seed=6, max_len=120)]
    greedy = SamplingParams(temperature=0, max_tokens=40)
    single, _, _ = await outputs(gpu_model_dir, prompts, greedy, overlap_scheduling=overlap)
    multi, steps, launches = await outputs(
        gpu_model_dir, prompts, greedy, overlap_scheduling=overlap, num_decode_steps=RUN
    )
    assert launches < steps  # some launches ran several steps
    assert multi == single
    reference = load_reference(gpu_model_dir).cuda()
    assert multi == [reference_greedy(reference, p, 40, stop_at_eos=False) for p in prompts]


async def test_runs_with_cuda_graphs_draw_the_seeded_tokens_of_single_steps(
    gpu_model_dir: Path,
) -> None:
    prompts = prompts_of(32, 2048, seed=9, max_len=100)
    params = SamplingParams(temperature=0.8, max_tokens=37, seed=11, logprobs=2)
    roomy = dict(num_kv_blocks=1024, max_model_len=512)
    single, _, _ = await outputs(gpu_model_dir, prompts, params, **roomy)
    multi, steps, launches = await outputs(gpu_model_dir, prompts, params, num_decode_steps=RUN,
                                           **roomy)  # fmt: skip
    assert launches < steps
    assert multi == single


async def test_eager_runs_on_the_gpu_give_single_step_greedy_outputs(gpu_model_dir: Path) -> None:
    prompts = prompts_of(16, 2048, seed=12, max_len=150)
    greedy = SamplingParams(temperature=0, max_tokens=30)
    single, _, _ = await outputs(gpu_model_dir, prompts, greedy, enforce_eager=True)
    multi, steps, launches = await outputs(gpu_model_dir, prompts, greedy, enforce_eager=True,
                                           num_decode_steps=RUN)  # fmt: skip
    assert launches < steps
    assert multi == single
