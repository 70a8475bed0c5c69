"""Qwen2 and Qwen2.5: the plain decoder with a bias on q, k and v (not on o_proj)."""

from __future__ import annotations

from asyncllm.model.config import ModelConfig
from asyncllm.model.decoder import DecoderForCausalLM, DecoderOptions

__all__ = ["Qwen2ForCausalLM"]


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2 / Qwen2.5 (no q/k norm; the q/k/v bias is unconditional, as in transformers)."""

    @classmethod
    def decoder_options(cls, cfg: ModelConfig) -> DecoderOptions:
        return DecoderOptions(qkv_bias=True)
