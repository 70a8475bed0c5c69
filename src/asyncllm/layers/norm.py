"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from asyncllm.kernels import fused_ops

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32.

    `forward(x, residual)` first adds `residual` to `x` and returns (normed, new_residual), the
    pattern of pre-norm decoder layers; `forward(x)` returns only the normed tensor.
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast before scaling, as transformers does, so low-precision results match it.
        return self.weight * x32.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        fused = fused_ops(x)
        if fused is not None:  # one kernel instead of ~9 small ones
            if residual is None:
                return fused.rms_norm(x, self.weight, self.eps)  # type: ignore[no-any-return]
            return fused.add_rms_norm(x, residual, self.weight, self.eps)  # type: ignore[no-any-return]
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual
