"""Random-weight checkpoints for benchmarks: Qwen3-0.6B's or Qwen3-8B's exact shape, no
download needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = ["QWEN3_0_6B", "QWEN3_8B", "SHAPES", "byte_level_tokenizer", "write_random_qwen3"]

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

SHAPES: dict[str, dict[str, Any]] = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-8b": QWEN3_8B}
"""Model shapes by name (`--model-shape` of the benchmarks)."""


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


def write_random_qwen3(
    directory: Path, config: dict[str, Any] = QWEN3_0_6B, seed: int = 0, std: float = 0.02,
    device: str = "cpu",
) -> Path:  # fmt: skip
    """Write config.json, model.safetensors (bf16, transformers' names) and a tokenizer.

    `device="cuda"` draws the weights there (an 8B model in seconds rather than minutes);
    the values then differ from a CPU draw with the same seed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "model.safetensors").is_file():
        return directory
    generator = torch.Generator(device).manual_seed(seed)
    tensors = {name: _init(shape, std, generator) for name, shape in _shapes(config).items()}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config["eos_token_id"]})
    )
    byte_level_tokenizer(config["vocab_size"]).save_pretrained(str(directory))
    return directory


def _init(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norm weights
        return torch.ones(shape, dtype=torch.bfloat16)
    drawn = torch.randn(shape, generator=generator, device=generator.device) * std
    return drawn.to(torch.bfloat16).cpu()


def _shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, heads, kv_heads = (
        cfg["hidden_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
    )
    head_dim, inter = cfg["head_dim"], cfg["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": (head_dim,),
            p + "self_attn.k_norm.weight": (head_dim,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], hidden)
    return shapes
