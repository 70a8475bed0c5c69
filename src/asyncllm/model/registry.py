"""Maps config.json `architectures` names to model classes (imported lazily)."""

from __future__ import annotations

import importlib

from asyncllm.errors import UnsupportedArchitectureError
from asyncllm.model.base import CausalLM

__all__ = ["MODEL_REGISTRY", "model_class"]

MODEL_REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "asyncllm.model.llama:LlamaForCausalLM",
    "MistralForCausalLM": "asyncllm.model.mistral:MistralForCausalLM",
    "Qwen2ForCausalLM": "asyncllm.model.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "asyncllm.model.qwen3:Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM": "asyncllm.model.qwen3_moe:Qwen3MoeForCausalLM",
}


def model_class(architecture: str) -> type[CausalLM]:
    """The class implementing `architecture`.

    Raises `UnsupportedArchitectureError`, listing the supported names, for any other.
    """
    target = MODEL_REGISTRY.get(architecture)
    if target is None:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {sorted(MODEL_REGISTRY)}"
        )
    module_name, _, class_name = target.partition(":")
    cls: type[CausalLM] = getattr(importlib.import_module(module_name), class_name)
    return cls
