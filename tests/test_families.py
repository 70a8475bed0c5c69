"""Llama 2/3, Qwen2/2.5, Mistral and Qwen3-MoE: token-exact with transformers in float32.

Each family is a small random checkpoint written by transformers' own `save_pretrained`
(safetensors; Qwen3-MoE sharded, with an index): the last-position logits of a batch of
prefills, and 64-token greedy outputs of single requests, crowded batches with preemption,
prefix-cache hits and chunked prefill, all match transformers' isolated runs. One engine per
family is shared by the module (each test checks what it did itself).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from asyncllm import AsyncEngine, SamplingParams, errors
from asyncllm.bench.model import checkpoint_shapes, write_random_checkpoint
from asyncllm.engine.runner import SampleSpec, SeqStep
from asyncllm.layers.rotary import rope_inv_freq
from asyncllm.model.config import ModelConfig
from asyncllm.model.loader import checkpoint_files, load_model
from asyncllm.parallel import TPGroup
from tests.models import (
    load_reference,
    paged_greedy,
    random_prompts,
    reference_greedy,
    write_family_model,
)
from tests.test_model_parity import make_runner, paged_logits

shared_loop = pytest.mark.asyncio(loop_scope="module")

_BASE = dict(
    vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
    num_attention_heads=8, num_key_value_heads=2, head_dim=16, eos_token_id=None,
    bos_token_id=None,
)  # fmt: skip
VOCAB = 384

# name -> (transformers model_type, config.json settings, save_pretrained max_shard_size)
FAMILIES: dict[str, tuple[str, dict[str, Any], str | None]] = {
    # Llama 3.x: llama3 rope scaling (an original context short enough that the stretched,
    # kept and blended frequencies all occur), untied head, 4 query heads per KV head.
    "llama3": ("llama", dict(
        _BASE, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64),
    ), None),
    # Llama 2 style with everything optional switched on: linear rope scaling, a tied head,
    # attention_bias (q/k/v/o) and mlp_bias, multi-head attention.
    "llama-tied": ("llama", dict(
        _BASE, num_key_value_heads=8, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, rope_scaling=dict(rope_type="linear", factor=2.0),
    ), None),
    # Qwen2.5: bias on q/k/v only, a tied head, sliding_window present but switched off.
    "qwen2": ("qwen2", dict(
        _BASE, tie_word_embeddings=True, use_sliding_window=False, sliding_window=4096,
        rope_theta=1000000.0,
    ), None),
    "mistral": ("mistral", dict(_BASE, tie_word_embeddings=False, sliding_window=None), None),
    # Qwen3-MoE: 8 experts, top-2 renormalised, layer 1 dense; sharded with an index.
    "qwen3-moe": ("qwen3_moe", dict(
        _BASE, hidden_size=64, num_attention_heads=4, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
    ), "200KB"),
    # Every other layer sparse (decoder_sparse_step 2: layer 0 dense, layer 1 sparse), top-3
    # of 16 experts not renormalised, tied.
    "qwen3-moe-step2": ("qwen3_moe", dict(
        _BASE, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
        moe_intermediate_size=48, num_experts=16, num_experts_per_tok=3, norm_topk_prob=False,
        decoder_sparse_step=2, tie_word_embeddings=True,
    ), None),
}  # fmt: skip
NAMES = sorted(FAMILIES)

# A pool of 30 blocks of 16 tokens and 32-token steps: crowds preempt, long prompts chunk.
TIGHT = dict(
    device="cpu", dtype="float32", num_kv_blocks=30, block_size=16, max_model_len=200,
    max_num_batched_tokens=32, max_num_seqs=16,
)  # fmt: skip
GREEDY = SamplingParams(temperature=0, max_tokens=64)

# The crowd reuses the other tests' prompts, so transformers generates each only once.
SINGLE = random_prompts([23], VOCAB, seed=2)
SHARED_PREFIX = random_prompts([40], VOCAB, seed=5)[0]
PREFIXED = random_prompts([5, 17], VOCAB, seed=6, prefix=SHARED_PREFIX)
LONG = random_prompts([110, 77], VOCAB, seed=7)
CROWD = SINGLE + PREFIXED + LONG + random_prompts([3, 31], VOCAB, seed=4)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Family name -> checkpoint directory, written on first use."""

    class Dirs(dict[str, Path]):
        def __missing__(self, name: str) -> Path:
            model_type, settings, shard_size = FAMILIES[name]
            directory = tmp_path_factory.mktemp(f"family-{name}")
            write_family_model(directory, model_type, seed=2, max_shard_size=shard_size,
                               **settings)  # fmt: skip
            self[name] = directory
            return directory

    return Dirs()


class References:
    """transformers' greedy continuations, computed once per (family, prompt, length)."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        self.models: dict[str, Any] = {}
        self.outputs: dict[tuple[str, tuple[int, ...], int], list[int]] = {}

    def model(self, name: str) -> Any:
        if name not in self.models:
            self.models[name] = load_reference(self.dirs[name])
        return self.models[name]

    def greedy(self, name: str, prompts: list[list[int]], max_tokens: int = 64) -> list[list[int]]:
        for prompt in prompts:
            key = (name, tuple(prompt), max_tokens)
            if key not in self.outputs:
                model = self.model(name)
                self.outputs[key] = reference_greedy(model, prompt, max_tokens, stop_at_eos=False)
        return [self.outputs[(name, tuple(p), max_tokens)] for p in prompts]


@pytest.fixture(scope="module")
def references(family_dirs: dict[str, Path]) -> References:
    return References(family_dirs)


class Engines:
    """One TIGHT engine per family, started on first use in the module's event loop."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        self.started: dict[str, AsyncEngine] = {}

    async def get(self, name: str) -> AsyncEngine:
        if name not in self.started:
            engine = AsyncEngine.from_pretrained(str(self.dirs[name]), **TIGHT)
            await engine.start()
            self.started[name] = engine
        return self.started[name]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(family_dirs: dict[str, Path]) -> AsyncIterator[Engines]:
    shared = Engines(family_dirs)
    yield shared
    for engine in shared.started.values():
        await engine.shutdown()


# ---- parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_prefill_logits_match_transformers(
    name: str, family_dirs: dict[str, Path], references: References
) -> None:
    runner = make_runner(family_dirs[name], block_size=16)
    prompts = random_prompts([1, 9, 40, 100], VOCAB, seed=1)
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(prompts))]
    greedy = SamplingParams(temperature=0)
    steps = [SeqStep(p, 0, t, SampleSpec(greedy, 0, 0)) for p, t in zip(prompts, tables)]
    ours = paged_logits(runner, steps)
    reference = references.model(name)
    with torch.inference_mode():
        theirs = torch.stack([reference(torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@shared_loop
@pytest.mark.parametrize("name", NAMES)
async def test_single_request_matches_transformers(
    name: str, engines: Engines, references: References
) -> None:
    engine = await engines.get(name)
    out = await engine.generate(SINGLE[0], GREEDY)
    assert out.token_ids == references.greedy(name, SINGLE)[0]
    assert out.finish_reason == "length"


@shared_loop
@pytest.mark.parametrize("name", NAMES)
async def test_crowded_batch_with_preemption_matches_transformers(
    name: str, engines: Engines, references: References
) -> None:
    engine = await engines.get(name)
    rng = random.Random(3)
    delays = [rng.uniform(0, 0.03) for _ in CROWD]
    outputs: list[list[int] | None] = [None] * len(CROWD)
    preemptions_before = engine.stats().num_preemptions

    async def client(index: int) -> None:
        await anyio.sleep(delays[index])  # arrival time, not synchronisation
        outputs[index] = (await engine.generate(CROWD[index], GREEDY)).token_ids

    async with anyio.create_task_group() as group:
        for index in range(len(CROWD)):
            group.start_soon(client, index)
    assert engine.stats().num_preemptions > preemptions_before  # 30 blocks cannot hold them
    assert outputs == references.greedy(name, CROWD)


@shared_loop
@pytest.mark.parametrize("name", NAMES)
async def test_prefix_cache_hits_give_identical_outputs(
    name: str, engines: Engines, references: References
) -> None:
    engine = await engines.get(name)
    first = await engine.generate(PREFIXED[0], GREEDY)
    second = await engine.generate(PREFIXED[1], GREEDY)
    assert second.usage.cached_tokens >= 32  # the two full blocks of the shared prefix
    assert [first.token_ids, second.token_ids] == references.greedy(name, PREFIXED)


@shared_loop
@pytest.mark.parametrize("name", NAMES)
async def test_chunked_prefill_matches_transformers(
    name: str, engines: Engines, references: References
) -> None:
    engine = await engines.get(name)
    engine.reset_prefix_cache()  # earlier tests ran these prompts: prefill them afresh
    steps_before = engine.stats().num_steps
    outs = await engine.generate_many(LONG, GREEDY)
    assert engine.stats().num_steps - steps_before >= sum(map(len, LONG)) // 32  # <= 32 a step
    assert [o.token_ids for o in outs] == references.greedy(name, LONG)


# ---- rotary scalings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        dict(rope_type="linear", factor=2.5),
        dict(rope_type="dynamic", factor=3.0),
        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=8192),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),
    ],
)  # fmt: skip
def test_rope_frequencies_are_transformers_own_to_the_bit(scaling: dict[str, Any] | None) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from asyncllm.model.config import ModelConfig

    hf = LlamaConfig(
        head_dim=128, num_attention_heads=32, hidden_size=4096, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=scaling,
    )  # fmt: skip
    raw = {**hf.to_dict(), "architectures": ["LlamaForCausalLM"]}
    ours = ModelConfig.from_dict(raw)
    if scaling is None:
        want, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        want, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf)
    got = rope_inv_freq(128, ours.rope_theta, ours.rope_scaling, ours.max_position_embeddings)
    assert torch.equal(got, want)


def test_dynamic_rope_matches_transformers_up_to_max_position_embeddings(tmp_path: Path) -> None:
    settings = dict(FAMILIES["mistral"][1], rope_scaling=dict(rope_type="dynamic", factor=3.0))
    write_family_model(tmp_path, "llama", seed=3, **settings)
    edit_json(tmp_path / "config.json", max_position_embeddings=128)
    reference = load_reference(tmp_path)
    runner = make_runner(tmp_path, block_size=16)
    prompts = random_prompts([100, 64], VOCAB, seed=8)
    ours = paged_greedy(runner, prompts, max_new_tokens=28)  # the first ends at position 127
    assert ours == [reference_greedy(reference, p, 28, stop_at_eos=False) for p in prompts]


def test_dynamic_rope_refuses_positions_beyond_max_position_embeddings(tmp_path: Path) -> None:
    settings = dict(FAMILIES["mistral"][1], rope_scaling=dict(rope_type="dynamic", factor=3.0))
    write_family_model(tmp_path, "llama", seed=3, **settings)
    with pytest.raises(errors.ConfigError, match="max_model_len 1025 exceeds the model's limit"):
        load(tmp_path, max_model_len=1025)


# ---- config.json errors ------------------------------------------------------------------


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def load(model_dir: Path, **overrides: Any) -> AsyncEngine:
    settings: dict[str, Any] = dict(device="cpu", num_kv_blocks=16, block_size=16)
    settings.update(overrides)
    engine = AsyncEngine.from_pretrained(str(model_dir), **settings)
    engine._core.load()
    return engine


@pytest.fixture
def copy_of(family_dirs: dict[str, Path], tmp_path: Path) -> Any:
    """copy_of(name): a fresh copy of a family's checkpoint directory to edit."""

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(family_dirs[name], target)
        return target

    return copy


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        (dict(rope_type="longrope", factor=4.0), "rope type 'longrope' is not supported"),
        (dict(rope_type="yarn", factor=4.0, beta_slow=0), "'beta_slow' must be positive"),
        (dict(rope_type="linear", factor=0.5), "'factor' must be >= 1, got 0.5"),
        (dict(rope_type="linear"), "required key 'factor' is missing"),
        (dict(rope_type="llama3", factor=8.0, high_freq_factor=4.0,
              original_max_position_embeddings=64), "required key 'low_freq_factor'"),
        (dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0,
              original_max_position_embeddings=64), "'high_freq_factor' .* must exceed"),
        (dict(rope_type="dynamic", factor="2"), "'factor' must be a number, got '2'"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_bad_rope_scaling_names_the_file_key_and_value(
    copy_of: Any, rope: dict[str, Any], message: str, key: str
) -> None:
    model_dir = copy_of("llama3")
    edit_json(model_dir / "config.json", **{"rope_parameters": None, key: rope})
    with pytest.raises(errors.ModelLoadError, match=message) as caught:
        AsyncEngine.from_pretrained(str(model_dir), device="cpu")
    assert f"{model_dir / 'config.json'}: '{key}'" in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(num_experts_per_tok=9), r"'num_experts_per_tok' \(9\) exceeds the number of experts"),
        (dict(mlp_only_layers=[7]), r"'mlp_only_layers' names layers \[7\] outside \[0, 3\)"),
        (dict(mlp_only_layers="1"), "'mlp_only_layers' must be a list of layer indices"),
        (dict(moe_intermediate_size=None), "required key 'moe_intermediate_size' is missing"),
        (dict(num_local_experts=None), "required key 'num_experts' is missing"),
        (dict(num_local_experts=0), r"'num_local_experts' must be \[1, 2\*\*31 - 1\], got 0"),
        (dict(decoder_sparse_step=0), "'decoder_sparse_step' must be"),
        (dict(norm_topk_prob="yes"), "'norm_topk_prob' must be bool"),
    ],
)  # fmt: skip
def test_bad_expert_settings_name_the_file_key_and_value(
    copy_of: Any, changes: dict[str, Any], message: str
) -> None:
    model_dir = copy_of("qwen3-moe")
    edit_json(model_dir / "config.json", **changes)
    with pytest.raises(errors.ModelLoadError, match=message):
        AsyncEngine.from_pretrained(str(model_dir), device="cpu")


def test_published_num_experts_key_is_read_like_transformers_5_one(copy_of: Any) -> None:
    model_dir = copy_of("qwen3-moe")
    config = json.loads((model_dir / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts")
    (model_dir / "config.json").write_text(json.dumps(config))
    engine = load(model_dir)
    assert engine._core.model_config.moe is not None
    assert engine._core.model_config.moe.num_experts == 8


def test_experts_that_do_not_split_across_ranks_are_a_config_error(copy_of: Any) -> None:
    model_dir = copy_of("qwen3-moe")
    edit_json(model_dir / "config.json", moe_intermediate_size=30)
    with pytest.raises(errors.ConfigError, match="moe_intermediate_size 30 is not divisible"):
        AsyncEngine.from_pretrained(str(model_dir), device="cpu", tensor_parallel_size=4)


# ---- sliding window ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("mistral", dict(sliding_window=64)),
        ("qwen2", dict(sliding_window=64, use_sliding_window=True)),
    ],
)
def test_a_sliding_window_below_max_model_len_is_a_config_error(
    copy_of: Any, name: str, changes: dict[str, Any]
) -> None:
    model_dir = copy_of(name)
    edit_json(model_dir / "config.json", **changes)
    with pytest.raises(errors.ConfigError, match="max_model_len 128 exceeds the sliding_window 64"):
        load(model_dir, max_model_len=128)


def test_a_sliding_window_caps_the_default_max_model_len(copy_of: Any) -> None:
    model_dir = copy_of("mistral")
    edit_json(model_dir / "config.json", sliding_window=64)
    engine = load(model_dir)
    runner = engine._core.runner
    assert runner is not None and runner.max_model_len == 64


async def test_within_the_window_a_sliding_window_model_matches_transformers(
    copy_of: Any,
) -> None:
    """Inside the window sliding attention is full attention: the engine serves it."""
    model_dir = copy_of("mistral")
    edit_json(model_dir / "config.json", sliding_window=64)
    [prompt] = random_prompts([30], VOCAB, seed=9)
    engine = AsyncEngine.from_pretrained(str(model_dir), **{**TIGHT, "max_model_len": 64})
    async with engine:
        out = await engine.generate(prompt, SamplingParams(temperature=0, max_tokens=34))
    reference = load_reference(model_dir)  # transformers, with its sliding-window mask
    assert out.token_ids == reference_greedy(reference, prompt, 34, stop_at_eos=False)


def test_a_sliding_window_switched_off_is_ignored(family_dirs: dict[str, Path]) -> None:
    engine = load(family_dirs["qwen2"])  # sliding_window 4096, use_sliding_window false
    assert engine._core.model_config.sliding_window is None


# ---- checkpoint files --------------------------------------------------------------------


def edit_weights(model_dir: Path, edit: Any) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("name", "tensor"),
    [
        ("llama3", "lm_head.weight"),  # untied: the head is a tensor of its own
        ("llama-tied", "model.layers.1.mlp.gate_proj.bias"),
        ("llama-tied", "model.layers.0.self_attn.o_proj.bias"),
        ("qwen2", "model.layers.0.self_attn.v_proj.bias"),
        ("mistral", "model.layers.2.mlp.down_proj.weight"),
        ("qwen3-moe-step2", "model.layers.1.mlp.experts.5.up_proj.weight"),
        ("qwen3-moe-step2", "model.layers.1.mlp.gate.weight"),
        ("qwen3-moe-step2", "model.layers.0.mlp.down_proj.weight"),  # a dense layer
    ],
)
def test_a_missing_tensor_is_named(copy_of: Any, name: str, tensor: str) -> None:
    model_dir = copy_of(name)
    edit_weights(model_dir, lambda tensors: tensors.pop(tensor))
    with pytest.raises(errors.ModelLoadError, match=rf"missing tensors: {tensor}"):
        load(model_dir)


@pytest.mark.parametrize(
    ("name", "tensor", "shape"),
    [
        ("llama3", "model.layers.0.self_attn.q_norm.weight", (16,)),  # no q/k norm in Llama
        ("qwen2", "model.layers.0.self_attn.o_proj.bias", (128,)),  # Qwen2: q/k/v bias only
        ("mistral", "model.layers.0.self_attn.q_proj.bias", (128,)),
        ("qwen3-moe-step2", "model.layers.1.mlp.experts.16.gate_proj.weight", (48, 64)),
        ("qwen3-moe-step2", "model.layers.0.mlp.experts.0.gate_proj.weight", (48, 64)),
    ],
)
def test_an_extra_tensor_is_named(
    copy_of: Any, name: str, tensor: str, shape: tuple[int, ...]
) -> None:
    model_dir = copy_of(name)
    edit_weights(model_dir, lambda tensors: tensors.update({tensor: torch.zeros(shape)}))
    with pytest.raises(errors.ModelLoadError, match=rf"unexpected tensor '{tensor}'"):
        load(model_dir)


def test_an_expert_of_the_wrong_shape_is_named_with_both_shapes(copy_of: Any) -> None:
    model_dir = copy_of("qwen3-moe-step2")
    tensor = "model.layers.1.mlp.experts.2.down_proj.weight"
    edit_weights(model_dir, lambda tensors: tensors.update({tensor: torch.zeros(64, 40)}))
    with pytest.raises(
        errors.ModelLoadError, match=rf"'{tensor}' has shape \(64, 40\), expected \(64, 48\)"
    ):
        load(model_dir)


def test_a_shard_the_index_names_must_exist(copy_of: Any) -> None:
    model_dir = copy_of("qwen3-moe")
    (model_dir / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(
        errors.ModelLoadError, match=r"index\.json: names 'model-00002-of-00005\.safetensors'"
    ):
        load(model_dir)


def test_a_tensor_the_index_places_in_a_shard_must_be_there(copy_of: Any) -> None:
    model_dir = copy_of("qwen3-moe")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00005.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        errors.ModelLoadError, match=r"the index says it holds 'model\.norm\.weight'"
    ):
        load(model_dir)


def test_an_index_cannot_point_outside_the_directory(copy_of: Any) -> None:
    model_dir = copy_of("qwen3-moe")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(errors.ModelLoadError, match="not a \\*\\.safetensors file name"):
        load(model_dir)


def test_files_outside_the_index_are_not_read(copy_of: Any) -> None:
    """Like the consolidated.safetensors next to the shards of Mistral's repositories."""
    model_dir = copy_of("qwen3-moe")
    (model_dir / "consolidated.safetensors").write_bytes(b"not a safetensors file")
    load(model_dir)


def pack_experts(model_dir: Path) -> None:
    """Rewrite per-expert tensors as the packed [E, 2I, H] / [E, H, I] tensors that some
    transformers versions save."""

    def pack(tensors: dict[str, torch.Tensor], layer: str) -> None:
        def take(expert: int, proj: str) -> torch.Tensor:
            return tensors.pop(f"{layer}.experts.{expert}.{proj}.weight")

        count = sum(1 for n in tensors if n.startswith(f"{layer}.experts.") and "down" in n)
        tensors[f"{layer}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([take(e, "gate_proj"), take(e, "up_proj")]) for e in range(count)]
        )
        tensors[f"{layer}.experts.down_proj"] = torch.stack(
            [take(e, "down_proj") for e in range(count)]
        )

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for layer in {n.split(".experts.")[0] for n in tensors if ".experts." in n}:
            pack(tensors, layer)

    edit_weights(model_dir, edit)


def test_packed_expert_tensors_load_like_per_expert_ones(
    copy_of: Any, family_dirs: dict[str, Path]
) -> None:
    packed = copy_of("qwen3-moe-step2")
    pack_experts(packed)
    prompts = random_prompts([1, 30], VOCAB, seed=10)
    tables = [list(range(4)), list(range(4, 8))]
    greedy = SamplingParams(temperature=0)
    steps = [SeqStep(p, 0, t, SampleSpec(greedy, 0, 0)) for p, t in zip(prompts, tables)]
    logits = [paged_logits(make_runner(d, block_size=16), steps)
              for d in (family_dirs["qwen3-moe-step2"], packed)]  # fmt: skip
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("packed", [False, True])
def test_each_rank_holds_its_slice_of_every_expert(
    copy_of: Any, family_dirs: dict[str, Path], packed: bool
) -> None:
    """Rank 1 of 2: each expert's second half of the gate and up rows and of the down
    columns; the router whole."""
    model_dir = copy_of("qwen3-moe-step2")
    if packed:
        pack_experts(model_dir)
    rank1 = TPGroup(rank=1, world_size=2)  # building and loading call no collective
    model: Any = load_model(model_dir, ModelConfig.from_dir(model_dir), torch.device("cpu"),
                            torch.float32, rank1)  # fmt: skip
    block = model.model.layers[1].mlp
    half = 24  # moe_intermediate_size 48 over 2 ranks
    source = family_dirs["qwen3-moe-step2"] / "model.safetensors"
    with safe_open(str(source), "pt") as stored:

        def get(name: str) -> torch.Tensor:
            return stored.get_tensor(f"model.layers.1.mlp.{name}")

        for e in range(16):
            gate_up, down = block.experts.gate_up_proj[e], block.experts.down_proj[e]
            assert torch.equal(gate_up[:half], get(f"experts.{e}.gate_proj.weight")[half:])
            assert torch.equal(gate_up[half:], get(f"experts.{e}.up_proj.weight")[half:])
            assert torch.equal(down, get(f"experts.{e}.down_proj.weight")[:, half:])
        assert torch.equal(block.gate.weight, get("gate.weight"))


# ---- tensor parallelism ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama3", "qwen3-moe"])
async def test_two_ranks_match_transformers(
    name: str, family_dirs: dict[str, Path], references: References
) -> None:
    """TP=2 on gloo: heads, MLP and (for Qwen3-MoE) every expert's intermediate dimension
    split in two; a crowd with preemption, prefix hits and chunked prompts."""
    engine = AsyncEngine.from_pretrained(str(family_dirs[name]), **TIGHT, tensor_parallel_size=2)
    async with engine:
        outs = await engine.generate_many(CROWD, GREEDY)
        stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens > 0
    assert [o.token_ids for o in outs] == references.greedy(name, CROWD)


# ---- benchmark checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_benchmark_checkpoints_have_the_layout_transformers_saves(
    name: str, family_dirs: dict[str, Path]
) -> None:
    """`asyncllm bench --model-shape` writes what transformers would: same names, shapes."""
    config = json.loads((family_dirs[name] / "config.json").read_text())
    saved: dict[str, tuple[int, ...]] = {}
    for file in checkpoint_files(family_dirs[name]):
        with safe_open(str(file.path), "pt") as stored:
            saved |= {key: tuple(stored.get_slice(key).get_shape()) for key in stored.keys()}  # noqa: SIM118
    assert checkpoint_shapes(config) == saved


async def test_a_sharded_random_benchmark_model_serves(
    family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    config = json.loads((family_dirs["qwen3-moe"] / "config.json").read_text())
    write_random_checkpoint(tmp_path, config, shard_bytes=100_000)
    assert len(checkpoint_files(tmp_path)) > 1
    async with AsyncEngine.from_pretrained(str(tmp_path), device="cpu", num_kv_blocks=16) as engine:
        out = await engine.generate([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(out.token_ids) == 5


def test_transformers_loads_a_sharded_random_benchmark_model_whole(
    family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The throughput benchmark compares against transformers on these very files."""
    from transformers import AutoModelForCausalLM

    config = json.loads((family_dirs["llama3"] / "config.json").read_text())
    write_random_checkpoint(tmp_path, config, shard_bytes=300_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_model_is_built_in_its_dtype_not_cast_from_float32() -> None:
    """Parameters made in bf16 from the start (no float32 copy of a large model); explicit
    dtypes, integer ranges and other threads are left alone."""
    import threading

    from asyncllm.model.loader import _FactoryDtype

    other_thread: list[torch.dtype] = []
    with _FactoryDtype(torch.bfloat16):
        layer = torch.nn.Linear(8, 4)
        explicit = torch.empty(2, dtype=torch.float32)
        positions = torch.arange(3)
        thread = threading.Thread(target=lambda: other_thread.append(torch.empty(1).dtype))
        thread.start()
        thread.join()
    assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16
    assert explicit.dtype == torch.float32 and positions.dtype == torch.int64
    assert other_thread == [torch.float32]
