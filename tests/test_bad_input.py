"""Every bad input gets a typed error naming what was wrong, and the engine keeps serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from asyncllm import AsyncEngine, EngineConfig, SamplingParams, errors
from asyncllm.engine.memory import allocation_errors
from asyncllm.engine.runner import ModelRunner
from tests.models import write_random_model

NAN, INF = float("nan"), float("inf")

# Every SamplingParams field against each kind of mistake: out of range, beyond what the
# kernels' int32/int64 tensors hold, NaN/inf, a bool where a number belongs (or a number where
# a bool belongs), and the wrong type altogether.
BAD_SAMPLING_VALUES: list[tuple[str, Any]] = [
    *[("max_tokens", v) for v in (0, -1, 2**31, 2.5, True, "5", NAN)],
    *[("temperature", v) for v in (-0.5, NAN, INF, True, "0.5", None)],
    *[("top_k", v) for v in (-1, 2**31, 2**63, 1.0, True, "3")],
    *[("top_p", v) for v in (0.0, -0.1, 1.5, NAN, INF, True, "0.9")],
    *[("min_p", v) for v in (-0.1, 2.0, NAN, INF, True, "0.1")],
    *[("seed", v) for v in (-3, 2**64, 1.5, True, "7")],
    *[("stop", v) for v in ([""], [5], [None], 5, b"x", ["\ud800"])],
    *[("stop_token_ids", v) for v in ([-1], [2**31], [1.0], [True], ["3"], 5)],
    *[("ignore_eos", v) for v in ("false", 1, 0, None)],
    *[("min_tokens", v) for v in (-1, 2**31, 1.5, True)],
    *[("logprobs", v) for v in (-1, 21, 99, 2.0, True)],
]


@pytest.mark.parametrize(("field", "value"), BAD_SAMPLING_VALUES)
def test_invalid_sampling_values_are_rejected_naming_field_and_value(
    field: str, value: Any
) -> None:
    with pytest.raises(errors.InvalidRequestError, match=field) as caught:
        SamplingParams(**{field: value})
    culprit = value[0] if isinstance(value, list) else value  # a list names its bad item
    assert repr(culprit) in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**64 - 1),
        ("seed", 2**63),
        ("top_k", 2**31 - 1),
        ("max_tokens", 2**31 - 1),
        ("min_tokens", 2**31 - 1),
        ("stop_token_ids", (2**31 - 1,)),
        ("logprobs", 20),
        ("top_p", 1e-50),
        ("temperature", 1e-38),
        ("temperature", 1e300),
        ("min_p", 1e-300),
    ],
)
def test_extreme_but_valid_sampling_values_are_accepted(field: str, value: Any) -> None:
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_numpy_numbers_are_stored_as_plain_python_numbers() -> None:
    params = SamplingParams(
        seed=np.uint64(2**64 - 1), temperature=np.float32(0.5), top_k=np.int32(4),
        stop_token_ids=[np.int64(3)],
    )  # fmt: skip
    assert type(params.seed) is int and params.seed == 2**64 - 1
    assert type(params.temperature) is float and params.temperature == 0.5
    assert type(params.top_k) is int and params.stop_token_ids == (3,)
    assert type(params.stop_token_ids[0]) is int


def test_min_tokens_above_max_tokens_is_rejected() -> None:
    with pytest.raises(errors.InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=5)


# Every EngineConfig field against the same kinds of mistake.
BAD_ENGINE_VALUES: list[tuple[str, Any]] = [
    *[("model", v) for v in (5, "", b"dir")],
    *[("device", v) for v in ("tpu", "mps", "cuda:x", "cuda:-1", "CPU", -1, True, 1.5)],
    *[("device", torch.device(d)) for d in ("meta", "mps")],
    *[("dtype", v) for v in ("float8", ["float32"], torch.int8, 32, None)],
    *[("max_num_seqs", v) for v in (0, 2**31, 1.5, True, "8")],
    *[("max_num_batched_tokens", v) for v in (0, 2**31, True)],
    *[("max_model_len", v) for v in (0, 2**31, 1.5, True)],
    *[("block_size", v) for v in (0, 2**31, True, 16.0)],
    *[("num_kv_blocks", v) for v in (-4, 0, 2**31, True)],
    *[("gpu_memory_utilization", v) for v in (0, 1.5, NAN, INF, True, "0.9")],
    *[("kv_cache_bytes", v) for v in (0, 2**63, True, 1.5)],
    *[("enable_prefix_caching", v) for v in ("false", 1, None)],
    *[("attention_backend", v) for v in (5, None, "flash-attn", "FLASH_ATTN")],
    *[("enforce_eager", v) for v in ("true", 0)],
    *[("peer_all_reduce", v) for v in ("yes", 1)],
    *[("overlap_scheduling", v) for v in ("yes", 1)],
    *[("seed", v) for v in (-1, 2**64, 1.5, True)],
    *[("tensor_parallel_size", v) for v in (0, -2, 1.5, True, "2")],
    *[("num_decode_steps", v) for v in (0, -1, 65, 1.5, True, "4", None)],
]


@pytest.mark.parametrize(("field", "value"), BAD_ENGINE_VALUES)
def test_invalid_engine_config_values_are_rejected_naming_field_and_value(
    field: str, value: Any
) -> None:
    with pytest.raises(errors.ConfigError, match=field) as caught:
        EngineConfig().replace(**{field: value})
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block_size": 24}, "power of two"),
        ({"max_num_sqes": 4}, "did you mean 'max_num_seqs'"),
    ],
)
def test_invalid_engine_config_is_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.ConfigError, match=message):
        EngineConfig().replace(**overrides)


@pytest.mark.parametrize(
    ("field", "given", "stored"),
    [
        ("device", torch.device("cpu"), "cpu"),
        ("device", torch.device("cuda", 1), "cuda:1"),
        ("device", torch.device("cuda"), "cuda"),
        ("device", 0, "cuda:0"),
        ("device", None, "auto"),
        ("device", "cuda:01", "cuda:1"),
        ("dtype", torch.bfloat16, "bfloat16"),
        ("model", Path("/models/qwen"), "/models/qwen"),
        ("max_num_seqs", np.int64(8), 8),
        ("gpu_memory_utilization", np.float32(0.5), 0.5),
        ("seed", 2**64 - 1, 2**64 - 1),
        ("kv_cache_bytes", 2**63 - 1, 2**63 - 1),
    ],
)
def test_other_spellings_of_a_value_are_stored_in_the_documented_form(
    field: str, given: Any, stored: Any
) -> None:
    value = getattr(EngineConfig().replace(**{field: given}), field)
    assert value == stored and type(value) is type(stored)


def test_a_cuda_index_beyond_the_machine_names_the_device_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert EngineConfig(device="cuda:1").torch_device() == torch.device("cuda:1")
    with pytest.raises(errors.ConfigError, match=r"'cuda:9'.* 2 CUDA device"):
        EngineConfig(device="cuda:9").torch_device()
    with pytest.raises(errors.ConfigError, match=r"'cuda:2'"):
        EngineConfig(device=2).torch_device()


async def test_an_engine_runs_on_a_torch_device_object() -> None:
    async with AsyncEngine.from_pretrained(
        None, device=torch.device("cpu"), num_kv_blocks=16
    ) as engine:
        out = await engine.generate("Once upon a time", SamplingParams(max_tokens=3))
    assert engine.config.device == "cpu" and len(out.token_ids) == 3


def test_unknown_attention_backend_is_rejected(random_model_dir: Path) -> None:
    with pytest.raises(errors.ConfigError, match="magic"):
        AsyncEngine.from_pretrained(str(random_model_dir), device="cpu", attention_backend="magic")


async def test_bad_requests_fail_and_the_engine_keeps_serving(random_model_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", num_kv_blocks=8, block_size=16, max_model_len=100
    ) as engine:
        healthy = engine.stream([5, 6, 7], SamplingParams(max_tokens=20, temperature=0))
        bad_prompts: list[Any] = ["", [], [1, 2, 384], [1, -1], [1, "2"], [True], 42, b"bytes"]
        for prompt in bad_prompts:
            with pytest.raises(errors.InvalidRequestError):
                engine.stream(prompt)
        with pytest.raises(errors.PromptTooLongError, match="max_model_len"):
            engine.stream(list(range(100)))
        with pytest.raises(errors.PromptTooLongError, match="max_tokens"):
            engine.stream(list(range(50)), SamplingParams(max_tokens=60))
        with pytest.raises(errors.PromptTooLongError, match=r"min_tokens \(60\)"):
            engine.stream(list(range(50)), SamplingParams(min_tokens=60))
        with pytest.raises(errors.InvalidRequestError, match="stop_token_ids"):
            engine.stream([1], SamplingParams(stop_token_ids=[10_000]))
        with pytest.raises(errors.InvalidRequestError, match="SamplingParams"):
            engine.stream([1], {"temperature": 0})  # type: ignore[arg-type]
        with pytest.raises(errors.DuplicateRequestIdError, match="already in flight"):
            engine.stream([1], request_id=healthy.request_id)
        tokens = [t.token_id async for t in healthy]
        assert len(tokens) == 20
        assert (
            await engine.generate([9, 9], SamplingParams(max_tokens=3))
        ).usage.completion_tokens == 3


async def test_a_request_bigger_than_the_kv_pool_is_rejected(random_model_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", num_kv_blocks=4, block_size=16, max_model_len=64
    ) as engine:
        assert engine.stats().kv_blocks_total == 4
        with pytest.raises(errors.PromptTooLongError):
            engine.stream(list(range(70)))


def test_max_model_len_beyond_the_pool_is_a_config_error(random_model_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", num_kv_blocks=2, block_size=16, max_model_len=100
    )
    with pytest.raises(errors.ConfigError, match="KV pool"):
        engine._core.load()


async def test_using_an_engine_before_start_or_after_shutdown_fails_clearly(
    random_model_dir: Path,
) -> None:
    engine = AsyncEngine.from_pretrained(str(random_model_dir), device="cpu", num_kv_blocks=8)
    with pytest.raises(errors.EngineNotRunningError):
        engine.stream([1])
    async with engine:
        pass
    with pytest.raises(errors.EngineNotRunningError):
        engine.stream([1])


# ---- model files -----------------------------------------------------------------------------


@pytest.fixture
def model_copy(random_model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(random_model_dir, target)
    return target


def load(model_dir: Path) -> torch.nn.Module:
    """The model `model_dir` loads into (raises what loading raises)."""
    engine = AsyncEngine.from_pretrained(str(model_dir), device="cpu", num_kv_blocks=8)
    engine._core.load()
    assert engine._core.runner is not None
    return engine._core.runner.model


def edit_weights(model_dir: Path, edit: Any) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_model_directory(tmp_path: Path) -> None:
    with pytest.raises(errors.ModelLoadError, match="does not exist"):
        AsyncEngine.from_pretrained(str(tmp_path / "nowhere"))


def test_missing_config(model_copy: Path) -> None:
    (model_copy / "config.json").unlink()
    with pytest.raises(errors.ModelLoadError, match=r"config\.json"):
        load(model_copy)


def test_unreadable_config(model_copy: Path) -> None:
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(errors.ModelLoadError, match="not readable JSON"):
        load(model_copy)


def test_config_missing_a_key(model_copy: Path) -> None:
    config = json.loads((model_copy / "config.json").read_text())
    del config["hidden_size"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(errors.ModelLoadError, match="hidden_size"):
        load(model_copy)


def test_unknown_architecture_lists_the_supported_ones(model_copy: Path) -> None:
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["MysteryForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(errors.UnsupportedArchitectureError, match="Qwen3ForCausalLM"):
        load(model_copy)


def test_no_safetensors_files(model_copy: Path) -> None:
    (model_copy / "model.safetensors").rename(model_copy / "model.bin")
    with pytest.raises(errors.ModelLoadError, match=r"no \*\.safetensors"):
        load(model_copy)


def test_corrupt_safetensors_file(model_copy: Path) -> None:
    (model_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(errors.ModelLoadError, match=r"model\.safetensors"):
        load(model_copy)


def test_missing_tensor_is_named(model_copy: Path) -> None:
    edit_weights(model_copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        errors.ModelLoadError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight"
    ):
        load(model_copy)


def test_unexpected_tensor_is_named(model_copy: Path) -> None:
    edit_weights(model_copy, lambda t: t.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(errors.ModelLoadError, match=r"unexpected tensor 'model\.extra\.weight'"):
        load(model_copy)


def test_wrong_shape_is_named_with_both_shapes(model_copy: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    edit_weights(model_copy, lambda t: t.update({name: torch.zeros(7, 128)}))
    with pytest.raises(
        errors.ModelLoadError, match=r"up_proj\.weight.*\(7, 128\).*expected \(256, 128\)"
    ):
        load(model_copy)


def test_non_floating_tensor_is_rejected(model_copy: Path) -> None:
    name = "model.norm.weight"
    edit_weights(model_copy, lambda t: t.update({name: torch.ones(128, dtype=torch.int32)}))
    with pytest.raises(errors.ModelLoadError, match="int32"):
        load(model_copy)


def test_a_stored_copy_of_a_tied_head_is_accepted(model_copy: Path) -> None:
    edit_weights(
        model_copy, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()})
    )
    load(model_copy)


def test_missing_tokenizer(model_copy: Path) -> None:
    for path in model_copy.glob("tokenizer*"):
        path.unlink()
    with pytest.raises(errors.ModelLoadError, match="tokenizer"):
        load(model_copy)


def test_random_model_writer_round_trips(tmp_path: Path) -> None:
    write_random_model(tmp_path, seed=5)
    model = load(tmp_path)
    written = load_file(tmp_path / "model.safetensors")
    # Unpacked tensors come back as they were written (packed ones are checked by parity).
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(model.get_parameter(name).to(written[name].dtype), written[name])


def test_a_token_budget_below_max_num_seqs_is_rejected() -> None:
    with pytest.raises(errors.ConfigError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=32)


# ---- values read from config.json and generation_config.json --------------------------------


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))  # NaN and Infinity are written as JSON's extensions


@pytest.mark.parametrize(
    ("file", "key", "value"),
    [
        ("generation_config.json", "eos_token_id", "x"),
        ("generation_config.json", "eos_token_id", 1.7),
        ("generation_config.json", "eos_token_id", 384),  # the vocabulary has 384 tokens
        ("generation_config.json", "eos_token_id", -1),
        ("generation_config.json", "eos_token_id", True),
        ("generation_config.json", "eos_token_id", [2, "x"]),
        ("config.json", "eos_token_id", "x"),
        ("config.json", "rope_parameters", [1]),
        ("config.json", "rope_scaling", "linear"),
        ("config.json", "rope_theta", float("nan")),
        ("config.json", "rope_theta", float("inf")),
        ("config.json", "rms_norm_eps", float("nan")),
        ("config.json", "rms_norm_eps", 0),
        ("config.json", "rms_norm_eps", "1e-6"),
        ("config.json", "vocab_size", True),
        ("config.json", "vocab_size", 2**31),
        ("config.json", "hidden_size", 128.0),
        ("config.json", "num_hidden_layers", "3"),
        ("config.json", "max_position_embeddings", 2**31),
        ("config.json", "tie_word_embeddings", "false"),
        ("config.json", "attention_bias", 0),
        ("config.json", "use_sliding_window", "false"),
    ],
)
def test_bad_model_config_values_name_the_file_key_and_value(
    model_copy: Path, file: str, key: str, value: Any
) -> None:
    if key == "rope_theta":
        edit_json(model_copy / "config.json", rope_parameters=None)
    edit_json(model_copy / file, **{key: value})
    with pytest.raises(errors.ModelLoadError) as caught:
        AsyncEngine.from_pretrained(str(model_copy), device="cpu")
    message = str(caught.value)
    assert str(model_copy / file) in message
    assert key in message
    assert repr(value) in message or str(value) in message


def test_generation_config_eos_ids_are_read_when_valid(model_copy: Path) -> None:
    edit_json(model_copy / "generation_config.json", eos_token_id=[3, 383])
    engine = AsyncEngine.from_pretrained(str(model_copy), device="cpu")
    assert engine._core.model_config.eos_token_ids == (3, 383)


async def test_a_prompt_with_a_lone_surrogate_is_an_invalid_request(
    random_model_dir: Path,
) -> None:
    async with AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", num_kv_blocks=8
    ) as engine:
        with pytest.raises(errors.InvalidRequestError, match=r"prompt .*'\\ud800' at index 5"):
            engine.stream("Once \ud800 upon a time")
        assert len((await engine.generate("Once", SamplingParams(max_tokens=2))).token_ids) == 2


def test_a_chat_message_with_a_lone_surrogate_is_an_invalid_request() -> None:
    tokenizer = AsyncEngine.from_pretrained(None, device="cpu").tokenizer
    with pytest.raises(errors.InvalidRequestError, match=r"message 1 'content'.*'\\udfff'"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "user", "content": "a\udfff"}]
        )


# ---- allocations that cannot succeed ---------------------------------------------------------


async def start(model_dir: Path, **overrides: Any) -> None:
    async with AsyncEngine.from_pretrained(str(model_dir), device="cpu", **overrides):
        pass


async def test_an_impossible_num_kv_blocks_names_the_bytes_and_the_field(
    random_model_dir: Path,
) -> None:
    # 2**31 - 1 blocks of this model's 12 KiB: about 26 TB.
    with pytest.raises(errors.ConfigError, match=r"26388279054336 bytes.*lower num_kv_blocks"):
        await start(random_model_dir, num_kv_blocks=2**31 - 1)


async def test_an_impossible_kv_cache_bytes_names_the_field(random_model_dir: Path) -> None:
    with pytest.raises(errors.ConfigError, match=r"KV pool .* bytes.*lower kv_cache_bytes"):
        await start(random_model_dir, kv_cache_bytes=2**62)


async def test_an_impossible_max_position_embeddings_names_the_bytes(model_copy: Path) -> None:
    edit_json(model_copy / "config.json", max_position_embeddings=2**31 - 1)
    # cos and sin: 2 tables x (2**31 - 1) positions x head_dim 16 x 4 bytes.
    with pytest.raises(
        errors.ConfigError, match=r"274877906816 bytes for max_position_embeddings=2147483647"
    ):
        await start(model_copy, num_kv_blocks=8)


async def test_an_allocation_failing_despite_the_checks_is_a_config_error(
    random_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the size checks cannot foresee (another process taking the memory meanwhile)
    # surfaces as the allocator's error; it must still name the pool and the field.
    def out_of_memory(self: ModelRunner, num_blocks: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")

    monkeypatch.setattr(ModelRunner, "_bind_kv_cache", out_of_memory)
    with pytest.raises(errors.ConfigError, match=r"KV pool \(8 blocks.*lower num_kv_blocks"):
        await start(random_model_dir, num_kv_blocks=8)


def test_only_allocation_failures_become_config_errors() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="boom"), allocation_errors(cpu, "x", "y"):
        raise RuntimeError("boom")
    with (
        pytest.raises(errors.ConfigError, match=r"allocating x on cpu failed.*; y"),
        allocation_errors(cpu, "x", "y"),
    ):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
