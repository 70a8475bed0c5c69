"""Attention backends behind one interface, chosen by name at engine start-up.

The registry maps a name to "module:Class" and imports lazily, so importing asyncllm never
imports Triton or flash-attn. `choose_attention_backend` resolves "auto" from measurements
(the fastest backend measured for the block size and head size, falling back in order) and
checks that an explicitly named backend can serve the model.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType
from typing import NamedTuple

import torch

from asyncllm.errors import ConfigError
from asyncllm.kernels.base import AttentionBackend

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "BackendChoice",
    "choose_attention_backend",
    "create_attention_backend",
    "fused_ops",
    "sm_count",
]

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS: dict[str, str] = {
    "torch": "asyncllm.kernels.torch_ref:TorchAttention",
    "triton": "asyncllm.kernels.triton_attn:TritonAttention",
    "flash_attn": "asyncllm.kernels.flash_attn:FlashAttention",
}

_CUDA_ORDER = ("triton", "flash_attn", "torch")
"""Auto's order on CUDA for shapes nothing was measured on: Triton was faster wherever both
it and flash-attn ran (docs/benchmarks.md), and the torch reference always runs."""

_MEASURED_FASTEST: dict[tuple[int, int], tuple[str, str]] = {
    # (block_size, head_dim): (fastest backend, the evidence). Only shapes both fast backends
    # can run are listed (flash-attn's paged path needs block_size % 256 == 0). Numbers are
    # output tok/s on the nano-vllm workload (`asyncllm bench throughput`), recorded with
    # their commands in docs/benchmarks.md, "Attention backends".
    (256, 128): (
        "triton",
        "nano-vllm workload, H200, 2026-11-22, one run: Triton 26,070 tok/s, "
        "flash-attn 22,687 (decode CUDA graphs)",
    ),
}


class BackendChoice(NamedTuple):
    """The attention backend an engine will run, and why."""

    name: str
    reason: str


def choose_attention_backend(
    name: str,
    device: torch.device,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype | None = None,
) -> BackendChoice:
    """Resolve `name` ("auto" or a registry name) for this device and model shape;
    `kv_dtype` is what the KV cache stores (None: `dtype`).

    "auto" takes the fastest backend measured for (block_size, head_dim) on CUDA, or
    Triton where nothing was measured, skipping any that cannot run here; off CUDA it is the
    torch reference.

    Raises:
        ConfigError: for an unknown name, or a named backend that cannot serve this
            configuration (the message lists every reason).
    """
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    if name == "auto":
        return _choose_auto(device, block_size, head_dim, dtype, kv_dtype)
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"unknown attention_backend {name!r}; "
            f"choose 'auto' or one of {sorted(ATTENTION_BACKENDS)}"
        )
    try:
        backend = _load(name)
    except ImportError as exc:
        raise ConfigError(f"attention_backend {name!r} cannot be imported: {exc}") from exc
    reason = backend.unsupported_reason(device, block_size, head_dim, dtype, kv_dtype)
    if reason is not None:
        cache = "" if kv_dtype == dtype else f", KV cache {kv_dtype}"
        raise ConfigError(
            f"attention_backend {name!r} cannot serve this model (block_size {block_size}, "
            f"head_dim {head_dim}, {dtype}{cache}, {device}): {reason}"
        )
    return BackendChoice(name, "asked for in EngineConfig.attention_backend")


def create_attention_backend(
    name: str,
    device: torch.device,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype | None = None,
) -> AttentionBackend:
    """Instantiate the backend `choose_attention_backend` picks, logging the choice and why."""
    choice = choose_attention_backend(name, device, block_size, head_dim, dtype, kv_dtype)
    logger.info("attention backend: %s (%s)", choice.name, choice.reason)
    return _load(choice.name)()


def _choose_auto(
    device: torch.device, block_size: int, head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype
) -> BackendChoice:
    order, why = _auto_order(device, block_size, head_dim)
    skipped: list[str] = []
    for candidate in order:
        backend = _try_load(candidate)
        reason = (
            "it does not import"
            if backend is None
            else backend.unsupported_reason(device, block_size, head_dim, dtype, kv_dtype)
        )
        if reason is None:
            if skipped:
                why = f"{why}; skipped {'; '.join(skipped)}"
            return BackendChoice(candidate, f"auto: {why}")
        skipped.append(f"{candidate} ({reason})")
    raise ConfigError(f"no attention backend can run this configuration: {'; '.join(skipped)}")


def _auto_order(device: torch.device, block_size: int, head_dim: int) -> tuple[list[str], str]:
    """Candidates for "auto", best first, and the reason for that order."""
    if device.type != "cuda":
        return ["torch"], f"the torch reference is the only backend on {device.type}"
    measured = _MEASURED_FASTEST.get((block_size, head_dim))
    if measured is None:
        return list(_CUDA_ORDER), (
            f"no measurement at block_size {block_size}, head_dim {head_dim}: "
            f"the CUDA order {'/'.join(_CUDA_ORDER)}"
        )
    fastest, evidence = measured
    order = [fastest, *(n for n in _CUDA_ORDER if n != fastest)]
    return order, (
        f"{fastest} measured fastest at block_size {block_size}, head_dim {head_dim} "
        f"({evidence}; docs/benchmarks.md)"
    )


def _load(name: str) -> type[AttentionBackend]:
    module_name, _, class_name = ATTENTION_BACKENDS[name].partition(":")
    backend: type[AttentionBackend] = getattr(importlib.import_module(module_name), class_name)
    return backend


def _try_load(name: str) -> type[AttentionBackend] | None:
    try:
        return _load(name)
    except ImportError:
        return None


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


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`, which the Triton kernels size their grids by (a
    nominal 1 off CUDA, e.g. under the Triton interpreter)."""
    if device.type != "cuda":
        return 1
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count_of(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)
