"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.kernels import fused_ops

__all__ = ["SiluAndMul"]


class SiluAndMul(nn.Module):
    """silu(gate) * up, where the input is the packed [..., 2 * d] gate_up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_ops(x)
        if fused is not None:
            return fused.silu_and_mul(x)  # type: ignore[no-any-return]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
