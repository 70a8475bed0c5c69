"""Linear layers split across tensor-parallel ranks, and packed projections (qkv, gate_up).

- `ColumnParallelLinear`: each rank computes a slice of the output features; no collective.
- `MergedColumnParallelLinear`: several column-parallel projections in one GEMM (gate and
  up), each split across ranks; checkpoints store them separately.
- `QKVParallelLinear`: q, k and v, split by heads; KV heads are replicated when there are
  fewer than ranks.
- `RowParallelLinear`: each rank multiplies its slice of the input features; one all-reduce
  sums the partial outputs.

Every layer says, through `weight_shard`, which slice of a checkpoint tensor it holds, so the
loader reads only that slice. At world size 1 each is exactly `nn.Linear` (same kernel, no
collective).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.parallel import TPGroup, WeightShard, kv_head_shard

__all__ = [
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "RowParallelLinear",
]


class ColumnParallelLinear(nn.Linear):
    """y[:, rank's slice] = x @ W[rank's rows]^T (+ b[rank's slice]): the output stays split.

    Example:
        >>> layer = ColumnParallelLinear(64, 256, TPGroup(), bias=False)
        >>> layer.weight.shape
        torch.Size([256, 64])
    """

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool) -> None:
        super().__init__(in_features, out_features // tp.world_size, bias=bias)
        self.tp = tp

    def weight_shard(self, leaf: str, shard: str | None) -> WeightShard:
        """The slice of checkpoint tensor `leaf` ("weight" or "bias") this rank holds."""
        return WeightShard(dim=0, part=self.tp.rank, parts=self.tp.world_size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stacked in one weight, in declaration order; each
    rank holds its slice of every one (so `split` of a local output gives local projections).

    `shards` maps each projection's name to its full (unsplit) output size; `shard_slice`
    tells the loader which rows of the local weight hold a projection.

    Example:
        >>> gate_up = MergedColumnParallelLinear(64, {"gate": 96, "up": 96}, TPGroup(), False)
        >>> gate_up.shard_slice("up")
        slice(96, 192, None)
    """

    def __init__(
        self, in_features: int, shards: dict[str, int], tp: TPGroup, bias: bool,
        local_sizes: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        # Each projection's rows on this rank: an equal share unless a subclass says otherwise.
        self.shard_sizes = local_sizes or {
            name: size // tp.world_size for name, size in shards.items()
        }
        super().__init__(in_features, sum(self.shard_sizes.values()) * tp.world_size, tp, bias)
        self._slices: dict[str, slice] = {}
        start = 0
        for name, size in self.shard_sizes.items():
            self._slices[name] = slice(start, start + size)
            start += size

    def shard_slice(self, shard: str) -> slice:
        """Rows of the local packed weight (and bias) that hold projection `shard`."""
        return self._slices[shard]

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split a packed output back into its (local) projections, in declaration order."""
        return torch.split(output, list(self.shard_sizes.values()), dim=-1)

    def weight_shard(self, leaf: str, shard: str | None) -> WeightShard:
        assert shard is not None, "a packed layer loads one projection at a time"
        return WeightShard(self.shard_slice(shard), 0, self.tp.rank, self.tp.world_size)


class QKVParallelLinear(MergedColumnParallelLinear):
    """The packed q, k, v projections, split by heads: each rank computes its query heads and
    the KV heads they attend to.

    With fewer KV heads than ranks, each rank holds one KV head (consecutive ranks share it),
    so `num_kv_heads` (local) is at least 1.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
        tp: TPGroup, bias: bool,
    ) -> None:  # fmt: skip
        self.kv_index, self.kv_parts = kv_head_shard(num_kv_heads, tp)
        self.num_heads = num_heads // tp.world_size
        self.num_kv_heads = num_kv_heads // self.kv_parts
        self.head_dim = head_dim
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        local_kv = self.num_kv_heads * head_dim
        local = {"q": q // tp.world_size, "k": local_kv, "v": local_kv}
        super().__init__(hidden_size, {"q": q, "k": kv, "v": kv}, tp, bias, local_sizes=local)

    def weight_shard(self, leaf: str, shard: str | None) -> WeightShard:
        if shard == "q":
            return super().weight_shard(leaf, shard)
        assert shard is not None
        return WeightShard(self.shard_slice(shard), 0, self.kv_index, self.kv_parts)


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x[:, rank's slice] @ W[:, rank's slice]^T) + b: the input arrives split
    (from a column-parallel layer), the output is whole on every rank.

    Example:
        >>> layer = RowParallelLinear(256, 64, TPGroup(), bias=False)
        >>> layer.weight.shape
        torch.Size([64, 256])
    """

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool) -> None:
        super().__init__(in_features // tp.world_size, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tp.is_parallel:
            return F.linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(F.linear(x, self.weight))
        # The bias once, after the sum (every rank holds all of it).
        return out if self.bias is None else out + self.bias

    def weight_shard(self, leaf: str, shard: str | None) -> WeightShard:
        """Weights are split by input features; the bias is whole on every rank."""
        if leaf == "bias":
            return WeightShard()
        return WeightShard(dim=1, part=self.tp.rank, parts=self.tp.world_size)
