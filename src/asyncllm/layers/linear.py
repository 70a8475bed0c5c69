"""Linear layers, including the packed projections (qkv, gate_up) that save GEMM launches."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PackedLinear"]


class PackedLinear(nn.Linear):
    """One linear layer whose output rows are several named projections stacked in order.

    Checkpoints store the projections separately (q_proj, k_proj, v_proj); `shard_slice`
    tells the loader where each one lives in the packed weight.

    Example:
        >>> qkv = PackedLinear(64, {"q": 64, "k": 32, "v": 32}, bias=False)
        >>> qkv.shard_slice("k")
        slice(64, 96, None)
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shard_sizes = dict(shards)
        offsets, start = {}, 0
        for name, size in shards.items():
            offsets[name] = slice(start, start + size)
            start += size
        self._slices = offsets

    def shard_slice(self, shard: str) -> slice:
        """Rows of the packed weight (and bias) that hold `shard`."""
        return self._slices[shard]

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split a packed output back into its projections, in declaration order."""
        return torch.split(output, list(self.shard_sizes.values()), dim=-1)
