"""Attention backends behind one interface, chosen by name at engine start-up.

The registry maps a name to "module:Class" and imports lazily, so importing asyncllm never
imports Triton or flash-attn.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

import torch

from asyncllm.errors import ConfigError
from asyncllm.kernels.base import AttentionBackend

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "create_attention_backend", "fused_ops"]

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS: dict[str, str] = {
    "torch": "asyncllm.kernels.torch_ref:TorchAttention",
    "triton": "asyncllm.kernels.triton_attn:TritonAttention",
    "flash_attn": "asyncllm.kernels.flash_attn:FlashAttention",
}


def _load(name: str) -> type[AttentionBackend]:
    module_name, _, class_name = ATTENTION_BACKENDS[name].partition(":")
    backend: type[AttentionBackend] = getattr(importlib.import_module(module_name), class_name)
    return backend


def _try_load(name: str) -> type[AttentionBackend] | None:
    try:
        return _load(name)
    except ImportError:
        return None


def create_attention_backend(
    name: str, device: torch.device, block_size: int, head_dim: int, dtype: torch.dtype
) -> AttentionBackend:
    """Instantiate the backend called `name` ("auto" picks the best one that can run here).

    "auto" on CUDA prefers flash-attn when it imports and the block size suits it, else Triton;
    on CPU it is the torch reference. An explicit name that cannot run raises `ConfigError`.
    """
    shape = (device, block_size, head_dim, dtype)
    if name == "auto":
        for candidate in (["flash_attn", "triton"] if device.type == "cuda" else []) + ["torch"]:
            backend = _try_load(candidate)
            reason = "it does not import" if backend is None else backend.unsupported_reason(*shape)
            if backend is not None and reason is None:
                logger.info("attention backend: %s", candidate)
                return backend()
            logger.info("attention backend %s skipped: %s", candidate, reason)
        raise ConfigError("no attention backend can run this configuration")  # torch always can
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"unknown attention_backend {name!r}; "
            f"choose 'auto' or one of {sorted(ATTENTION_BACKENDS)}"
        )
    try:
        backend = _load(name)
    except ImportError as exc:
        raise ConfigError(f"attention_backend {name!r} cannot be imported: {exc}") from exc
    reason = backend.unsupported_reason(*shape)
    if reason is not None:
        raise ConfigError(f"attention_backend {name!r} cannot run here: {reason}")
    logger.info("attention backend: %s", name)
    return backend()


def fused_ops(tensor: torch.Tensor) -> ModuleType | None:
    """The fused Triton kernels (`triton_fused`) when `tensor` lives on CUDA and Triton
    imports; None means: use the plain torch ops."""
    return _fused_module() if tensor.is_cuda else None


@functools.cache
def _fused_module() -> ModuleType | None:
    try:
        return importlib.import_module("asyncllm.kernels.triton_fused")
    except ImportError:
        logger.info("Triton is not importable: layers use unfused torch ops")
        return None
