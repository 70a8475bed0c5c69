"""Rotary position embedding (the "rotate half" / NeoX layout used by Qwen and Llama)."""

from __future__ import annotations

import torch
from torch import nn

from asyncllm.context import current_forward_context

__all__ = ["RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their token positions, read from the forward context."""

    def __init__(self, head_dim: int, max_position: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        # Same arithmetic as transformers (position * inv_freq in float32), so angles match.
        freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D] -> both rotated."""
        positions = current_forward_context().positions
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
