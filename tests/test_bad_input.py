"""Every bad input gets a typed error naming what was wrong, and the engine keeps serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from asyncllm import AsyncEngine, EngineConfig, SamplingParams, errors
from tests.models import write_random_model


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.5, "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -1, "top_k"),
        ("min_p", 2.0, "min_p"),
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", 2.5, "max_tokens"),
        ("seed", -3, "seed"),
        ("stop", [""], "stop"),
        ("stop_token_ids", [-1], "stop_token_ids"),
        ("min_tokens", -1, "min_tokens"),
        ("logprobs", 99, "logprobs"),
    ],
)
def test_invalid_sampling_values_are_rejected(field: str, value: Any, message: str) -> None:
    with pytest.raises(errors.InvalidRequestError, match=message):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected() -> None:
    with pytest.raises(errors.InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"block_size": 24}, "power of two"),
        ({"dtype": "float8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"num_kv_blocks": -4}, "num_kv_blocks"),
        ({"max_num_sqes": 4}, "did you mean 'max_num_seqs'"),
    ],
)
def test_invalid_engine_config_is_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.ConfigError, match=message):
        EngineConfig().replace(**overrides)


def test_unknown_attention_backend_is_rejected(random_model_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(
        str(random_model_dir), device="cpu", attention_backend="magic"
    )
    with pytest.raises(errors.ConfigError, match="magic"):
        engine._core.load()


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


def load(model_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(str(model_dir), device="cpu", num_kv_blocks=8)
    engine._core.load()


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
    load(tmp_path)


def test_a_token_budget_below_max_num_seqs_is_rejected() -> None:
    with pytest.raises(errors.ConfigError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=32)
