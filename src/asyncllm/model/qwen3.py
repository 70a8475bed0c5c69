"""Qwen3 causal LM (grouped-query attention with per-head q/k RMSNorm) on a paged KV cache."""

from __future__ import annotations

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

__all__ = ["Qwen3ForCausalLM"]


class Qwen3Attention(nn.Module):
    """Attention over this rank's heads: q/k/v split by heads, o_proj summed across ranks."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, tp: TPGroup) -> None:
        super().__init__()
        dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, dim, tp,
            bias=cfg.attention_bias,
        )  # fmt: skip
        # This rank's heads (at world size 1: all of them).
        self.heads, self.kv_heads, self.dim = (
            self.qkv_proj.num_heads,
            self.qkv_proj.num_kv_heads,
            dim,
        )
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * dim, cfg.hidden_size, tp, bias=cfg.attention_bias
        )
        self.q_norm = RMSNorm(dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(dim, cfg.rms_norm_eps)
        self.rotary = rotary
        self.attn = PagedAttention(self.heads, self.kv_heads, dim, scale=dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k = self._normed_rotated_qk(qkv)
        v = self.qkv_proj.split(qkv)[2].view(-1, self.kv_heads, self.dim)
        out = self.attn(q, k, v)
        projected: torch.Tensor = self.o_proj(out.flatten(1))
        return projected

    def _normed_rotated_qk(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head RMSNorm of q and k, then rotary: one fused kernel on CUDA."""
        fused = fused_ops(qkv)
        if fused is not None:
            return fused.qk_norm_rope(  # type: ignore[no-any-return]
                qkv, self.heads, self.kv_heads, self.dim, self.q_norm.weight,
                self.k_norm.weight, self.q_norm.eps, self.rotary.cos, self.rotary.sin,
                current_forward_context().positions,
            )  # fmt: skip
        q, k, _ = self.qkv_proj.split(qkv)
        q = self.q_norm(q.reshape(-1, self.heads, self.dim))
        k = self.k_norm(k.reshape(-1, self.kv_heads, self.dim))
        rotated: tuple[torch.Tensor, torch.Tensor] = self.rotary(q, k)
        return rotated


class Qwen3MLP(nn.Module):
    """SwiGLU over this rank's slice of the intermediate features."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, {"gate": size, "up": size}, tp, bias=False
        )
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, tp, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(self.act(self.gate_up_proj(x)))
        return out


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, tp: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg, rotary, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg, tp)

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


class Qwen3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(cfg, rotary, tp) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual)
            between_layers()
        hidden: torch.Tensor
        hidden, _ = self.norm(x, residual)
        return hidden


class Qwen3ForCausalLM(CausalLM):
    """Qwen3 with transformers' tensor names, except the packed qkv_proj and gate_up_proj."""

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
        self.model = Qwen3Model(cfg, tp)
        tied = self.model.embed_tokens.weight if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tp, tied_weight=tied)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, hidden]."""
        hidden: torch.Tensor = self.model(input_ids)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [S, vocab] for the rows named by the context's `logits_indices`."""
        logits: torch.Tensor = self.lm_head(hidden)
        return logits
