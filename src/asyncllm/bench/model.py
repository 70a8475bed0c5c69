"""Random-weight checkpoints for benchmarks in published models' exact shapes, no download.

`SHAPES` holds the config.json of each shape (Qwen3-0.6B, Qwen3-8B, Llama-3.2-1B,
Qwen2.5-0.5B, Qwen3-30B-A3B); `write_random_checkpoint` writes one with transformers' tensor names
(experts one by one, as published), in safetensors shards with an index when it is large.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from asyncllm.model.config import ModelConfig

__all__ = [
    "LLAMA_3_2_1B",
    "QWEN2_5_0_5B",
    "QWEN3_0_6B",
    "QWEN3_8B",
    "QWEN3_30B_A3B",
    "SHAPES",
    "byte_level_tokenizer",
    "checkpoint_shapes",
    "write_random_checkpoint",
    "write_random_qwen3",
]

QWEN3_0_6B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "eos_token_id": 151645,
}

QWEN3_8B: dict[str, Any] = {
    **QWEN3_0_6B,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}

LLAMA_3_2_1B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

QWEN2_5_0_5B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "max_window_layers": 21,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}

QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "eos_token_id": 151645,
}

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": QWEN3_0_6B,
    "qwen3-8b": QWEN3_8B,
    "llama-3.2-1b": LLAMA_3_2_1B,
    "qwen2.5-0.5b": QWEN2_5_0_5B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
}
"""Shape name (as `asyncllm bench ... --model-shape` takes it) -> config.json."""


def byte_level_tokenizer(vocab_size: int) -> Any:
    """A fast tokenizer covering ids [0, vocab_size): byte symbols first, then fillers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())[:vocab_size]
    symbols += [f"<t{i}>" for i in range(len(symbols), vocab_size)]
    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    fast: Any = PreTrainedTokenizerFast
    return fast(tokenizer_object=backend, clean_up_tokenization_spaces=False)


def write_random_checkpoint(
    directory: Path, config: dict[str, Any], seed: int = 0, std: float = 0.02,
    device: str | torch.device = "cpu", shard_bytes: int = 2 * 2**30,
) -> Path:  # fmt: skip
    """Write config.json, random bf16 safetensors (in shards of at most `shard_bytes`, with
    an index, when larger) and a tokenizer, unless `directory` already holds them. `device`
    draws the random numbers (a GPU draws a 10 GB model in seconds)."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "config.json").is_file():
        return directory
    shapes = checkpoint_shapes(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    shards = _split(shapes, shard_bytes)
    weight_map: dict[str, str] = {}
    for index, names in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else (
            f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        )  # fmt: skip
        tensors = {n: _init(n, shapes[n], std, generator, device) for n in names}
        save_file(tensors, str(directory / file))
        weight_map |= dict.fromkeys(names, file)
    if len(shards) > 1:
        total_bytes = sum(2 * int(torch.Size(shape).numel()) for shape in shapes.values())
        index_json = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1))
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config["eos_token_id"]})
    )
    byte_level_tokenizer(config["vocab_size"]).save_pretrained(str(directory))
    # Last: its presence marks a complete directory.
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_random_qwen3(
    directory: Path, config: dict[str, Any] = QWEN3_0_6B, seed: int = 0, std: float = 0.02,
    device: str = "cpu",
) -> Path:  # fmt: skip
    """`write_random_checkpoint` with Qwen3-0.6B's shape by default. `device="cuda"` draws the
    weights there (an 8B model in seconds rather than minutes); the values then differ from
    a CPU draw with the same seed."""
    return write_random_checkpoint(directory, config, seed, std, device)


def checkpoint_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint of `config`, as the engine's own model class for
    its architecture expects them (biases, q/k norms, which layers have experts)."""
    from asyncllm.model.config import ModelConfig
    from asyncllm.model.decoder import DecoderForCausalLM
    from asyncllm.model.registry import model_class

    cfg = ModelConfig.from_dict(config)
    family = model_class(cfg.architecture)
    assert issubclass(family, DecoderForCausalLM), f"{family} is not a decoder family"
    options = family.decoder_options(cfg)
    hidden, dim = cfg.hidden_size, cfg.head_dim
    q_rows, kv_rows = cfg.num_attention_heads * dim, cfg.num_key_value_heads * dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_rows, hidden),
            p + "self_attn.k_proj.weight": (kv_rows, hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_rows),
        }
        if options.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (dim,), p + "self_attn.k_norm.weight": (dim,)}
        if options.qkv_bias:
            shapes |= {p + f"self_attn.{x}_proj.bias": (n,)
                       for x, n in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))}  # fmt: skip
        if options.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        shapes |= _mlp_shapes(cfg, i, p + "mlp.", options.mlp_bias)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, hidden)
    return shapes


def _mlp_shapes(cfg: ModelConfig, layer: int, p: str, bias: bool) -> dict[str, tuple[int, ...]]:
    """The MLP of layer `layer`: dense, or (a sparse layer of an MoE model) the router and
    each expert's projections."""
    hidden = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.moe is not None and cfg.moe.is_sparse(layer):
        inter = cfg.moe.moe_intermediate_size
        shapes[p + "gate.weight"] = (cfg.moe.num_experts, hidden)
        for e in range(cfg.moe.num_experts):
            shapes |= _projections(f"{p}experts.{e}.", hidden, inter, bias=False)
        return shapes
    return _projections(p, hidden, cfg.intermediate_size, bias)


def _projections(p: str, hidden: int, inter: int, bias: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        p + "gate_proj.weight": (inter, hidden),
        p + "up_proj.weight": (inter, hidden),
        p + "down_proj.weight": (hidden, inter),
    }
    if bias:
        shapes |= {p + "gate_proj.bias": (inter,), p + "up_proj.bias": (inter,),
                   p + "down_proj.bias": (hidden,)}  # fmt: skip
    return shapes


def _split(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Names in order, cut into runs of at most `shard_bytes` (bf16) each."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _init(
    name: str, shape: tuple[int, ...], std: float, generator: torch.Generator,
    device: str | torch.device,
) -> torch.Tensor:  # fmt: skip
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    values = torch.randn(shape, generator=generator, device=device) * std
    return values.to(torch.bfloat16).cpu()
