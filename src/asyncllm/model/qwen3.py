"""Qwen3: grouped-query attention with a per-head RMSNorm of q and k before rotary."""

from __future__ import annotations

from asyncllm.model.config import ModelConfig
from asyncllm.model.decoder import DecoderForCausalLM, DecoderOptions

__all__ = ["Qwen3ForCausalLM"]


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Qwen3 with transformers' tensor names, except the packed qkv_proj and gate_up_proj."""

    @classmethod
    def decoder_options(cls, cfg: ModelConfig) -> DecoderOptions:
        bias = cfg.attention_bias
        return DecoderOptions(qk_norm=True, qkv_bias=bias, o_bias=bias)
