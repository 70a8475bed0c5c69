"""Mistral: the plain decoder without any bias, with full attention only.

A checkpoint whose config.json asks for a `sliding_window` is served only while max_model_len
fits inside the window (where sliding and full attention are the same); the runner raises
`ConfigError` otherwise.
"""

from __future__ import annotations

from asyncllm.model.decoder import DecoderForCausalLM

__all__ = ["MistralForCausalLM"]


class MistralForCausalLM(DecoderForCausalLM):
    """Mistral 7B and its kin (no bias anywhere: `DecoderOptions()` as it stands)."""
