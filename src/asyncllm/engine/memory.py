"""Checks around the engine's big allocations (KV pool, model tables).

An allocation that cannot succeed becomes a `ConfigError` naming its size in bytes and the
setting to change, rather than a raw allocator `RuntimeError` after the fact, or, on a host
that overcommits memory, a visit from the OOM killer while the pages are being zeroed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from asyncllm.errors import ConfigError

__all__ = ["allocation_errors", "available_bytes", "require_fits"]


def available_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on `device` can take now; None when that cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory torch has cached but does not use is free to it as well.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        return _host_available_bytes()
    return None


def _host_available_bytes() -> int | None:
    # MemAvailable counts the page cache the kernel would give back, unlike "free" memory.
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def require_fits(nbytes: int, device: torch.device, what: str, remedy: str) -> None:
    """Raise `ConfigError` when `what` (`nbytes` bytes) cannot fit on `device` now.

    Example message: "the KV pool (num_kv_blocks=100000000) needs 1638400000000 bytes, but
    only 20132659200 bytes are available on cpu; lower num_kv_blocks".
    """
    available = available_bytes(device)
    if available is not None and nbytes > available:
        raise ConfigError(
            f"{what} needs {nbytes} bytes, but only {available} bytes are available on "
            f"{device}; {remedy}"
        )


@contextlib.contextmanager
def allocation_errors(device: torch.device, what: str, remedy: str) -> Iterator[None]:
    """Turn an allocation failure inside the block into `ConfigError` naming `what` (with
    its size) and `remedy`: the fallback for what `require_fits` could not foresee
    (fragmentation, other processes, sizes not known in advance)."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too
        if not isinstance(exc, torch.OutOfMemoryError) and "allocate" not in str(exc):
            raise
        raise ConfigError(f"allocating {what} on {device} failed ({exc}); {remedy}") from exc
