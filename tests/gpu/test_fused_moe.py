"""The fused Triton MoE MLP against the per-expert torch reference, in bf16 and float32."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

from asyncllm.kernels.moe import moe_reference  # noqa: E402
from asyncllm.kernels.triton_moe import fused_moe, sort_by_expert  # noqa: E402


def _problem(
    tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    x = randn(tokens, hidden)
    w_gate_up = randn(experts, 2 * inter, hidden, scale=hidden**-0.5)
    w_down = randn(experts, hidden, inter, scale=inter**-0.5)
    router = torch.randn(tokens, experts, generator=gen, device="cuda").softmax(-1)
    weights, ids = torch.topk(router, top_k)
    return x, w_gate_up, w_down, weights / weights.sum(-1, keepdim=True), ids


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("tokens", [1, 3, 17, 64, 200, 512])
@pytest.mark.parametrize(("experts", "top_k"), [(8, 2), (64, 6), (128, 8)])
def test_fused_moe_matches_the_reference_in_bf16(tokens: int, experts: int, top_k: int) -> None:
    x, w13, w2, weights, ids = _problem(tokens, experts, top_k, 256, 128, torch.bfloat16, tokens)
    ref = moe_reference(x.float(), w13.float(), w2.float(), weights, ids)  # float32 truth
    out = fused_moe(x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.isfinite(out).all()
    assert _relative_error(out, ref) < 2e-2


@pytest.mark.parametrize("tokens", [1, 40])
def test_fused_moe_matches_the_reference_in_float32(tokens: int) -> None:
    x, w13, w2, weights, ids = _problem(tokens, 16, 4, 128, 96, torch.float32, 7)
    ref = moe_reference(x, w13, w2, weights, ids)
    assert _relative_error(fused_moe(x, w13, w2, weights, ids), ref) < 1e-5


def test_fused_moe_with_every_token_on_one_expert() -> None:
    x, w13, w2, weights, _ = _problem(96, 32, 2, 128, 64, torch.bfloat16, 3)
    ids = torch.tensor([[5, 9]], device="cuda").expand(96, 2).contiguous()
    ref = moe_reference(x.float(), w13.float(), w2.float(), weights, ids)
    assert _relative_error(fused_moe(x, w13, w2, weights, ids), ref) < 2e-2


def test_sort_by_expert_puts_every_pair_once_in_its_experts_tiles() -> None:
    ids = torch.randint(0, 16, (37, 4), device="cuda")
    tiles = sort_by_expert(ids, 16, 16)
    pairs = tiles.pair_ids.long()
    real = pairs[pairs < ids.numel()]
    assert sorted(real.tolist()) == list(range(ids.numel()))
    tile_of = torch.arange(pairs.numel(), device="cuda") // 16
    expert_of_slot = tiles.tile_experts.long()[tile_of]
    mask = pairs < ids.numel()
    assert torch.equal(expert_of_slot[mask], ids.flatten()[pairs[mask]])


def test_fused_moe_replays_in_a_cuda_graph() -> None:
    x, w13, w2, weights, ids = _problem(24, 64, 6, 256, 128, torch.bfloat16, 11)
    static_x, static_w, static_ids = x.clone(), weights.clone(), ids.clone()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        fused_moe(static_x, w13, w2, static_w, static_ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fused_moe(static_x, w13, w2, static_w, static_ids)
    fresh = _problem(24, 64, 6, 256, 128, torch.bfloat16, 12)
    static_x.copy_(fresh[0])
    static_w.copy_(fresh[3])
    static_ids.copy_(fresh[4])
    graph.replay()
    torch.cuda.synchronize()
    expected = fused_moe(fresh[0], w13, w2, fresh[3], fresh[4])
    assert torch.equal(static_out, expected)
