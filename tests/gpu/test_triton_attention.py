"""The Triton attention backend against the torch reference, on fresh random paged caches.

Every case draws new random K/V/queries and a shuffled block table, poisons the output with
NaN, runs `TritonAttention`, and checks (1) every output element against `TorchAttention` run
in higher precision on upcast copies of the same cache, (2) that padding rows are zeros, and
(3) that `store_kv` changed exactly the mapped cache slots.

The GPU tests need CUDA. A few small shapes also run on the CPU, through this file's main
under TRITON_INTERPRET=1: `nox -s kernels` runs it that way, in CI.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Collection
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from asyncllm.context import ForwardContext
from asyncllm.kernels.torch_ref import TorchAttention, to_cache_dtype
from asyncllm.kernels.triton_attn import (
    DecodeTuning,
    PrefillTuning,
    TritonAttention,
    TritonMetadata,
    triton_store_kv,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

_TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
"""Allowed ‖out − ref‖ / ‖ref‖ and max |out − ref| / max |ref| per input dtype (with a
float8 cache too: the reference reads the same float8 values, upcast)."""

FP8 = torch.float8_e4m3fn


@dataclass
class Case:
    """One step's inputs: a context over a random paged cache plus this step's q/k/v."""

    ctx: ForwardContext
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    real_rows: torch.Tensor
    """[T] bool: rows that belong to a real sequence (the rest are padding, expected zero)."""
    scale: float


def make_case(
    decode_lens: list[int],
    prefills: list[tuple[int, int]],
    *,
    num_padding: int = 0,
    num_trailing: int = 0,
    num_kv_heads: int = 2,
    group: int = 2,
    head_dim: int = 64,
    page_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    seed: int = 0,
    table_width: int | None = None,
    kv_dtype: torch.dtype | None = None,
) -> Case:
    """A step with decodes of the given KV lengths, `num_padding` padding decode rows, then
    prefill chunks given as (cached prefix, new tokens), then `num_trailing` tokens of no
    sequence (fixed-size padding); physical blocks are shuffled. The cache holds `kv_dtype`
    (None: `dtype`)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = list(decode_lens) + [0] * num_padding + [p + n for p, n in prefills]
    q_lens = [1] * (len(decode_lens) + num_padding) + [n for _, n in prefills]
    pages_needed = [-(-length // page_size) for length in seq_lens]
    num_blocks = sum(pages_needed) + 3  # spare blocks stay untouched by store_kv
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    width = table_width or max(1, *pages_needed)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for row, count in enumerate(pages_needed):
        tables[row, :count] = torch.tensor(physical[:count], dtype=torch.int32)
        physical = physical[count:]

    slots: list[int] = []
    for row, (length, q_len) in enumerate(zip(seq_lens, q_lens)):
        if length == 0:
            slots += [-1] * q_len
            continue
        for pos in range(length - q_len, length):
            slots.append(int(tables[row, pos // page_size]) * page_size + pos % page_size)
    slots += [-1] * num_trailing
    num_tokens = len(slots)
    num_heads = num_kv_heads * group

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    # K and V are strided views into one qkv tensor, as the model produces them.
    qkv = randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim)
    q = qkv[:, :num_heads]
    k = qkv[:, num_heads : num_heads + num_kv_heads]
    v = qkv[:, num_heads + num_kv_heads :]
    kv_cache = randn(2, num_blocks, page_size, num_kv_heads, head_dim).to(kv_dtype or dtype)
    cu_q = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu_q[1:] = torch.tensor(q_lens).cumsum(0)
    real_rows = torch.tensor([s >= 0 for s in slots], device=device)

    def dev(values: list[int] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(values, dtype=dtype).to(device)

    ctx = ForwardContext(
        positions=dev([0] * num_tokens, torch.int64),  # unused by attention
        slot_mapping=dev(slots, torch.int64),
        cu_seqlens_q=dev(cu_q, torch.int32),
        seq_lens_k=dev(seq_lens, torch.int32),
        block_tables=dev(tables, torch.int32),
        logits_indices=dev([], torch.int64),
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(max(seq_lens), 1),
        num_decode_seqs=len(decode_lens) + num_padding,
        attn_backend=TorchAttention(),
    )
    return Case(ctx, q, k, v, kv_cache[0], kv_cache[1], real_rows, head_dim**-0.5)


def reference(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, k_cache, v_cache) of the torch backend in float64/float32 on upcast copies.

    Sequences go through `TorchAttention` in consecutive groups small enough that its padded
    [B, Hq, max_q, max_k] scores and [B, max_k, Hq, D] keys stay under a gigabyte or so.
    Non-real rows of the output are zero.
    """
    wide = torch.float64 if case.q.dtype == torch.float32 else torch.float32
    k_cache, v_cache = case.k_cache.to(wide), case.v_cache.to(wide)
    q = case.q.to(wide)
    # What the cache will hold (rounded to float8 for a float8 cache), upcast.
    k = to_cache_dtype(case.k, case.k_cache).to(wide)
    v = to_cache_dtype(case.v, case.v_cache).to(wide)
    out = torch.zeros_like(q)
    ctx = case.ctx
    cu_q, seq_lens = ctx.cu_seqlens_q.tolist(), ctx.seq_lens_k.tolist()
    first = 0
    while first < len(seq_lens):
        last = first + 1  # group = sequences [first, last)
        while last < len(seq_lens) and _scores_size(cu_q, seq_lens, first, last + 1, q) < 2**28:
            last += 1
        tokens = slice(cu_q[first], cu_q[last])
        sub = dataclasses.replace(
            ctx,
            slot_mapping=ctx.slot_mapping[tokens],
            cu_seqlens_q=ctx.cu_seqlens_q[first : last + 1] - cu_q[first],
            seq_lens_k=ctx.seq_lens_k[first:last],
            block_tables=ctx.block_tables[first:last],
            max_seqlen_q=max(cu_q[i + 1] - cu_q[i] for i in range(first, last)),
            max_seqlen_k=max(1, *seq_lens[first:last]),
            num_decode_seqs=max(0, min(ctx.num_decode_seqs, last) - first),
        )
        out[tokens] = TorchAttention().forward(
            sub, q[tokens], k[tokens], v[tokens], k_cache, v_cache, case.scale
        )
        first = last
    out[~case.real_rows] = 0
    return out, k_cache, v_cache


def _scores_size(
    cu_q: list[int], seq_lens: list[int], first: int, last: int, q: torch.Tensor
) -> int:
    """Elements of the padded scores or of the gathered, head-expanded keys, if larger."""
    max_q = max(cu_q[i + 1] - cu_q[i] for i in range(first, last))
    return (last - first) * max(max_q, q.shape[2]) * max(seq_lens[first:last]) * q.shape[1]


def run_and_check(case: Case, backend: TritonAttention | None = None) -> float:
    """Run Triton on `case`, compare with the reference, return the max relative error."""
    backend = backend or TritonAttention()
    want_out, want_k, want_v = reference(case)
    out = torch.full_like(case.q, float("nan"))
    backend.forward_into(
        out, case.ctx, case.q, case.k, case.v, case.k_cache, case.v_cache, case.scale
    )
    # store_kv: the mapped slots hold the new K/V (exactly, in the cache's dtype), every
    # other slot is unchanged.
    assert torch.equal(case.k_cache.to(want_k.dtype), want_k)
    assert torch.equal(case.v_cache.to(want_v.dtype), want_v)

    assert not out.isnan().any(), "some output elements were never written"
    pad = ~case.real_rows
    assert torch.equal(out[pad], torch.zeros_like(out[pad])), "padding rows must be zeros"
    got, want = out[case.real_rows].to(want_out.dtype), want_out[case.real_rows]
    if got.numel() == 0:
        return 0.0
    norm_err = float((got - want).norm() / want.norm())
    max_err = float((got - want).abs().max() / want.abs().max())
    tol = _TOLERANCE[case.q.dtype]
    _log_error(case, norm_err, max_err)
    assert norm_err < tol, f"relative norm error {norm_err:.2e} >= {tol:.0e}"
    assert max_err < 4 * tol, f"max error {max_err:.2e} >= {4 * tol:.0e}"
    return max(norm_err, max_err)


def _log_error(case: Case, norm_err: float, max_err: float) -> None:
    """Append the case's errors to $TRITON_ATTN_ERROR_LOG, if set (for reports)."""
    path = os.environ.get("TRITON_ATTN_ERROR_LOG")
    if path:
        with open(path, "a") as log:
            log.write(f"{case.q.dtype} {tuple(case.q.shape)} {norm_err:.3e} {max_err:.3e}\n")


# ---- store_kv ------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    ("dtype", "kv_dtype"), [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, FP8)]
)
@pytest.mark.parametrize("page_size", [16, 256])
def test_store_kv_writes_exactly_the_mapped_slots(
    dtype: torch.dtype, kv_dtype: torch.dtype | None, page_size: int
) -> None:
    """Mapped slots get the new K/V (in the cache's dtype: a float8 cache holds them clamped
    and rounded as torch casts them), padding slots (-1) and all other slots stay as they
    were."""

    case = make_case(
        [5, 40],
        [(0, 70), (33, 9)],
        num_padding=3,
        page_size=page_size,
        dtype=dtype,
        num_kv_heads=8,
        head_dim=128,
        kv_dtype=kv_dtype,
    )
    case.k[0] *= 1000  # beyond float8's range
    before_k, before_v = case.k_cache.clone(), case.v_cache.clone()
    triton_store_kv(case.k, case.v, case.k_cache, case.v_cache, case.ctx.slot_mapping)
    keep = case.ctx.slot_mapping >= 0
    slots = case.ctx.slot_mapping[keep]
    for cache, before, new in ((case.k_cache, before_k, case.k), (case.v_cache, before_v, case.v)):
        expected = before.view(-1, *before.shape[2:]).clone()
        expected[slots] = to_cache_dtype(new[keep], cache)
        got = cache.view(-1, *cache.shape[2:])
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


# ---- attention over many shapes ------------------------------------------------------------

_SHAPES = [
    # id, decode KV lengths, prefills (prefix, new), padding rows
    ("decode-1x1", [1], [], 0),
    ("decode-1x8192", [8192], [], 0),
    ("decode-3-short", [1, 17, 300], [], 0),
    ("decode-7-padding", [5, 64, 65, 129, 1000], [], 2),
    ("decode-256x1024", [1024] * 256, [], 0),
    ("decode-32x8192", [8192] * 32, [], 0),
    ("prefill-1-token", [], [(0, 1)], 0),
    ("prefill-1000", [], [(0, 1000)], 0),
    ("prefill-after-prefix", [], [(2048, 300)], 0),
    ("prefix-hit-1-new", [], [(17, 1), (500, 2)], 0),
    ("prefill-varlen", [], [(0, 5), (3, 130), (1, 64), (100, 255), (0, 129)], 0),
    ("mixed", [9, 1, 700], [(0, 33), (64, 64), (1000, 3)], 0),
    ("mixed-many-decodes", [200] * 100, [(0, 200), (4000, 150)], 0),
]


def _random_lens(seed: int, count: int, low: int, high: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(count)]


_SHAPES += [
    ("decode-256-random", _random_lens(1, 256, 1, 1024), [], 0),
    ("decode-32-random-long", _random_lens(2, 32, 1, 8192), [], 0),
    ("decode-64-random-padding", _random_lens(3, 60, 1, 3000), [], 4),
    ("prefill-8x1024", [], [(0, 1024)] * 8, 0),
    (
        "prefix-hits-random",
        [],
        list(zip(_random_lens(4, 6, 0, 3000), _random_lens(5, 6, 1, 400))),
        0,
    ),
    (
        "mixed-random",
        _random_lens(6, 40, 1, 2000),
        list(zip(_random_lens(7, 4, 0, 1500), _random_lens(8, 4, 1, 300))),
        0,
    ),
]


def over_shapes(names: Collection[str] | None = None) -> pytest.MarkDecorator:
    """Parametrize a test over the `_SHAPES` named in `names` (None: all of them)."""
    shapes = [s for s in _SHAPES if names is None or s[0] in names]
    return pytest.mark.parametrize(
        ("decode_lens", "prefills", "num_padding"),
        [s[1:] for s in shapes],
        ids=[s[0] for s in shapes],
    )


@pytest.mark.gpu
@requires_cuda
@over_shapes()
@pytest.mark.parametrize(
    ("num_kv_heads", "group", "head_dim"), [(8, 2, 128), (2, 4, 64), (1, 8, 128), (4, 1, 64)]
)
@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_matches_reference_in_bfloat16(
    decode_lens: list[int],
    prefills: list[tuple[int, int]],
    num_padding: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    page_size: int,
) -> None:
    """bf16 decode, prefill, prefix hits and mixed steps over GQA ratios and page sizes."""
    case = make_case(
        decode_lens,
        prefills,
        num_padding=num_padding,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        page_size=page_size,
    )
    run_and_check(case)


@pytest.mark.gpu
@requires_cuda
@over_shapes({"decode-1x8192", "decode-7-padding", "decode-256-random", "prefill-varlen",
              "prefix-hits-random", "mixed-random"})  # fmt: skip
@pytest.mark.parametrize(("num_kv_heads", "group", "head_dim"), [(8, 2, 128), (1, 8, 128)])
@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_reference_with_a_float8_cache(
    decode_lens: list[int],
    prefills: list[tuple[int, int]],
    num_padding: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
) -> None:
    """kv_cache_dtype "fp8": the new K/V are stored rounded to float8 (bit for bit as torch
    rounds them), and attention over the float8 cache matches the reference reading the
    same values."""
    case = make_case(
        decode_lens,
        prefills,
        num_padding=num_padding,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        kv_dtype=FP8,
    )
    run_and_check(case)


@pytest.mark.gpu
def test_a_float8_cache_needs_compute_capability_8_9(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert TritonAttention.unsupported_reason(cuda, 16, 128, bf16) is None
    reason = TritonAttention.unsupported_reason(cuda, 16, 128, bf16, FP8)
    assert reason == "a float8 KV cache needs compute capability 8.9 or newer"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert TritonAttention.unsupported_reason(cuda, 16, 128, bf16, FP8) is None
    reason = TritonAttention.unsupported_reason(cuda, 16, 128, bf16, torch.float16)
    assert reason is not None and "not supported" in reason


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("page_size", [8, 32, 128])
def test_matches_reference_in_float32_and_float16(
    dtype: torch.dtype, head_dim: int, page_size: int
) -> None:
    """float32 (IEEE dots: tight tolerance) and float16, every supported head size."""
    case = make_case(
        [1, 77, 1500],
        [(0, 40), (300, 200)],
        num_padding=1,
        num_kv_heads=2,
        group=4,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
    )
    run_and_check(case)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64])
def test_any_split_count_gives_the_same_answer(splits: int) -> None:
    """Split-KV decode is exact for any split count, including splits left without keys."""
    case = make_case(
        [1, 3, 64, 65, 2000, 5000],
        [],
        num_padding=1,
        num_kv_heads=4,
        group=4,
        head_dim=128,
        page_size=16,
        seed=splits,
    )
    run_and_check(case, TritonAttention(decode=DecodeTuning(fixed_splits=splits)))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("prefills", [[], [(30, 50)]], ids=["decode", "mixed"])
def test_longest_first_launch_order_changes_no_output(
    splits: int, prefills: list[tuple[int, int]]
) -> None:
    """Decode rows launched longest first (the default, from the step's metadata or
    computed in `forward`) give bit-identical outputs to rows launched in order."""
    case = make_case(
        _random_lens(5, 40, 1, 3000), prefills, num_padding=3, num_kv_heads=8, group=2,
        head_dim=128, page_size=256, kv_dtype=FP8,
    )  # fmt: skip
    outs = []
    for longest_first, with_metadata in ((False, False), (True, False), (True, True)):
        tuning = DecodeTuning(fixed_splits=splits, longest_first=longest_first)
        backend, ctx = TritonAttention(decode=tuning), case.ctx
        if with_metadata:  # as the engine runs it: the order sorted once per step
            ctx = dataclasses.replace(ctx, attn_backend=backend).with_attn_metadata()
            assert isinstance(ctx.attn_metadata, TritonMetadata)
        out = torch.full_like(case.q, float("nan"))
        backend.forward_into(out, ctx, case.q, None, None, case.k_cache, case.v_cache, case.scale)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], outs[2])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    ("decode_lens", "prefills"),
    [([30, 7], []), ([30, 7], [(5, 40)]), ([], [(0, 300)])],
    ids=["decode", "mixed", "prefill"],
)
def test_tokens_after_the_last_sequence_are_zeros(
    decode_lens: list[int], prefills: list[tuple[int, int]]
) -> None:
    """Fixed-size batches may end in tokens of no sequence: their rows come back zero."""
    case = make_case(
        decode_lens, prefills, num_trailing=5, num_kv_heads=2, group=4, head_dim=128, page_size=32
    )
    run_and_check(case)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed: int) -> None:
    """Random steps: batch, context, prefix hits, GQA, head size, page size, dtype all drawn."""
    rng = random.Random(seed)
    for index in range(8):
        max_context = rng.choice([16, 300, 2048, 8192])
        num_decodes = rng.choice([0, 1, 5, 37, 128])
        num_prefills = rng.choice([0, 0, 1, 3]) if num_decodes else rng.choice([1, 2, 5])
        decode_lens = [rng.randint(1, max_context) for _ in range(num_decodes)]
        prefills = []
        for _ in range(num_prefills):
            new = rng.randint(1, 400)
            prefills.append((rng.randint(0, max(0, max_context - new)), new))
        case = make_case(
            decode_lens,
            prefills,
            num_padding=rng.choice([0, 0, 3]) if num_decodes else 0,
            num_kv_heads=rng.choice([1, 2, 8]),
            group=rng.choice([1, 2, 4, 8]),
            head_dim=rng.choice([64, 128]),
            page_size=rng.choice([16, 32, 64, 128, 256]),
            dtype=rng.choice([torch.bfloat16, torch.float16]),
            seed=100 * seed + index,
        )
        run_and_check(case)


@pytest.mark.gpu
@requires_cuda
def test_decode_graph_replays_with_new_lengths_and_tables() -> None:
    """A captured decode step replayed on new lengths, tables, slots and queries is right."""
    batch, width, page_size = 24, 64, 16
    case = make_case(
        _random_lens(9, batch - 2, 1, 900),
        [],
        num_padding=2,
        num_kv_heads=8,
        group=2,
        head_dim=128,
        page_size=page_size,
        table_width=width,
    )
    # One big pool so every later case fits; the captured tensors are filled in place.
    pool = torch.randn(2, batch * width + 8, page_size, 8, 128, device="cuda").bfloat16()
    k_cache, v_cache = pool[0], pool[1]
    ctx, backend = case.ctx, TritonAttention()
    q, k, v = case.q.clone(), case.k.clone(), case.v.clone()
    out = torch.empty_like(q)
    backend.forward_into(out, ctx, q, k, v, k_cache, v_cache, case.scale)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.forward_into(out, ctx, q, k, v, k_cache, v_cache, case.scale)

    for seed in range(3):
        lengths = _random_lens(10 + seed, batch - 3, 1, width * page_size)
        new = make_case(
            lengths,
            [],
            num_padding=3,
            num_kv_heads=8,
            group=2,
            head_dim=128,
            page_size=page_size,
            seed=100 + seed,
            table_width=width,
        )
        blocks = new.k_cache.shape[0]
        k_cache[:blocks].copy_(new.k_cache)
        v_cache[:blocks].copy_(new.v_cache)
        for name in ("slot_mapping", "seq_lens_k", "block_tables"):
            getattr(ctx, name).copy_(getattr(new.ctx, name))
        q.copy_(new.q), k.copy_(new.k), v.copy_(new.v)
        want, _, _ = reference(new)
        out.fill_(float("nan"))
        graph.replay()
        real = new.real_rows
        assert torch.equal(out[~real], torch.zeros_like(out[~real]))
        err = (out[real].float() - want[real]).norm() / want[real].norm()
        assert err < _TOLERANCE[torch.bfloat16]


# ---- the CPU interpreter --------------------------------------------------------------------


def _interpreter_main() -> None:
    """Run small cases on the CPU (`nox -s kernels`); only meaningful with TRITON_INTERPRET=1."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    shapes = [
        ([3, 1, 40], [], 1, 2),
        ([], [(0, 20), (9, 1), (30, 17)], 0, 0),
        ([5, 70], [(16, 3), (0, 33)], 0, 3),
    ]
    for dtype in (torch.float32, torch.float16):
        for page_size in (8, 32):
            for decode_lens, prefills, pads, trailing in shapes:
                case = make_case(
                    decode_lens,
                    prefills,
                    num_padding=pads,
                    num_trailing=trailing,
                    num_kv_heads=2,
                    group=2,
                    head_dim=32,
                    page_size=page_size,
                    dtype=dtype,
                    device="cpu",
                )
                for longest_first in (True, False):
                    decode = DecodeTuning(fixed_splits=3, block_n=16, longest_first=longest_first)
                    backend = TritonAttention(
                        decode=decode, prefill=PrefillTuning(block_m=16, block_n=16)
                    )
                    err = run_and_check(case, backend)
                    print(f"ok {dtype} page {page_size} {decode_lens} {prefills} "
                          f"longest_first={longest_first}: {err:.1e}")  # fmt: skip


if __name__ == "__main__":
    _interpreter_main()
