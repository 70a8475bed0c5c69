"""The pre-norm decoder every supported family shares, parameterised by what differs.

Llama, Mistral, Qwen2, Qwen3 and Qwen3-MoE are one structure: token embedding, N layers of
(RMSNorm -> GQA attention with rotary -> residual, RMSNorm -> MLP -> residual), a final
RMSNorm and an LM head (tied to the embedding or not). They differ only in

- `DecoderOptions`: per-head q/k RMSNorm (Qwen3), bias on q/k/v (Qwen2, or `attention_bias`)
  and on o_proj (`attention_bias`), bias in the MLP (Llama's `mlp_bias`);
- the MLP of each layer (`DecoderForCausalLM.build_mlp`): dense SwiGLU, or experts;
- the rope scaling, read from config.json by `ModelConfig` for all of them alike.

Module names follow transformers' checkpoints, except q/k/v packed into `qkv_proj` and
gate/up into `gate_up_proj` (see `DecoderForCausalLM.packed_modules`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch
from torch import nn

from asyncllm.context import current_forward_context
from asyncllm.kernels import fused_ops
from asyncllm.layers import between_layers
from asyncllm.layers.activation import SiluAndMul
from asyncllm.layers.attention import PagedAttention
from asyncllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from asyncllm.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from asyncllm.layers.norm import RMSNorm
from asyncllm.layers.rotary import RotaryEmbedding
from asyncllm.model.base import CausalLM
from asyncllm.model.config import ModelConfig
from asyncllm.parallel import TPGroup

__all__ = [
    "DecoderForCausalLM",
    "DecoderLayer",
    "DecoderModel",
    "DecoderOptions",
    "GatedMLP",
    "SelfAttention",
]


@dataclass(frozen=True, slots=True)
class DecoderOptions:
    """What a family's decoder layers have that the plain (Llama) structure has not."""

    qk_norm: bool = False
    """Per-head RMSNorm of q and k before rotary (Qwen3)."""
    qkv_bias: bool = False
    """Bias on the q, k and v projections."""
    o_bias: bool = False
    """Bias on the output projection."""
    mlp_bias: bool = False
    """Bias on the dense MLP's projections."""


class SelfAttention(nn.Module):
    """Attention over this rank's heads: q/k/v split by heads, o_proj summed across ranks."""

    def __init__(
        self, cfg: ModelConfig, options: DecoderOptions, rotary: RotaryEmbedding, tp: TPGroup
    ) -> None:
        super().__init__()
        dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, dim, tp,
            bias=options.qkv_bias,
        )  # fmt: skip
        # This rank's heads (at world size 1: all of them).
        self.heads, self.kv_heads, self.dim = (
            self.qkv_proj.num_heads,
            self.qkv_proj.num_kv_heads,
            dim,
        )
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * dim, cfg.hidden_size, tp, bias=options.o_bias
        )
        self.q_norm = RMSNorm(dim, cfg.rms_norm_eps) if options.qk_norm else None
        self.k_norm = RMSNorm(dim, cfg.rms_norm_eps) if options.qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(self.heads, self.kv_heads, dim, scale=dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        fused = fused_ops(qkv)
        if fused is not None:  # one kernel: q/k norm, rotary, and k/v into this layer's cache
            out = self.attn(self._fused_q(fused, qkv), None, None)
        else:
            q, k = self._rotated_qk(qkv)
            v = self.qkv_proj.split(qkv)[2].view(-1, self.kv_heads, self.dim)
            out = self.attn(q, k, v)
        projected: torch.Tensor = self.o_proj(out.flatten(1))
        return projected

    def _fused_q(self, fused: ModuleType, qkv: torch.Tensor) -> torch.Tensor:
        """q, normed per head (when the family norms them) and rotated; k likewise, written
        with v to the cache slots of this step's tokens."""
        ctx = current_forward_context()
        q_weight = None if self.q_norm is None else self.q_norm.weight
        k_weight = None if self.k_norm is None else self.k_norm.weight
        eps = 0.0 if self.q_norm is None else self.q_norm.eps
        cache = (self.attn.k_cache, self.attn.v_cache, ctx.slot_mapping)
        q, _ = fused.qk_norm_rope(
            qkv, self.heads, self.kv_heads, self.dim, q_weight, k_weight, eps,
            self.rotary.cos, self.rotary.sin, ctx.positions, cache,
        )  # fmt: skip
        return q  # type: ignore[no-any-return]

    def _rotated_qk(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k, normed per head (when the family norms them), then rotated (torch ops)."""
        q, k, _ = self.qkv_proj.split(qkv)
        q = q.reshape(-1, self.heads, self.dim)
        k = k.reshape(-1, self.kv_heads, self.dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rotated: tuple[torch.Tensor, torch.Tensor] = self.rotary(q, k)
        return rotated


class GatedMLP(nn.Module):
    """SwiGLU over this rank's slice of the intermediate features."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TPGroup, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, {"gate": intermediate_size, "up": intermediate_size}, tp, bias=bias
        )
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(self.act(self.gate_up_proj(x)))
        return out


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; the residual add is fused into the next norm."""

    def __init__(self, cfg: ModelConfig, self_attn: SelfAttention, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Embedding, the decoder layers (one rotary table shared by all) and the final norm."""

    def __init__(self, cfg: ModelConfig, layers: list[DecoderLayer], tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual)
            between_layers()
        hidden: torch.Tensor
        hidden, _ = self.norm(x, residual)
        return hidden


class DecoderForCausalLM(CausalLM):
    """A decoder family: subclasses say what differs (`decoder_options`, `build_mlp`).

    Example (a family file is about this long):
        >>> class MyLlama(DecoderForCausalLM):
        ...     @classmethod
        ...     def decoder_options(cls, cfg: ModelConfig) -> DecoderOptions:
        ...         return DecoderOptions(qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias)
    """

    # checkpoint projection name -> (packed module, shard)
    packed_modules: ClassVar[dict[str, tuple[str, str]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__(cfg, tp)
        options = self.decoder_options(cfg)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.position_limit, cfg.rope_theta, cfg.rope_scaling)
        layers = [
            DecoderLayer(cfg, SelfAttention(cfg, options, rotary, tp), self.build_mlp(cfg, i, tp))
            for i in range(cfg.num_hidden_layers)
        ]
        self.model = DecoderModel(cfg, layers, tp)
        tied = self.model.embed_tokens.weight if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tp, tied_weight=tied)

    @classmethod
    def decoder_options(cls, cfg: ModelConfig) -> DecoderOptions:
        """The family's `DecoderOptions` for this checkpoint (default: plain Llama layers)."""
        return DecoderOptions()

    @classmethod
    def build_mlp(cls, cfg: ModelConfig, layer: int, tp: TPGroup) -> nn.Module:
        """The MLP of decoder layer `layer` (default: dense SwiGLU of intermediate_size)."""
        bias = cls.decoder_options(cfg).mlp_bias
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp, bias=bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, hidden]."""
        hidden: torch.Tensor = self.model(input_ids)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [S, vocab] for the rows named by the context's `logits_indices`."""
        logits: torch.Tensor = self.lm_head(hidden)
        return logits
