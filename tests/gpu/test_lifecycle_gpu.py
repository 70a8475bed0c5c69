"""Stopping on a GPU: a shutdown cut short by a cancel scope, with steps (CUDA-graph replays)
still in flight, gives the model's and the KV pool's device memory back, on asyncio and trio."""

from __future__ import annotations

import gc
import importlib.util
import threading
from pathlib import Path

import anyio
import pytest
import torch

from asyncllm import AsyncEngine, SamplingParams
from tests.models import write_random_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPE = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("gpu-lifecycle-model")
    write_random_model(directory, seed=4, **SHAPE)
    return directory


async def cancel_while_serving(engine: AsyncEngine, held: dict[str, int]) -> None:
    with anyio.CancelScope() as scope:
        async with engine:
            runner = engine._core.runner
            assert runner is not None and runner.graphs is not None  # replays are in play
            held["kv_pool"] = runner.kv_cache.nbytes
            params = SamplingParams(max_tokens=500, ignore_eos=True)
            streams = [engine.stream([i % 2000 + 1] * 40, params) for i in range(48)]
            for _ in range(20):
                await streams[0].__anext__()  # decode steps are launched back to back
            held["while_serving"] = torch.cuda.memory_allocated()
            scope.cancel()
            await anyio.sleep_forever()
    assert {s.output().finish_reason for s in streams} == {"abort"}


@pytest.mark.parametrize(
    "backend",
    [
        "asyncio",
        pytest.param(
            "trio",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("trio") is None, reason="trio is not installed"
            ),
        ),
    ],
)
def test_a_cancelled_shutdown_gives_the_device_memory_back(model_dir: Path, backend: str) -> None:
    engine = AsyncEngine.from_pretrained(
        str(model_dir), device="cuda", num_kv_blocks=2048, max_num_seqs=64
    )
    held: dict[str, int] = {}
    anyio.run(cancel_while_serving, engine, held, backend=backend)
    gc.collect()
    torch.cuda.synchronize()
    assert engine._core.runner is None
    assert not [t for t in threading.enumerate() if t.name.startswith("asyncllm-worker")]
    freed = held["while_serving"] - torch.cuda.memory_allocated()
    assert freed >= held["kv_pool"], (freed, held)
