"""Llama 2 and 3.x: the plain decoder (rope scaling, GQA and tied heads come from config.json)."""

from __future__ import annotations

from asyncllm.model.config import ModelConfig
from asyncllm.model.decoder import DecoderForCausalLM, DecoderOptions

__all__ = ["LlamaForCausalLM"]


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama; `attention_bias` puts a bias on q/k/v/o, `mlp_bias` on the MLP's projections."""

    @classmethod
    def decoder_options(cls, cfg: ModelConfig) -> DecoderOptions:
        bias = cfg.attention_bias
        return DecoderOptions(qkv_bias=bias, o_bias=bias, mlp_bias=cfg.mlp_bias)
