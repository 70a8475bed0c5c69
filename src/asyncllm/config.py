"""`EngineConfig`: every knob of an engine, frozen and validated when it is built."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from asyncllm.errors import ConfigError
from asyncllm.validation import (
    MAX_INT32,
    MAX_INT64,
    MAX_SEED,
    as_finite_float,
    as_int,
    show_bound,
)

__all__ = ["ATTENTION_BACKEND_NAMES", "KV_CACHE_DTYPES", "EngineConfig"]

ATTENTION_BACKEND_NAMES = ("auto", "torch", "triton", "flash_attn")
"""Valid `EngineConfig.attention_backend` values ("auto" plus `asyncllm.kernels`' registry)."""

MAX_DECODE_STEPS = 64
"""Largest `EngineConfig.num_decode_steps`: longer runs save nothing measurable and hold
streams' tokens back longer."""

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

KV_CACHE_DTYPES = ("auto", "fp8")
"""Valid `EngineConfig.kv_cache_dtype` values ("fp8_e4m3" and torch.float8_e4m3fn are also
accepted, stored as "fp8")."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How an engine loads its model and schedules work.

    Build it directly or through `AsyncEngine.from_pretrained(path, **overrides)`; unknown or
    invalid fields raise `ConfigError` naming the field and value. Every field is checked for
    its type (booleans are not numbers, strings are not booleans) and for the range the
    engine's tensors can hold: counts of tokens, sequences and blocks at most 2**31 - 1.

    Example:
        >>> cfg = EngineConfig(max_num_seqs=8, block_size=16, device="cpu")
        >>> cfg.replace(seed=1).seed
        1
    """

    model: str | None = None
    """Directory with config.json, *.safetensors and a tokenizer (a str or a Path); None is the
    embedded model."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N". A `torch.device`, an
    int N (meaning "cuda:N", as in torch) and None ("auto") are accepted and stored as such."""
    dtype: str = "auto"
    """"auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16" (or the
    torch.dtype itself)."""
    max_num_seqs: int = 256
    """Most requests decoded together in one step."""
    max_num_batched_tokens: int = 16384
    """Token budget of one step; longer prompts are prefilled in chunks of at most this.
    (16384 rather than 8192: prefill steps are launched eagerly, and on an H200 the launch of
    an 8192-token step took as long as the step itself; docs/benchmarks.md.)"""
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
    kv_cache_dtype: str = "auto"
    """What the KV cache stores: "auto" (the compute dtype) or "fp8" (float8 e4m3: half the
    bytes of bf16, so twice the tokens in the same memory, and a few percent faster decoding
    on an H200: docs/benchmarks.md). Keys and values are stored unscaled (scale 1.0, as vLLM
    does without calibration): values beyond +-448 saturate and those below ~0.002 round to
    zero, so outputs differ slightly from "auto". Needs the Triton backend on a GPU of
    compute capability 8.9 or newer, or the torch reference (any device)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of earlier requests that share a prompt prefix."""
    attention_backend: str = "auto"
    """"auto" (the fastest measured for the block size and head size that can run here; the
    choice and its reason are logged), "triton", "flash_attn" (CUDA, fp16/bf16, block_size a
    multiple of 256, a head size the installed flash-attn compiled) or "torch" (the
    reference). A named backend that cannot serve the model raises `ConfigError` at start-up."""
    enforce_eager: bool = False
    """Disable CUDA graphs (they are never used on CPU)."""
    overlap_scheduling: bool | None = None
    """Schedule step N+1 while the device runs step N; None: on for CUDA, off for CPU."""
    num_decode_steps: int = 1
    """Decode steps one launch may run (multi-step decode, at most 64): when every running
    request is decoding, none can join, and none reaches its token limit, min_tokens or
    needs penalties within that many steps, the device runs them back to back, feeding each
    step's tokens to the next, and the host processes their tokens in one pass. Outputs are
    the same as with 1 (a request that stops mid-run drops the tokens drawn after its stop);
    the host's cost per step shrinks by about this factor, and streams get tokens this many
    at a time."""
    seed: int = 0
    """Seed of the engine's sampling, in [0, 2**64); requests without their own seed draw one
    from it."""
    max_waiting_requests: int | None = None
    """Most sequences waiting for admission; a submission finding the queue full raises
    `EngineOverloadedError` (counted in `EngineStats.num_rejected_overloaded`). None: no limit."""
    tensor_parallel_size: int = 1
    """Ranks (GPUs) each layer is split across: rank 0 runs in this process, ranks 1..N-1 in
    worker processes it spawns (or that `torchrun` started); see README, "Tensor parallelism"."""
    peer_all_reduce: bool = False
    """With tensor parallelism on GPUs of one host: take the forward pass's small sums (up
    to 4 MiB) over peer memory, torch symmetric memory's one-shot all-reduce, instead of
    NCCL (3x faster a sum; on two H200s 4% off the per-token latency at batch 1). Opt-in:
    with torch 2.11 a process that used it aborts at exit, after the engine closed ("terminate
    called without an active exception", exit status 134), and only the first TP engine of a
    process gets it (later ones fall back to NCCL)."""

    def __post_init__(self) -> None:
        # Values that name the same thing in another spelling (a Path, torch.device("cpu"),
        # torch.float16, a numpy int) are stored in the one form the fields document.
        self._normalise("model", _model_path)
        self._normalise("device", _device_name)
        self._normalise("dtype", _dtype_name)
        self._normalise("kv_cache_dtype", _kv_cache_dtype_name)
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "tensor_parallel_size",
        ):
            self._normalise(name, _bounded_int(name, MAX_INT32))
        self._normalise("num_decode_steps", _bounded_int("num_decode_steps", MAX_DECODE_STEPS))
        for name in ("max_model_len", "num_kv_blocks", "max_waiting_requests"):
            self._normalise(name, _optional(_bounded_int(name, MAX_INT32)))
        self._normalise("kv_cache_bytes", _optional(_bounded_int("kv_cache_bytes", MAX_INT64)))
        self._normalise("seed", _bounded_int("seed", MAX_SEED, minimum=0))
        self._normalise("gpu_memory_utilization", _memory_fraction)
        for name in ("enable_prefix_caching", "enforce_eager", "peer_all_reduce"):
            _require_bool(name, getattr(self, name))
        if self.overlap_scheduling is not None:
            _require_bool("overlap_scheduling", self.overlap_scheduling)
        if self.attention_backend not in ATTENTION_BACKEND_NAMES:
            raise ConfigError(
                f"attention_backend must be one of {list(ATTENTION_BACKEND_NAMES)}, "
                f"got {self.attention_backend!r}"
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

    def _normalise(self, name: str, check: Callable[[Any], Any]) -> None:
        """Store `check(value)`, which raises `ConfigError` for a bad value."""
        object.__setattr__(self, name, check(getattr(self, name)))

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
        """The device this config resolves to ("auto" picks CUDA when it is available).

        Raises `ConfigError` when the device asked for does not exist on this machine.
        """
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} was asked for, but CUDA is not available")
        if device.type == "cuda" and device.index is not None:
            count = torch.cuda.device_count()
            if device.index >= count:
                raise ConfigError(
                    f"device {self.device!r} was asked for, but this machine has {count} CUDA "
                    f"device(s): cuda:0 to cuda:{count - 1}"
                )
        return device

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The compute dtype on `device` ("auto" is bfloat16 on CUDA and float32 on CPU)."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]

    def kv_torch_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the KV cache stores on `device` (the compute dtype unless "fp8")."""
        if self.kv_cache_dtype == "fp8":
            return torch.float8_e4m3fn
        return self.torch_dtype(device)


def _model_path(value: object) -> str | None:
    if value is None:
        return None
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if isinstance(path, str) and path:
        return path
    raise ConfigError(f"model must be a directory path (str or os.PathLike) or None, got {value!r}")


_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def _device_name(value: object) -> str:
    """The device as "auto", "cpu", "cuda" or "cuda:N", from those strings, a torch.device, an
    int N (a CUDA index, as torch reads it) or None ("auto")."""
    if value is None:
        return "auto"
    name, index = value, as_int(value)
    if isinstance(value, torch.device):
        name = str(value)
    elif index is not None and index >= 0:
        name = f"cuda:{index}"
    if isinstance(name, str) and _DEVICE_PATTERN.fullmatch(name):
        return name if ":" not in name else f"cuda:{int(name[5:])}"
    raise ConfigError(
        f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', a torch.device of those, a CUDA "
        f"index or None, got {value!r}"
    )


def _dtype_name(value: object) -> str:
    """The dtype as "auto" or a name in _DTYPES, from the name or the torch.dtype itself."""
    if isinstance(value, torch.dtype):
        value = next((name for name, dtype in _DTYPES.items() if dtype == value), value)
    if isinstance(value, str) and (value == "auto" or value in _DTYPES):
        return value
    raise ConfigError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {value!r}")


def _kv_cache_dtype_name(value: object) -> str:
    if value in ("fp8_e4m3", torch.float8_e4m3fn):
        return "fp8"
    if isinstance(value, str) and value in KV_CACHE_DTYPES:
        return value
    raise ConfigError(
        f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)} (or 'fp8_e4m3'), got {value!r}"
    )


def _bounded_int(name: str, maximum: int, minimum: int = 1) -> Callable[[object], int]:
    """A check that `value` is an int (never a bool) in [minimum, maximum]: the limits are
    what the tensors holding it can represent (int32 positions and block ids, int64 bytes)."""

    def check(value: object) -> int:
        number = as_int(value)
        if number is None or not minimum <= number <= maximum:
            raise ConfigError(
                f"{name} must be an int in [{minimum}, {show_bound(maximum)}], got {value!r}"
            )
        return number

    return check


def _optional(check: Callable[[object], int]) -> Callable[[object], int | None]:
    return lambda value: None if value is None else check(value)


def _memory_fraction(value: object) -> float:
    fraction = as_finite_float(value)
    if fraction is None or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"gpu_memory_utilization must be a number in (0, 1], got {value!r}")
    return fraction


def _require_bool(name: str, value: object) -> None:
    # A string such as "false" is truthy: accepting it would silently mean True.
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be a bool, got {value!r}")
