"""Qwen3-MoE: Qwen3's attention, and in most layers a top-k mixture of SwiGLU experts.

Which layers route to experts follows config.json's `decoder_sparse_step` and
`mlp_only_layers` (the others keep a dense MLP of `intermediate_size`); `norm_topk_prob`
renormalises each token's top-k weights. There is no shared expert in this family.
"""

from __future__ import annotations

import torch
from torch import nn

from asyncllm.errors import ModelLoadError
from asyncllm.layers.moe import FusedExperts, route
from asyncllm.model.config import ModelConfig, MoEConfig
from asyncllm.model.qwen3 import Qwen3ForCausalLM
from asyncllm.parallel import TPGroup

__all__ = ["Qwen3MoeForCausalLM", "SparseMoeBlock"]


class SparseMoeBlock(nn.Module):
    """The router (`gate`, replicated on every rank) and the packed `experts`."""

    def __init__(self, hidden_size: int, moe: MoEConfig, tp: TPGroup) -> None:
        super().__init__()
        self.top_k, self.renormalise = moe.num_experts_per_tok, moe.norm_topk_prob
        self.gate = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.experts = FusedExperts(moe.num_experts, hidden_size, moe.moe_intermediate_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = route(self.gate(x), self.top_k, self.renormalise)
        out: torch.Tensor = self.experts(x, routing)
        return out


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3-MoE with transformers' tensor names; experts are packed as they are loaded."""

    @classmethod
    def build_mlp(cls, cfg: ModelConfig, layer: int, tp: TPGroup) -> nn.Module:
        if cfg.moe is None:  # ModelConfig reads the expert keys for this architecture
            raise ModelLoadError(f"{cfg.architecture} needs the experts' keys in config.json")
        if cfg.moe.is_sparse(layer):
            return SparseMoeBlock(cfg.hidden_size, cfg.moe, tp)
        return super().build_mlp(cfg, layer, tp)
