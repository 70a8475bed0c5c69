"""YaRN rope scaling: the frequencies, the cos/sin tables and greedy outputs are transformers'
own (float32, to the bit and token for token), past original_max_position_embeddings and on
to original_max_position_embeddings * factor where that exceeds max_position_embeddings; bad
yarn fields are refused with the key and the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from asyncllm import AsyncEngine, SamplingParams, errors
from asyncllm.layers.rotary import RotaryEmbedding, rope_inv_freq
from asyncllm.model.config import ModelConfig
from tests.models import (
    load_reference,
    paged_greedy,
    random_prompts,
    reference_greedy,
    write_family_model,
    write_random_model,
)
from tests.test_families import FAMILIES, edit_json, load
from tests.test_model_parity import make_runner

# A short original context, so that short prompts already run past it.
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)


# ---- frequencies and tables --------------------------------------------------------------

# Each case changes one field from factor 4 over an original 512 positions.
TABLE_CASES = {
    "defaults": {},
    "no-truncate": dict(truncate=False),
    "truncate-null": dict(truncate=None),  # transformers reads it as false
    "betas": dict(beta_fast=16, beta_slow=2.5),
    "mscale": dict(factor=8.0, mscale=1.0, mscale_all_dim=0.8),
    "attention-factor": dict(attention_factor=0.9),
    "factor-from-lengths": dict(factor=None),  # transformers 5: 1024 / 512
    "factor-one": dict(factor=1.0),
}


@pytest.mark.parametrize("theta", [10000.0, 1000000.0])
@pytest.mark.parametrize("fields", TABLE_CASES.values(), ids=TABLE_CASES.keys())
def test_yarn_frequencies_and_tables_are_transformers_own_to_the_bit(
    fields: dict[str, Any], theta: float
) -> None:
    scaling = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=512)
    hf = Qwen3Config(
        head_dim=64, max_position_embeddings=1024, rope_theta=theta,
        rope_scaling={**scaling, **fields},
    )  # fmt: skip
    ours = ModelConfig.from_dict({**hf.to_dict(), "architectures": ["Qwen3ForCausalLM"]})
    assert ours.rope_scaling is not None
    want_inv_freq, want_attention = ROPE_INIT_FUNCTIONS["yarn"](hf)
    got = rope_inv_freq(64, ours.rope_theta, ours.rope_scaling, ours.position_limit)
    assert torch.equal(got, want_inv_freq)
    assert ours.rope_scaling.attention_factor == want_attention
    # Every position of our tables, past max_position_embeddings where factor 4 reaches.
    rotary = RotaryEmbedding(64, ours.position_limit, ours.rope_theta, ours.rope_scaling)
    positions = torch.arange(ours.position_limit)[None]
    cos, sin = Qwen3RotaryEmbedding(hf)(torch.zeros(1), positions)
    assert torch.equal(rotary.cos, cos[0]) and torch.equal(rotary.sin, sin[0])


def test_a_top_level_original_max_position_embeddings_wins_as_in_transformers() -> None:
    hf = Qwen3Config(
        head_dim=64, max_position_embeddings=1024, original_max_position_embeddings=256,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=512),
    )  # fmt: skip
    ours = ModelConfig.from_dict({**hf.to_dict(), "architectures": ["Qwen3ForCausalLM"]})
    assert ours.rope_scaling is not None
    assert ours.rope_scaling.original_max_position_embeddings == 256
    want, _ = ROPE_INIT_FUNCTIONS["yarn"](hf)
    assert torch.equal(rope_inv_freq(64, ours.rope_theta, ours.rope_scaling, 1024), want)


def test_transformers_4_rope_scaling_with_type_reads_like_rope_parameters() -> None:
    base = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 64, "hidden_size": 64,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "max_position_embeddings": 1024}  # fmt: skip
    old = ModelConfig.from_dict({**base, "rope_scaling": {**YARN, "type": "yarn"}})
    new = ModelConfig.from_dict({**base, "rope_parameters": YARN})
    assert old.rope_scaling == new.rope_scaling
    assert old.rope_scaling is not None and old.rope_scaling.rope_type == "yarn"


# ---- greedy parity -----------------------------------------------------------------------


def test_qwen3_greedy_matches_transformers_past_the_original_context(tmp_path: Path) -> None:
    write_random_model(tmp_path, seed=4, rope_scaling=YARN)
    reference = load_reference(tmp_path)
    runner = make_runner(tmp_path, block_size=16)
    prompts = random_prompts([90, 40], 384, seed=9)  # both end past position 64
    ours = paged_greedy(runner, prompts, max_new_tokens=30)
    assert ours == [reference_greedy(reference, p, 30, stop_at_eos=False) for p in prompts]


def test_qwen2_greedy_matches_transformers_with_every_yarn_field_set(tmp_path: Path) -> None:
    scaling = dict(
        rope_type="yarn", factor=3.0, original_max_position_embeddings=48, beta_fast=8.0,
        beta_slow=2.0, mscale=1.0, mscale_all_dim=0.5, truncate=False,
    )  # fmt: skip
    write_family_model(
        tmp_path, "qwen2", seed=5, **{**FAMILIES["qwen2"][1], "rope_scaling": scaling}
    )
    reference = load_reference(tmp_path)
    runner = make_runner(tmp_path, block_size=16)
    prompts = random_prompts([70, 25], 384, seed=10)
    ours = paged_greedy(runner, prompts, max_new_tokens=30)
    assert ours == [reference_greedy(reference, p, 30, stop_at_eos=False) for p in prompts]


@pytest.fixture(scope="module")
def extended_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen3 whose yarn reaches past max_position_embeddings: 64 * 4 = 256 > 128."""
    directory = tmp_path_factory.mktemp("yarn-extended")
    write_random_model(directory, seed=6, rope_scaling=YARN)
    edit_json(directory / "config.json", max_position_embeddings=128)
    return directory


async def test_yarn_serves_up_to_original_times_factor_as_transformers(extended_dir: Path) -> None:
    prompt = random_prompts([200], 384, seed=11)[0]
    reference = reference_greedy(load_reference(extended_dir), prompt, 50, stop_at_eos=False)
    engine = AsyncEngine.from_pretrained(
        str(extended_dir), device="cpu", dtype="float32", num_kv_blocks=32, block_size=16
    )
    async with engine:
        assert engine.max_model_len == 256
        out = await engine.generate(prompt, SamplingParams(temperature=0, max_tokens=50))
    assert out.token_ids == reference  # the last at position 249


def test_max_model_len_past_original_times_factor_is_a_config_error(extended_dir: Path) -> None:
    with pytest.raises(errors.ConfigError, match="max_model_len 257 exceeds the model's limit 256"):
        load(extended_dir, max_model_len=257)


# ---- bad fields --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(factor=0.5), "'factor' must be >= 1, got 0.5"),
        (dict(factor="4"), "'factor' must be a number, got '4'"),
        (dict(original_max_position_embeddings=0),
         r"'original_max_position_embeddings' must be \[1, 2\*\*31 - 1\], got 0"),
        (dict(original_max_position_embeddings=64.5),
         "'original_max_position_embeddings' must be int, got 64.5"),
        (dict(beta_fast=0), "'beta_fast' must be positive, got 0.0"),
        (dict(beta_slow=-1), "'beta_slow' must be positive, got -1.0"),
        (dict(beta_fast=2, beta_slow=4),
         r"'beta_fast' \(2.0\) must be at least 'beta_slow' \(4.0\)"),
        (dict(mscale=0, mscale_all_dim=1.0), "'mscale' must be positive, got 0.0"),
        (dict(mscale_all_dim=True), "'mscale_all_dim' must be a number, got True"),
        (dict(attention_factor=-0.5), "'attention_factor' must be positive, got -0.5"),
        (dict(truncate="yes"), "'truncate' must be bool, got 'yes'"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_a_bad_yarn_field_names_the_file_key_and_value(
    fields: dict[str, Any], message: str, key: str
) -> None:
    raw = _qwen3_raw(**{key: {**YARN, **fields}})
    with pytest.raises(errors.ModelLoadError, match=message) as caught:
        ModelConfig.from_dict(raw, source="m/config.json")
    assert f"m/config.json: '{key}'" in str(caught.value)


def test_a_bad_top_level_original_max_position_embeddings_is_named() -> None:
    raw = _qwen3_raw(rope_scaling=YARN, original_max_position_embeddings="64")
    with pytest.raises(
        errors.ModelLoadError, match="'original_max_position_embeddings' must be int, got '64'"
    ):
        ModelConfig.from_dict(raw)


def test_yarn_needs_a_rope_theta_above_one() -> None:
    raw = _qwen3_raw(rope_parameters={**YARN, "rope_theta": 1.0})
    with pytest.raises(errors.ModelLoadError, match="rope_theta must exceed 1 for yarn"):
        ModelConfig.from_dict(raw)


def test_a_yarn_length_past_int32_is_refused() -> None:
    raw = _qwen3_raw(rope_scaling={**YARN, "factor": 2.0**30})
    with pytest.raises(errors.ModelLoadError, match=r"\(68719476736\) must be at most 2\*\*31 - 1"):
        ModelConfig.from_dict(raw)


def _qwen3_raw(**changes: Any) -> dict[str, Any]:
    config = Qwen3Config(
        head_dim=16, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, vocab_size=64
    )
    return {**config.to_dict(), "architectures": ["Qwen3ForCausalLM"], **changes}
