"""The mixture-of-experts MLP: a fused Triton path on CUDA, a plain torch reference elsewhere.

Both compute, for each token t and each of its top-k experts e with routing weight w:
    out[t] = sum_k w[t,k] * down_e(silu(gate_e(x[t])) * up_e(x[t]))
with the experts' weights packed as w_gate_up [E, 2I, H] (gate rows, then up rows) and
w_down [E, H, I].
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

import torch
import torch.nn.functional as F

__all__ = ["fused_moe", "moe_reference"]

logger = logging.getLogger(__name__)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The MoE MLP of `x` [T, H]: fused grouped GEMMs on CUDA, `moe_reference` otherwise."""
    kernels = _triton_moe() if x.is_cuda else None
    if kernels is None or x.shape[0] == 0:
        return moe_reference(x, w_gate_up, w_down, topk_weights, topk_ids)
    return kernels.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids)  # type: ignore[no-any-return]


def moe_reference(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """One expert at a time: gather its tokens, run its MLP, add the weighted result back."""
    out = torch.zeros_like(x)
    inter = w_down.shape[2]
    for expert in torch.unique(topk_ids).tolist():
        tokens, slots = torch.nonzero(topk_ids == expert, as_tuple=True)
        gate_up = F.linear(x[tokens], w_gate_up[expert])
        hidden = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        weight = topk_weights[tokens, slots].to(x.dtype)[:, None]
        out.index_add_(0, tokens, F.linear(hidden, w_down[expert]) * weight)
    return out


@functools.cache
def _triton_moe() -> ModuleType | None:
    try:
        return importlib.import_module("asyncllm.kernels.triton_moe")
    except ImportError:
        logger.info("Triton is not importable: MoE layers use the per-expert torch loop")
        return None
