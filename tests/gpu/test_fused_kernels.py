"""The fused Triton kernels (norms, q/k norm + rotary, SiLU-and-mul, sampling) against the
plain torch ops they replace, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from asyncllm.kernels import triton_fused as fused
from asyncllm.kernels.torch_ref import to_cache_dtype
from asyncllm.kernels.triton_sampling import gumbel_argmax
from asyncllm.layers.rotary import RotaryEmbedding, _rotate
from asyncllm.layers.sampler import Sampler, SamplingTensors

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err <= TOLERANCE[ref.dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 1024), (37, 1024), (300, 4096), (5, 96)])
def test_add_rms_norm_matches_torch(dtype: torch.dtype, tokens: int, hidden: int) -> None:
    x, r = (torch.randn(tokens, hidden, device="cuda", dtype=dtype) for _ in range(2))
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    out, residual = fused.add_rms_norm(x, r, w, 1e-6)
    close(residual, x + r)
    close(out, rms_norm_reference(x + r, w, 1e-6))
    close(fused.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(16, 8, 128), (8, 2, 64), (4, 4, 32)])
@pytest.mark.parametrize("tokens", [23, 100])  # one head a program, and several
def test_qk_norm_rope_matches_torch(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, tokens: int
) -> None:
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", dtype=dtype)
    qw, kw = (torch.randn(dim, device="cuda", dtype=dtype) for _ in range(2))
    rotary = RotaryEmbedding(dim, 4096, 1e6).cuda()
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    cos = rotary.cos[positions].to(dtype)[:, None]
    sin = rotary.sin[positions].to(dtype)[:, None]
    want_q = _rotate(rms_norm_reference(q.reshape(tokens, heads, dim), qw, 1e-6), cos, sin)
    want_k = _rotate(rms_norm_reference(k.reshape(tokens, kv_heads, dim), kw, 1e-6), cos, sin)
    got_q, got_k = fused.qk_norm_rope(qkv, heads, kv_heads, dim, qw, kw, 1e-6,
                                      rotary.cos, rotary.sin, positions)  # fmt: skip
    close(got_q, want_q)
    close(got_k, want_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "page"), [(16, 8, 16), (8, 2, 256), (4, 4, 1)])
@pytest.mark.parametrize("has_norm", [True, False])
@pytest.mark.parametrize("tokens", [19, 70])  # one head a program, and several
def test_qk_norm_rope_writes_k_and_v_to_their_cache_slots(
    dtype: torch.dtype, heads: int, kv_heads: int, page: int, has_norm: bool, tokens: int
) -> None:
    dim, blocks = 64, 80
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", dtype=dtype)
    qw, kw = (torch.randn(dim, device="cuda", dtype=dtype) if has_norm else None for _ in "qk")
    rotary = RotaryEmbedding(dim, 4096, 1e6).cuda()
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    slots = torch.randperm(blocks * page, device="cuda")[:tokens]
    slots[[3, 11]] = -1  # padding rows: written nowhere
    k_cache, v_cache = torch.randn(2, blocks, page, kv_heads, dim, device="cuda", dtype=dtype)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    args = (qkv, heads, kv_heads, dim, qw, kw, 1e-6, rotary.cos, rotary.sin, positions)
    want_q, want_k = fused.qk_norm_rope(*args)
    got_q, got_k = fused.qk_norm_rope(*args, kv_cache=(k_cache, v_cache, slots))
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    v = qkv[:, (heads + kv_heads) * dim :].reshape(tokens, kv_heads, dim)
    real = slots >= 0
    flat_k, flat_v = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    assert torch.equal(flat_k[slots[real]], want_k[real])
    assert torch.equal(flat_v[slots[real]], v[real])
    untouched = torch.ones(blocks * page, dtype=torch.bool, device="cuda")
    untouched[slots[real]] = False
    assert torch.equal(flat_k[untouched], before_k.view(-1, kv_heads, dim)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(-1, kv_heads, dim)[untouched])


@pytest.mark.parametrize("tokens", [19, 70])
def test_qk_norm_rope_writes_a_float8_cache_as_torch_rounds_it(tokens: int) -> None:
    """A float8 cache gets each rotated k and v clamped to +-448 and rounded as torch's cast
    does (the bf16 value, then float8); padding slots and other slots are untouched."""
    heads, kv_heads, dim, page, blocks = 16, 8, 128, 16, 40
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
    qkv[0, (heads + kv_heads) * dim :] *= 1000  # v of token 0 beyond float8's range
    qw, kw = (torch.randn(dim, device="cuda", dtype=torch.bfloat16) * 30 for _ in "qk")
    rotary = RotaryEmbedding(dim, 4096, 1e6).cuda()
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    slots = torch.randperm(blocks * page, device="cuda")[:tokens]
    slots[5] = -1
    shape = (2, blocks, page, kv_heads, dim)
    k_cache, v_cache = torch.randn(shape, device="cuda").to(torch.float8_e4m3fn)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    args = (qkv, heads, kv_heads, dim, qw, kw, 1e-6, rotary.cos, rotary.sin, positions)
    _, want_k = fused.qk_norm_rope(*args)
    fused.qk_norm_rope(*args, kv_cache=(k_cache, v_cache, slots))
    v = qkv[:, (heads + kv_heads) * dim :].reshape(tokens, kv_heads, dim)
    real = slots >= 0
    for cache, before, new in ((k_cache, before_k, want_k), (v_cache, before_v, v)):
        expected = before.view(-1, kv_heads, dim).clone()
        expected[slots[real]] = to_cache_dtype(new[real], cache)
        assert torch.equal(cache.view(torch.uint8).view(-1, kv_heads, dim),
                           expected.view(torch.uint8))  # fmt: skip
    assert v_cache.view(-1, kv_heads, dim)[slots[0]].float().abs().max() == 448.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2 * 3072), (256, 2 * 3072), (7, 2 * 100)])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    x = torch.randn(shape, device="cuda", dtype=dtype)
    gate, up = x.chunk(2, dim=-1)
    close(fused.silu_and_mul(x), F.silu(gate) * up)


def sampling_inputs(rows: int, vocab: int) -> tuple[torch.Tensor, ...]:
    """Random logits; every fourth row greedy, the others at 0.7; distinct seeds, offsets."""
    logits = torch.randn(rows, vocab, device="cuda") * 3
    temps = torch.where(torch.arange(rows, device="cuda") % 4 == 0, 0.0, 0.7)
    seeds = torch.arange(rows, device="cuda") * 31 + 5
    offsets = torch.arange(rows, device="cuda") % 17
    return logits, temps, seeds, offsets


def test_fused_sampling_draws_what_the_torch_path_draws() -> None:
    rows = 512
    logits, temps, seeds, offsets = sampling_inputs(rows, 32_000)
    fused_tokens = gumbel_argmax(logits, temps, seeds, offsets).cpu()
    params = SamplingTensors(
        temps.cpu(), torch.zeros(rows, dtype=torch.long), torch.ones(rows), torch.zeros(rows),
        seeds.cpu(), offsets.cpu(), torch.empty(0, dtype=torch.long),
        torch.empty(0, dtype=torch.long), False, False, False, -1,
    )  # fmt: skip
    reference = Sampler()(logits.cpu(), params).token_ids
    assert (fused_tokens == reference).float().mean() >= 0.999
    assert torch.equal(fused_tokens[::4], logits[::4].argmax(-1).cpu())  # greedy rows exact


def test_fused_sampling_draws_the_same_tokens_however_the_vocabulary_is_sliced() -> None:
    # One row alone is cut into many slices, 512 rows into few: the draws must not change.
    rows = 512
    logits, temps, seeds, offsets = sampling_inputs(rows, 151_936)
    together = gumbel_argmax(logits, temps, seeds, offsets)
    alone = torch.cat([
        gumbel_argmax(logits[r : r + 1], temps[r : r + 1], seeds[r : r + 1], offsets[r : r + 1])
        for r in range(0, rows, 37)
    ])  # fmt: skip
    assert torch.equal(alone, together[::37])


@pytest.mark.parametrize("rows", [1, 3, 256])
def test_greedy_sampling_is_argmax_with_ties_to_the_lowest_index(rows: int) -> None:
    vocab = 151_936
    logits = torch.randn(rows, vocab, device="cuda")
    logits[:, [5, 70_000, 150_000]] = 50.0  # a tie across slices: the first index wins
    logits[-1] = float("-inf")  # nothing beats -inf: index 0, as torch.argmax
    zeros = torch.zeros(rows, device="cuda")
    ids = torch.arange(rows, device="cuda")
    want = logits.argmax(-1)
    for all_greedy in (False, True):
        got = gumbel_argmax(logits, zeros, ids, ids, all_greedy=all_greedy)
        assert torch.equal(got, want)
    assert got[0] == (5 if rows > 1 else 0)
