"""Mixture-of-experts layers: top-k routing and the packed experts' SwiGLU MLPs.

The experts' weights live in two packed parameters, `gate_up_proj` [E, 2I, H] (each expert's
gate rows, then its up rows) and `down_proj` [E, H, I], the layout `asyncllm.kernels.moe`
computes on (one fused Triton pass on CUDA, a per-expert torch loop elsewhere). Under tensor
parallelism each rank holds every expert's slice of the intermediate dimension (I / ranks);
the partial outputs are summed by one all-reduce, as in a dense MLP.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from asyncllm.kernels.moe import fused_moe
from asyncllm.parallel import CheckpointLayout, TPGroup, WeightShard

__all__ = ["FusedExperts", "Routing", "route"]


class Routing(NamedTuple):
    """Each token's experts and their weights."""

    weights: torch.Tensor
    """[T, K] in the router's dtype."""
    expert_ids: torch.Tensor
    """[T, K] int64."""


def route(router_logits: torch.Tensor, top_k: int, renormalise: bool) -> Routing:
    """Softmax over the experts (in float32), the `top_k` most probable, optionally
    renormalised to sum to 1, cast back to the logits' dtype (transformers' order).

    Example:
        >>> route(torch.tensor([[0.0, 2.0, 1.0]]), top_k=2, renormalise=True).expert_ids
        tensor([[1, 2]])
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(weights.to(router_logits.dtype), expert_ids)


class FusedExperts(nn.Module):
    """`num_experts` SwiGLU MLPs of width `intermediate_size`, packed; this rank's slice.

    Checkpoints name them either one by one (`{e}.gate_proj.weight`, `{e}.up_proj.weight`,
    `{e}.down_proj.weight`, as published) or packed like the parameters (`gate_up_proj`,
    `down_proj`, as some transformers versions save them); `checkpoint_layout` tells the
    loader both, and each tensor is copied into its slab as it is read.
    """

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TPGroup
    ) -> None:
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.local_size = intermediate_size // tp.world_size
        # No initialisation: every element is overwritten by the loader.
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.local_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.local_size))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [T, H] -> the routing-weighted sum of each token's experts [T, H]."""
        out = fused_moe(x, self.gate_up_proj, self.down_proj, *routing)
        return self.tp.all_reduce(out) if self.tp.is_parallel else out

    def checkpoint_layout(self) -> CheckpointLayout:
        """Per-expert and packed checkpoint names -> where each lands in this rank's slabs."""
        rank, parts, size = self.tp.rank, self.tp.world_size, self.local_size
        gate, up = slice(0, size), slice(size, 2 * size)
        tensors = {
            "gate_up_proj": ("gate_up_proj", WeightShard(None, 1, rank, parts, chunks=2)),
            "down_proj": ("down_proj", WeightShard(None, 2, rank, parts)),
        }
        for e in range(self.num_experts):
            tensors |= {
                f"{e}.gate_proj.weight": ("gate_up_proj", WeightShard(gate, 0, rank, parts, e)),
                f"{e}.up_proj.weight": ("gate_up_proj", WeightShard(up, 0, rank, parts, e)),
                f"{e}.down_proj.weight": ("down_proj", WeightShard(None, 1, rank, parts, e)),
            }
        experts = range(self.num_experts)
        stands_for = {
            "gate_up_proj": tuple(
                f"{e}.{name}.weight" for e in experts for name in ("gate_proj", "up_proj")
            ),
            "down_proj": tuple(f"{e}.down_proj.weight" for e in experts),
        }
        return CheckpointLayout(tensors, stands_for)
