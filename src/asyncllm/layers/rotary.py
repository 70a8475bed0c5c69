"""Rotary position embedding (the "rotate half" / NeoX layout used by Qwen, Llama, Mistral),
with the rope scalings transformers applies to those families (linear, dynamic NTK, llama3,
YaRN)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from asyncllm.context import current_forward_context

__all__ = ["RopeScaling", "RotaryEmbedding", "rope_inv_freq", "yarn_attention_factor"]


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
    - "yarn": dimensions that turn more than `beta_fast` times over the original context
      (`original_max_position_embeddings`) keep their frequency, those turning fewer than
      `beta_slow` times are divided by `factor`, and a linear ramp blends those between
      (`truncate`: the ramp's ends rounded out to whole dimensions); cos and sin are multiplied
      by `attention_factor`. The frequencies do not depend on the sequence length, so the
      engine serves positions up to original_max_position_embeddings * factor (or
      max_position_embeddings, if that is longer), as vLLM does, and matches transformers at
      every one.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    """cos and sin are multiplied by it (yarn; 1 for the other types)."""
    truncate: bool = True


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their token positions, read from the forward context.

    `cos` / `sin` are float32 tables [max_position, head_dim], built once, with yarn's
    attention factor folded in (so the torch path and the fused kernels both apply it).
    """

    def __init__(
        self, head_dim: int, max_position: int, base: float, scaling: RopeScaling | None = None
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, base, scaling, max_position)
        # Same arithmetic as transformers (position * inv_freq in float32), so angles match.
        freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        # transformers multiplies in float32, before casting to the model's dtype; so do we.
        scale = 1.0 if scaling is None else scaling.attention_factor
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", angles.cos() * scale, persistent=False)
        self.register_buffer("sin", angles.sin() * scale, persistent=False)

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
    wavelength_powers = base**exponents
    inv_freq = 1.0 / wavelength_powers
    if scaling is None or scaling.rope_type == "dynamic":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    if scaling.rope_type == "yarn":
        return _yarn(wavelength_powers, head_dim, base, scaling)
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


def _yarn(
    wavelength_powers: torch.Tensor, head_dim: int, base: float, scaling: RopeScaling
) -> torch.Tensor:
    """YaRN's frequencies: kept where a dimension turns often over the original context,
    divided by `factor` where it turns seldom, linearly blended between (transformers' float32
    operations, in its order)."""
    original = scaling.original_max_position_embeddings
    fast = _dimension_turning(scaling.beta_fast, head_dim, base, original)
    slow = _dimension_turning(scaling.beta_slow, head_dim, base, original)
    if scaling.truncate:
        fast, slow = math.floor(fast), math.ceil(slow)
    ramp_start, ramp_end = max(fast, 0), min(slow, head_dim - 1)
    if ramp_start == ramp_end:
        ramp_end += 0.001  # as transformers: a ramp of width zero would divide by zero
    ramp = (torch.arange(head_dim // 2, dtype=torch.float32) - ramp_start) / (ramp_end - ramp_start)
    kept = 1 - torch.clamp(ramp, 0, 1)  # the share of each dimension's own frequency
    interpolated = 1.0 / (scaling.factor * wavelength_powers)
    extrapolated = 1.0 / wavelength_powers
    return interpolated * (1 - kept) + extrapolated * kept


def _dimension_turning(turns: float, head_dim: int, base: float, positions: int) -> float:
    """The (fractional) rotary dimension whose angle turns `turns` times over `positions`."""
    return (head_dim * math.log(positions / (turns * 2 * math.pi))) / (2 * math.log(base))


def yarn_attention_factor(
    factor: float, mscale: float | None = None, mscale_all_dim: float | None = None
) -> float:
    """YaRN's default multiplier of cos and sin: 0.1 * ln(factor) + 1, or with both `mscale`
    and `mscale_all_dim` set (DeepSeek's configs) (0.1 * mscale * ln(factor) + 1) /
    (0.1 * mscale_all_dim * ln(factor) + 1); 1 for factor <= 1. In float64, in transformers'
    order, so the factor is the same to the bit.

    Example:
        >>> round(yarn_attention_factor(4.0), 6)
        1.138629
    """
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor, 1)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
