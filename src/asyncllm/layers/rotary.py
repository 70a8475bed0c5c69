"""Rotary position embedding (the "rotate half" / NeoX layout used by Qwen, Llama, Mistral),
with the rope scalings transformers applies to those families (linear, dynamic NTK, llama3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from asyncllm.context import current_forward_context

__all__ = ["RopeScaling", "RotaryEmbedding", "rope_inv_freq"]


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """How the rotary frequencies are rescaled (config.json's `rope_scaling`, or
    `rope_parameters` as transformers 5 writes it).

    - "linear": every frequency divided by `factor`.
    - "llama3": long wavelengths divided by `factor`, short ones kept, a smooth blend between
      (`low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
    - "dynamic" (NTK): transformers recomputes the frequencies from the current sequence
      length once it passes max_position_embeddings, which a KV cache written with the old
      frequencies cannot follow. Up to max_position_embeddings its frequencies are fixed, and
      the engine never serves positions past it (max_model_len is capped there), so every
      position served matches transformers exactly; `factor` buys no longer context.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their token positions, read from the forward context.

    `cos` / `sin` are float32 tables [max_position, head_dim], built once.
    """

    def __init__(
        self, head_dim: int, max_position: int, base: float, scaling: RopeScaling | None = None
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, base, scaling, max_position)
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


def rope_inv_freq(
    head_dim: int, base: float, scaling: RopeScaling | None, max_position: int
) -> torch.Tensor:
    """The float32 inverse frequencies [head_dim / 2], computed with transformers' float32
    operations in transformers' order, so the angles agree to the last bit.

    Example:
        >>> rope_inv_freq(4, 10000.0, None, 16)
        tensor([1.0000, 0.0100])
    """
    if scaling is not None and scaling.rope_type == "dynamic":
        # NTK: the base grows with the sequence length; at max_position_embeddings (the
        # longest the engine serves) transformers' formula gives this base.
        factor = scaling.factor
        stretch = (factor * max_position / max_position) - (factor - 1)
        base = base * stretch ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None or scaling.rope_type == "dynamic":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    raise ValueError(f"rope type {scaling.rope_type!r} is not one this layer computes")


def _llama3(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's scaling: wavelengths longer than original / low_freq_factor are stretched
    by `factor`, shorter than original / high_freq_factor kept, and those between blended."""
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    original = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    long_wave = original / low
    short_wave = original / high
    stretched = torch.where(wavelength > long_wave, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    between = (wavelength >= short_wave) & (wavelength <= long_wave)
    return torch.where(between, blended, stretched)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
