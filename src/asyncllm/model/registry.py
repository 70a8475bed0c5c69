"""Maps config.json `architectures` names to model classes (imported lazily)."""

from __future__ import annotations

import importlib

from torch import nn

from asyncllm.errors import UnsupportedArchitectureError

__all__ = ["MODEL_REGISTRY", "model_class"]

MODEL_REGISTRY: dict[str, str] = {
    "Qwen3ForCausalLM": "asyncllm.model.qwen3:Qwen3ForCausalLM",
}


def model_class(architecture: str) -> type[nn.Module]:
    """The class implementing `architecture`; `UnsupportedArchitectureError` lists the known ones."""
    target = MODEL_REGISTRY.get(architecture)
    if target is None:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {sorted(MODEL_REGISTRY)}"
        )
    module_name, _, class_name = target.partition(":")
    cls: type[nn.Module] = getattr(importlib.import_module(module_name), class_name)
    return cls
