"""`EngineConfig`: every knob of an engine, frozen and validated when it is built."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

import torch

from asyncllm.errors import ConfigError

__all__ = ["EngineConfig"]

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How an engine loads its model and schedules work.

    Build it directly or through `AsyncEngine.from_pretrained(path, **overrides)`; unknown or
    invalid fields raise `ConfigError` naming the field.

    Example:
        >>> cfg = EngineConfig(max_num_seqs=8, block_size=16, device="cpu")
        >>> cfg.replace(seed=1).seed
        1
    """

    model: str | None = None
    """Directory with config.json, *.safetensors and a tokenizer; None is the embedded model."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""
    dtype: str = "auto"
    """"auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16"."""
    max_num_seqs: int = 256
    """Most requests decoded together in one step."""
    max_num_batched_tokens: int = 8192
    """Token budget of one step; longer prompts are prefilled in chunks of at most this."""
    max_model_len: int | None = None
    """Longest prompt + output; None takes the model's limit, capped by the KV pool."""
    block_size: int = 16
    """Tokens per KV-cache block (the prefix-cache granularity)."""
    num_kv_blocks: int | None = None
    """Explicit KV pool size in blocks; None sizes the pool from memory."""
    gpu_memory_utilization: float = 0.90
    """Fraction of GPU memory the engine may use in all (weights, activations, KV pool)."""
    kv_cache_bytes: int | None = None
    """Explicit KV pool size in bytes (default on CPU: 1 GiB); ignored if num_kv_blocks is set."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of earlier requests that share a prompt prefix."""
    attention_backend: str = "auto"
    """"auto", "torch", "triton" or "flash_attn"."""
    enforce_eager: bool = False
    """Disable CUDA graphs (they are never used on CPU)."""
    overlap_scheduling: bool | None = None
    """Schedule step N+1 while the device runs step N; None: on for CUDA, off for CPU."""
    seed: int = 0
    """Seed of the engine's sampling; requests without their own seed draw one from it."""
    max_waiting_requests: int | None = None
    """Most sequences waiting for admission; a submission finding the queue full raises
    `EngineOverloadedError` (counted in `EngineStats.num_rejected_overloaded`). None: no limit."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            _require_positive_int(name, getattr(self, name))
        for name in ("max_model_len", "num_kv_blocks", "kv_cache_bytes", "max_waiting_requests"):
            value = getattr(self, name)
            if value is not None:
                _require_positive_int(name, value)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ConfigError(
                f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Every running decode must fit one step, or one could skip a step (and a token
            # drawn on the device would lose track of the step that drew it).
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if not isinstance(self.attention_backend, str):
            raise ConfigError(f"attention_backend must be a string, got {self.attention_backend!r}")

    def replace(self, **overrides: Any) -> EngineConfig:
        """A copy with `overrides` applied; an unknown field raises `ConfigError`."""
        known = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(f"unknown EngineConfig field {key!r}{extra}")
        return dataclasses.replace(self, **overrides)

    def pipeline_depth(self, device: torch.device) -> int:
        """Steps in flight at once: 2 with overlapped scheduling (the device runs step N while
        the CPU processes N-1 and prepares N+1), else 1. (3 measured no faster on an H100 and
        made the event loop's lag worse.)"""
        overlap = self.overlap_scheduling
        if overlap is None:
            overlap = device.type == "cuda"
        return 2 if overlap else 1

    def torch_device(self) -> torch.device:
        """The device this config resolves to ("auto" picks CUDA when it is available)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} was asked for, but CUDA is not available")
        return device

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The compute dtype on `device` ("auto" is bfloat16 on CUDA and float32 on CPU)."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]


def _require_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
