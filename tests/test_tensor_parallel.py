"""Tensor parallelism on the CPU: two ranks over gloo behave exactly as one.

Greedy outputs are token-identical to transformers (float32) on Qwen3 shapes whose KV heads
split across ranks and whose one KV head is replicated, with tied and untied embeddings,
through crowded batches, prefix-cache hits, chunked prefill and preemption; cancellation
frees blocks; two engines run side by side; a dead or hung worker fails every stream and
shutdown leaves no process or port behind.

Worker processes are slow to start on a small machine, so the parity engines are shared by
the module (each test checks only what it did itself).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import pytest_asyncio
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Qwen3ForCausalLM

from asyncllm import LLM, AsyncEngine, EngineStats, SamplingParams, errors
from asyncllm.engine.inputs import SampleSpec, SeqStep, StepBatch, device_step, pack_step
from asyncllm.engine.step_channel import FRAME_BYTES, decode_step, encode_step
from asyncllm.kernels import create_attention_backend
from asyncllm.model.config import ModelConfig
from asyncllm.model.loader import load_model
from asyncllm.parallel import TPGroup
from tests.models import (
    all_blocks_unused,
    load_reference,
    random_prompts,
    reference_greedy,
    write_random_model,
)

# Tests that use the shared engines run in the module's event loop, where they were started.
shared_loop = pytest.mark.asyncio(loop_scope="module")

TP_CONFIGS: dict[str, dict[str, Any]] = {
    # 2 KV heads: one per rank.
    "gqa-tied": dict(
        vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
    ),
    # 1 KV head for 2 ranks: replicated on both.
    "mqa-untied": dict(
        vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
    ),
}  # fmt: skip
NAMES = sorted(TP_CONFIGS)

# A pool of 30 blocks of 16 tokens, 32-token steps: crowds preempt and long prompts chunk.
# Overlapped scheduling: every step's pending tokens come from the device, on both ranks.
# Multi-step decode: once a crowd settles, steps run three decode steps each, on both ranks.
TIGHT = dict(
    device="cpu", dtype="float32", tensor_parallel_size=2, num_kv_blocks=30, block_size=16,
    max_model_len=200, max_num_batched_tokens=32, max_num_seqs=16, overlap_scheduling=True,
    num_decode_steps=3,
)  # fmt: skip
GREEDY = SamplingParams(temperature=0, max_tokens=32)


@pytest.fixture(scope="module")
def tp_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for name, settings in TP_CONFIGS.items():
        dirs[name] = tmp_path_factory.mktemp(f"tp-{name}")
        write_random_model(dirs[name], seed=4, **settings)
    return dirs


@pytest.fixture(scope="module")
def references(tp_models: dict[str, Path]) -> dict[str, Qwen3ForCausalLM]:
    return {name: load_reference(path) for name, path in tp_models.items()}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(tp_models: dict[str, Path]) -> AsyncIterator[dict[str, AsyncEngine]]:
    """One TP=2 engine per shape, started together in this process."""
    started = {name: AsyncEngine.from_pretrained(str(path), **TIGHT)
               for name, path in tp_models.items()}  # fmt: skip
    async with anyio.create_task_group() as group:
        for engine in started.values():
            group.start_soon(engine.start)
    yield started
    for engine in started.values():
        await engine.shutdown()


def expected(reference: Qwen3ForCausalLM, prompts: list[list[int]], max_tokens: int = 32
             ) -> list[list[int]]:  # fmt: skip
    return [reference_greedy(reference, p, max_tokens, stop_at_eos=False) for p in prompts]


async def until_idle(engine: AsyncEngine) -> EngineStats:
    with anyio.fail_after(30):
        await engine.idle()
    return engine.stats()


# ---- greedy parity ---------------------------------------------------------------------------


@shared_loop
@pytest.mark.parametrize("name", NAMES)
async def test_crowded_batch_with_preemption_matches_transformers(
    name: str, engines: dict[str, AsyncEngine], references: dict[str, Qwen3ForCausalLM]
) -> None:
    engine, vocab = engines[name], TP_CONFIGS[name]["vocab_size"]
    rng = random.Random(11)
    prompts = random_prompts([rng.randint(1, 90) for _ in range(14)], vocab, seed=12)
    delays = [rng.uniform(0, 0.05) for _ in prompts]
    outputs: list[list[int] | None] = [None] * len(prompts)
    before = engine.stats().num_preemptions

    async def client(index: int) -> None:
        await anyio.sleep(delays[index])  # arrival time, not synchronisation
        outputs[index] = (await engine.generate(prompts[index], GREEDY)).token_ids

    schedule, runs = engine._core.schedule, []

    def recording() -> Any:
        step = schedule()
        runs.append(step is not None and step.num_steps > 1)
        return step

    engine._core.schedule = recording  # type: ignore[method-assign]
    try:
        async with anyio.create_task_group() as group:
            for index in range(len(prompts)):
                group.start_soon(client, index)
    finally:
        del engine._core.schedule
    assert engine.stats().num_preemptions > before  # 30 blocks cannot hold this crowd
    assert any(runs)  # and multi-step decode runs on both ranks
    assert outputs == expected(references[name], prompts)


@shared_loop
@pytest.mark.parametrize("name", NAMES)
async def test_prefix_cache_hits_give_identical_outputs(
    name: str, engines: dict[str, AsyncEngine], references: dict[str, Qwen3ForCausalLM]
) -> None:
    engine, vocab = engines[name], TP_CONFIGS[name]["vocab_size"]
    shared = random_prompts([40], vocab, seed=13)[0]
    prompts = random_prompts([5, 17, 1], vocab, seed=14, prefix=shared)
    first = await engine.generate(prompts[0], GREEDY)
    rest = await engine.generate_many(prompts[1:], GREEDY)
    assert all(out.usage.cached_tokens >= 32 for out in rest)  # the 2 full shared blocks
    assert [o.token_ids for o in (first, *rest)] == expected(references[name], prompts)


@shared_loop
@pytest.mark.parametrize("name", NAMES)
async def test_chunked_prefill_matches_transformers(
    name: str, engines: dict[str, AsyncEngine], references: dict[str, Qwen3ForCausalLM]
) -> None:
    engine, vocab = engines[name], TP_CONFIGS[name]["vocab_size"]
    prompts = random_prompts([150, 97], vocab, seed=15)
    steps_before = engine.stats().num_steps
    outs = await engine.generate_many(prompts, GREEDY)
    assert engine.stats().num_steps - steps_before >= (150 + 97) // 32  # chunks of <= 32
    assert [o.token_ids for o in outs] == expected(references[name], prompts)


@shared_loop
async def test_two_engines_serve_side_by_side_in_one_process(
    engines: dict[str, AsyncEngine], references: dict[str, Qwen3ForCausalLM]
) -> None:
    prompts = {name: random_prompts([23, 9, 41], TP_CONFIGS[name]["vocab_size"], seed=16)
               for name in NAMES}  # fmt: skip
    outputs: dict[str, list[list[int]]] = {}

    async def run(name: str) -> None:
        outs = await engines[name].generate_many(prompts[name], GREEDY)
        outputs[name] = [o.token_ids for o in outs]

    async with anyio.create_task_group() as group:
        for name in NAMES:
            group.start_soon(run, name)
    for name in NAMES:
        assert outputs[name] == expected(references[name], prompts[name])
    pools = [engines[name]._core.runner.workers for name in NAMES]  # type: ignore[union-attr]
    assert pools[0] is not None and pools[1] is not None
    assert pools[0]._store.port != pools[1]._store.port  # each engine met at its own port
    assert set(pools[0].pids).isdisjoint(pools[1].pids)


async def test_a_float8_cache_gives_two_ranks_the_tokens_of_one(tp_models: dict[str, Path]) -> None:
    """kv_cache_dtype "fp8" under tensor parallelism: each rank stores its KV heads in
    float8, and a crowded, preempting, multi-step run gives the greedy tokens of one rank
    with the same float8 cache."""
    path, vocab = tp_models["gqa-tied"], TP_CONFIGS["gqa-tied"]["vocab_size"]
    prompts = random_prompts([60, 7, 88, 31, 45, 12, 70, 19], vocab, seed=21)
    outputs = {}
    for size in (1, 2):
        settings = TIGHT | dict(tensor_parallel_size=size, kv_cache_dtype="fp8")
        async with AsyncEngine.from_pretrained(str(path), **settings) as engine:
            outputs[size] = [o.token_ids for o in await engine.generate_many(prompts, GREEDY)]
            stats = engine.stats()
        assert stats.num_preemptions > 0
    assert outputs[2] == outputs[1]


# ---- cancellation ----------------------------------------------------------------------------


@shared_loop
async def test_breaking_out_of_a_stream_frees_its_blocks(engines: dict[str, AsyncEngine]) -> None:
    engine = engines["gqa-tied"]
    received = 0
    async for _ in engine.stream([1, 2, 3], SamplingParams(max_tokens=150, ignore_eos=True)):
        received += 1
        if received == 3:
            break
    assert all_blocks_unused(await until_idle(engine))


@shared_loop
async def test_abort_frees_blocks_of_running_requests(engines: dict[str, AsyncEngine]) -> None:
    engine = engines["mqa-untied"]
    params = SamplingParams(max_tokens=150, ignore_eos=True)
    streams = [engine.stream(prompt, params) for prompt in ([4, 5], [6] * 40, [7, 8, 9])]
    await streams[0].__anext__()
    for stream in streams:
        engine.abort(stream.request_id)
    assert [s.output().finish_reason for s in streams] == ["abort"] * 3
    assert all_blocks_unused(await until_idle(engine))
    out = await engine.generate([4, 5], SamplingParams(max_tokens=4))  # still serving
    assert out.usage.completion_tokens == 4


@shared_loop
@pytest.mark.parametrize("name", NAMES)
async def test_penalised_greedy_choices_match_transformers(
    name: str, engines: dict[str, AsyncEngine], references: dict[str, Qwen3ForCausalLM]
) -> None:
    """Penalty values and token lists cross to the workers with each step; the choices of a
    request share the prompt's blocks on every rank."""
    engine, vocab = engines[name], TP_CONFIGS[name]["vocab_size"]
    prompts = random_prompts([9, 40], vocab, seed=13)
    params = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.5, n=2)
    outs = await engine.generate_many(prompts, params)
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            want = references[name].generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                repetition_penalty=1.5, eos_token_id=None, pad_token_id=0,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )[0, len(prompt) :].tolist()  # fmt: skip
        assert [choice.token_ids for choice in out.choices] == [want, want]
    assert all_blocks_unused(await until_idle(engine))


# ---- failures and shutdown -------------------------------------------------------------------


def listening_ports() -> set[int]:
    return {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.status == "LISTEN"}


def child_processes() -> set[int]:
    """This process's descendants (the module's shared engines' workers among them)."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


async def test_a_killed_worker_fails_every_stream_then_the_engine_refuses_work(
    tp_models: dict[str, Path],
) -> None:
    ports_before, children_before = listening_ports(), child_processes()
    engine = AsyncEngine.from_pretrained(str(tp_models["gqa-tied"]), **TIGHT)
    async with engine:
        pool = engine._core.runner.workers  # type: ignore[union-attr]
        assert pool is not None and len(pool.pids) == 1
        params = SamplingParams(max_tokens=150, ignore_eos=True)
        streams = [engine.stream([3, 4, i], params) for i in range(4)]
        await streams[0].__anext__()  # every request is running
        os.kill(pool.pids[0], signal.SIGKILL)
        for stream in streams:
            with anyio.fail_after(30), pytest.raises(errors.EngineError, match=r"rank 1 .*died"):
                async for _ in stream:
                    pass
        with pytest.raises(errors.EngineDeadError):
            engine.stream([1, 2])
    assert child_processes() <= children_before
    assert listening_ports() <= ports_before


async def test_a_hung_worker_fails_the_step_after_the_timeout(
    tp_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNCLLM_TP_TIMEOUT_S", "4")
    children_before = child_processes()
    engine = AsyncEngine.from_pretrained(str(tp_models["mqa-untied"]), **TIGHT)
    async with engine:
        pool = engine._core.runner.workers  # type: ignore[union-attr]
        assert pool is not None
        await engine.generate([1, 2, 3], SamplingParams(max_tokens=2))
        os.kill(pool.pids[0], signal.SIGSTOP)
        with anyio.fail_after(30), pytest.raises(errors.EngineError):
            await engine.generate([5, 6, 7], SamplingParams(max_tokens=20))
    assert child_processes() <= children_before  # the stopped worker was killed


def test_llm_runs_tensor_parallel_and_shutdown_leaves_nothing_behind(
    tp_models: dict[str, Path], references: dict[str, Qwen3ForCausalLM]
) -> None:
    ports_before, children_before = listening_ports(), child_processes()
    prompts = random_prompts([12, 30], TP_CONFIGS["gqa-tied"]["vocab_size"], seed=17)
    with LLM(str(tp_models["gqa-tied"]), **TIGHT) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert len(child_processes() - children_before) == 1
    assert [o.token_ids for o in outs] == expected(references["gqa-tied"], prompts)
    assert child_processes() <= children_before
    assert listening_ports() <= ports_before


@pytest.mark.slow
@shared_loop
async def test_torchrun_runs_generate_on_every_rank(
    tp_models: dict[str, Path], engines: dict[str, AsyncEngine]
) -> None:
    """`asyncllm generate` under torchrun: rank 0 prints, rank 1 serves steps and exits."""
    command = ["generate", "Once", "--model", str(tp_models["gqa-tied"]), "--device", "cpu",
               "--max-tokens", "12", "--tensor-parallel-size", "2"]  # fmt: skip
    launched = await anyio.run_process(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "asyncllm", *command],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr.decode()[-2000:]
    # The same greedy text as an engine in this process, printed once (by rank 0).
    same = await engines["gqa-tied"].generate("Once", SamplingParams(temperature=0, max_tokens=12))
    assert launched.stdout.decode() == f"Once{same.text}\n"


def test_a_bad_checkpoint_raises_its_typed_error_and_leaves_no_worker(
    tp_models: dict[str, Path], tmp_path: Path
) -> None:
    """Every rank reads the checkpoint; rank 0 raises the loader's own error."""
    broken = tmp_path / "broken"
    shutil.copytree(tp_models["gqa-tied"], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    children_before = child_processes()
    with pytest.raises(errors.ModelLoadError, match=r"missing tensors: .*down_proj"):
        LLM(str(broken), **TIGHT)
    assert child_processes() <= children_before


# ---- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_attention_heads=6, num_key_value_heads=2), "num_attention_heads 6 is not"),
        (dict(vocab_size=322), "vocab_size 322 is not"),
        (dict(intermediate_size=162), "intermediate_size 162 is not"),
        (dict(num_attention_heads=12, num_key_value_heads=6), "num_key_value_heads 6 and"),
    ],
)  # fmt: skip
def test_a_model_that_does_not_split_evenly_is_a_config_error(
    tmp_path: Path, overrides: dict[str, int], message: str
) -> None:
    config = {"architectures": ["Qwen3ForCausalLM"], "max_position_embeddings": 256,
              **TP_CONFIGS["gqa-tied"], **overrides}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(errors.ConfigError, match=f"{message} .*tensor_parallel_size 4"):
        AsyncEngine.from_pretrained(str(tmp_path), device="cpu", tensor_parallel_size=4)


# ---- pieces ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_loads_only_its_slices(name: str, tp_models: dict[str, Path]) -> None:
    """Rank 1 of 2: query heads, KV heads (split, or the single one replicated), o_proj and
    down_proj columns, and vocabulary rows are the matching slices of the checkpoint."""
    path, cfg = tp_models[name], TP_CONFIGS[name]
    rank1 = TPGroup(rank=1, world_size=2)  # building and loading call no collective
    model: Any = load_model(path, ModelConfig.from_dir(path), torch.device("cpu"),
                            torch.float32, rank1)  # fmt: skip
    heads, kv, dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q_rows, kv_heads = heads // 2 * dim, max(1, kv // 2)
    kv_first = (kv_heads if kv >= 2 else 0) * dim  # rank 1's first KV row (replicated: 0)
    layer = model.model.layers[0]
    qkv = layer.self_attn.qkv_proj.weight
    with safe_open(str(path / "model.safetensors"), "pt") as stored:

        def get(name: str) -> torch.Tensor:
            return stored.get_tensor(f"model.layers.0.{name}.weight")

        assert torch.equal(qkv[:q_rows], get("self_attn.q_proj")[q_rows:])
        k_rows = slice(kv_first, kv_first + kv_heads * dim)
        assert torch.equal(qkv[q_rows : q_rows + kv_heads * dim], get("self_attn.k_proj")[k_rows])
        assert torch.equal(qkv[q_rows + kv_heads * dim :], get("self_attn.v_proj")[k_rows])
        o_cols = heads // 2 * dim
        assert torch.equal(layer.self_attn.o_proj.weight, get("self_attn.o_proj")[:, o_cols:])
        inter = cfg["intermediate_size"] // 2
        assert torch.equal(layer.mlp.down_proj.weight, get("mlp.down_proj")[:, inter:])
        assert torch.equal(layer.mlp.gate_up_proj.weight[inter:], get("mlp.up_proj")[inter:])
        vocab = cfg["vocab_size"] // 2
        embed = stored.get_tensor("model.embed_tokens.weight")
        assert torch.equal(model.model.embed_tokens.weight, embed[vocab:])
        head = embed if cfg["tie_word_embeddings"] else stored.get_tensor("lm_head.weight")
        assert torch.equal(model.lm_head.weight, head[vocab:])


@pytest.mark.parametrize("num_seqs", [1, 300])
def test_a_step_crosses_to_the_workers_unchanged(num_seqs: int) -> None:
    """What rank 0 sends decodes to the same arrays and scalars (large steps overflow the
    first frame into a second message)."""
    batch = StepBatch()
    for i in range(num_seqs):
        params = SamplingParams(temperature=0.5 * (i % 3), top_p=0.9, logprobs=2 if i else None)
        sample = SampleSpec(params, seed=i, offset=3, banned_token_ids=(7,) if i % 2 else ())
        step = SeqStep([5, 6, i][: 1 + i % 3], i % 20, [i, i + 1], sample, i % 2 or None)
        batch.add(step.token_ids, step.start, step.block_table, step.pending_row, step.sample)
    host = pack_step(batch, block_size=16)
    header, payload = encode_step(host)
    assert (payload.nbytes > FRAME_BYTES) == (num_seqs > 1)
    back = decode_step(header, payload.copy())
    assert back.meta == host.meta
    assert back.int_sizes == host.int_sizes and back.int32_sizes == host.int32_sizes
    for name in ("ints", "int32s", "floats"):
        assert (getattr(back, name) == getattr(host, name)).all(), name


def test_a_decode_run_crosses_to_the_workers_with_its_length() -> None:
    batch = StepBatch(num_steps=5)
    for i in range(3):
        batch.add([], 10 + i, [i], i, SampleSpec(SamplingParams(temperature=0), seed=i, offset=2))
    host = pack_step(batch, block_size=16)
    back = decode_step(*encode_step(host))
    assert back.meta == host.meta and back.meta.num_steps == 5
    backend = create_attention_backend("torch", torch.device("cpu"), 16, 16, torch.float32)
    assert device_step(back, torch.device("cpu"), backend).num_steps == 5


def test_a_penalised_step_crosses_to_the_workers_with_its_penalties() -> None:
    batch = StepBatch()
    for i in range(5):  # rows 1 and 3 are penalised, and their newest output is pending
        params = SamplingParams(temperature=0.7, presence_penalty=0.5 * (i % 2),
                                repetition_penalty=1.25 if i == 3 else 1.0)  # fmt: skip
        sample = SampleSpec(params, seed=i, offset=3, output_token_ids=[4, 5, i],
                            prompt_token_ids=[1, 2, 3])  # fmt: skip
        batch.add([7, 8][: 1 + i % 3], 10 + i, [i], i if i % 2 else None, sample)
    host = pack_step(batch, block_size=16)
    header, payload = encode_step(host)
    back = decode_step(header, payload.copy())
    assert back.int_sizes == host.int_sizes
    for name in ("ints", "int32s", "floats"):
        assert (getattr(back, name) == getattr(host, name)).all(), name
    backend = create_attention_backend("torch", torch.device("cpu"), 16, 16, torch.float32)
    sent = device_step(host, torch.device("cpu"), backend).sampling
    received = device_step(back, torch.device("cpu"), backend).sampling
    assert sent.penalties is not None and received.penalties is not None
    for field in sent.penalties._fields:
        assert torch.equal(getattr(sent.penalties, field), getattr(received.penalties, field))
    assert received.penalties.presence.tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]
    assert received.penalties.repetition.tolist() == [1.0, 1.0, 1.0, 1.25, 1.0]
    assert received.penalties.pending_src.tolist() == [1, 3]
    floats = [sent.temperatures, sent.top_p, sent.min_p, *sent.penalties[:3]]
    assert all(len(row) == 5 and row.data_ptr() % 16 == 0 for row in floats)  # Triton aligns
