"""The flash-attn backend on the GPU, against the torch reference.

Kernel level: decode, prefill, prefill after a cached prefix, mixed steps and GQA ratios on
fresh random paged caches; zero-length padding rows (as a decode CUDA graph feeds them:
length 0, slot -1, a stale block table); and the decode step captured in a CUDA graph and
replayed with new lengths and tables. Engine level: decode steps replay graphs, graphs and
eager steps agree token for token, bf16 logits agree with the Triton backend, float32 stays
exact with the torch backend, and a configuration flash-attn cannot serve is refused.

Skipped without flash_attn (scripts/gpu_flash.sh installs the wheel and checks the import
first, so a skip there is reported, not silent).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flash_attn")

from asyncllm import AsyncEngine, SamplingParams
from asyncllm.context import ForwardContext
from asyncllm.engine.inputs import StepBatch
from asyncllm.engine.runner import ModelRunner, SampleSpec, SeqStep
from asyncllm.errors import ConfigError
from asyncllm.kernels.flash_attn import FlashAttention
from asyncllm.kernels.torch_ref import TorchAttention
from tests.models import load_reference, reference_greedy, write_random_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PAGE = 256
DIM = 128
_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
"""Allowed ‖out − ref‖ / ‖ref‖ (and 4x that for max |out − ref| / max |ref|), as for Triton."""


@dataclass
class Step:
    """One step's attention inputs over a random paged cache; padding rows come last."""

    ctx: ForwardContext
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    num_real_seqs: int
    num_real_tokens: int


def make_step(
    decode_lens: Sequence[int],
    prefills: Sequence[tuple[int, int]] = (),
    *,
    num_padding: int = 0,
    num_kv_heads: int = 2,
    group: int = 2,
    head_dim: int = DIM,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    width: int | None = None,
) -> Step:
    """Decodes of the given KV lengths, then prefill chunks (cached prefix, new tokens), then
    `num_padding` zero-length decode rows whose block tables hold stale (valid) block ids."""
    assert not (prefills and num_padding), "padding rows belong to decode-only steps"
    gen = torch.Generator().manual_seed(seed)
    real_lens = list(decode_lens) + [p + n for p, n in prefills]
    q_lens = [1] * len(decode_lens) + [n for _, n in prefills]
    pages = [-(-n // PAGE) for n in real_lens]
    num_blocks = sum(pages) + 2
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    width = width or max(pages)
    # Padding rows point at random real blocks, as a graph's stale rows would.
    tables = torch.randint(0, num_blocks, (len(real_lens) + num_padding, width), generator=gen)
    for row, count in enumerate(pages):
        tables[row, :count] = torch.tensor(physical[:count])
        physical = physical[count:]
    slots: list[int] = []
    for row, (length, q_len) in enumerate(zip(real_lens, q_lens)):
        slots += [
            int(tables[row, p // PAGE]) * PAGE + p % PAGE for p in range(length - q_len, length)
        ]
    num_real_tokens = len(slots)
    slots += [-1] * num_padding
    seq_lens = real_lens + [0] * num_padding
    q_lens += [1] * num_padding
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)

    data_gen = torch.Generator(device="cuda").manual_seed(seed)  # large caches: draw on the GPU

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=data_gen, device="cuda").to(dtype)

    num_tokens, num_heads = len(slots), num_kv_heads * group
    ctx = ForwardContext(
        positions=torch.zeros(num_tokens, dtype=torch.int64, device="cuda"),  # unused here
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device="cuda"),
        cu_seqlens_q=cu_q.cuda(),
        seq_lens_k=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=tables.to("cuda", torch.int32),
        logits_indices=torch.zeros(0, dtype=torch.int64, device="cuda"),
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(seq_lens),
        num_decode_seqs=len(decode_lens) + num_padding,
        attn_backend=TorchAttention(),
    )
    return Step(
        ctx, randn(num_tokens, num_heads, head_dim), randn(num_tokens, num_kv_heads, head_dim),
        randn(num_tokens, num_kv_heads, head_dim), randn(num_blocks, PAGE, num_kv_heads, head_dim),
        randn(num_blocks, PAGE, num_kv_heads, head_dim), len(real_lens), num_real_tokens,
    )  # fmt: skip


def real_rows(step: Step, narrow: bool = False) -> Step:
    """`step` without its padding rows (`narrow`: block tables only as wide as needed)."""
    ctx, seqs, tokens = step.ctx, step.num_real_seqs, step.num_real_tokens
    width = -(-int(ctx.seq_lens_k.max()) // PAGE) if narrow else ctx.block_tables.shape[1]
    real = dataclasses.replace(
        ctx,
        slot_mapping=ctx.slot_mapping[:tokens],
        cu_seqlens_q=ctx.cu_seqlens_q[: seqs + 1],
        seq_lens_k=ctx.seq_lens_k[:seqs],
        block_tables=ctx.block_tables[:seqs, :width].contiguous(),
        num_decode_seqs=min(ctx.num_decode_seqs, seqs),
    )
    return dataclasses.replace(step, ctx=real, q=step.q[:tokens], k=step.k[:tokens],
                               v=step.v[:tokens])  # fmt: skip


def reference(step: Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output of the real rows, k_cache, v_cache) from the torch backend in float32, on
    upcast copies of the caches (the torch backend cannot take zero-length rows)."""
    real = real_rows(step)
    k_cache, v_cache = step.k_cache.float(), step.v_cache.float()
    out = TorchAttention().forward(
        real.ctx, real.q.float(), real.k.float(), real.v.float(), k_cache, v_cache, DIM**-0.5
    )
    return out, k_cache, v_cache


def run_flash(step: Step, backend: FlashAttention | None = None) -> torch.Tensor:
    backend = backend or FlashAttention()
    ctx = dataclasses.replace(step.ctx, attn_backend=backend)
    ctx = dataclasses.replace(ctx, attn_metadata=backend.build_metadata(ctx))
    return backend.forward(ctx, step.q, step.k, step.v, step.k_cache, step.v_cache, DIM**-0.5)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    got = got.float()
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), "non-finite outputs in real rows"
    norm_err = float((got - want).norm() / want.norm())
    max_err = float((got - want).abs().max() / want.abs().max())
    tol = _TOLERANCE[dtype]
    assert norm_err < tol, f"relative norm error {norm_err:.2e} >= {tol:.0e}"
    assert max_err < 4 * tol, f"max error {max_err:.2e} >= {4 * tol:.0e}"


def check(step: Step, backend: FlashAttention | None = None) -> torch.Tensor:
    """Run flash-attn on `step`; assert outputs and cache writes match the reference."""
    want, want_k, want_v = reference(step)
    out = run_flash(step, backend)
    assert torch.equal(step.k_cache.float(), want_k), "store_kv wrote the wrong K slots"
    assert torch.equal(step.v_cache.float(), want_v), "store_kv wrote the wrong V slots"
    assert_close(out[: step.num_real_tokens], want, step.q.dtype)
    return out


# ---- kernels against the reference ---------------------------------------------------------

_rng = random.Random(1)
_CASES = {
    "decode-3": ([300, 17, 1024], []),
    "decode-long": ([8192, 1, 4097, 256, 257], []),
    "decode-256-random": ([_rng.randint(1, 2048) for _ in range(256)], []),
    "prefill": ([], [(0, 40), (0, 300), (0, 1)]),
    "prefill-after-prefix": ([], [(700, 200), (256, 1), (511, 3), (2048, 513)]),
    "mixed": ([900, 5, 1], [(0, 33), (1000, 300)]),
    "mixed-many-decodes": ([200] * 64, [(0, 200), (3000, 150)]),
}
_GQA = [(8, 2), (2, 4), (1, 8), (4, 1)]  # (KV heads, query heads per KV head)


@pytest.mark.parametrize(("num_kv_heads", "group"), _GQA, ids=[f"kv{h}x{g}" for h, g in _GQA])
@pytest.mark.parametrize("case", list(_CASES))
def test_matches_the_reference_in_bfloat16(case: str, num_kv_heads: int, group: int) -> None:
    decode_lens, prefills = _CASES[case]
    check(make_step(decode_lens, prefills, num_kv_heads=num_kv_heads, group=group))


@pytest.mark.parametrize("case", ["decode-3", "prefill-after-prefix", "mixed"])
def test_matches_the_reference_in_float16(case: str) -> None:
    decode_lens, prefills = _CASES[case]
    check(make_step(decode_lens, prefills, num_kv_heads=4, group=4, dtype=torch.float16))


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_each_head_dim_runs_or_is_refused_by_name(head_dim: int) -> None:
    """A build of flash-attn may lack head sizes (the shared wheel: 128 only): a head size
    either passes against the reference or is refused with a reason naming it."""
    reason = FlashAttention.unsupported_reason(torch.device("cuda"), PAGE, head_dim, torch.bfloat16)
    if head_dim == DIM:
        assert reason is None
    if reason is None:
        check(make_step([300, 17], [(256, 40)], head_dim=head_dim))
    else:
        assert f"head_dim {head_dim}" in reason


# ---- zero-length padding rows --------------------------------------------------------------


def test_zero_length_rows_leave_the_real_rows_exact() -> None:
    """Real rows match the reference, and the padding rows (slot -1) wrote nothing."""
    check(make_step([300, 17, 1024, 5], num_padding=4, num_kv_heads=8, group=2))


def test_zero_length_rows_come_back_as_zeros() -> None:
    step = make_step([300, 17, 1024, 5], num_padding=4, num_kv_heads=8, group=2)
    out = run_flash(step)
    padding = out[step.num_real_tokens :]
    assert torch.isfinite(padding).all(), "padding rows must not produce NaN/inf"
    assert torch.equal(padding, torch.zeros_like(padding))


def test_longest_first_changes_no_output_bit() -> None:
    """Decode rows run longest first (the default) or in row order: identical outputs."""
    step = make_step(*_CASES["decode-256-random"], num_kv_heads=8, group=2)
    in_order = run_flash(step, FlashAttention(longest_first=False))
    assert torch.equal(run_flash(step), in_order)


# ---- CUDA graphs ---------------------------------------------------------------------------


class CapturedDecode:
    """The flash-attn decode step of `rows` padded rows, captured once and replayed."""

    def __init__(self, rows: int, width: int, num_blocks: int, kv_heads: int, group: int) -> None:
        self.rows, self.width = rows, width
        self.backend = FlashAttention()
        heads = kv_heads * group
        self.q = torch.zeros(rows, heads, DIM, dtype=torch.bfloat16, device="cuda")
        self.k = torch.zeros(rows, kv_heads, DIM, dtype=torch.bfloat16, device="cuda")
        self.v = torch.zeros_like(self.k)
        self.slots = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device="cuda")
        self.tables = torch.zeros(rows, width, dtype=torch.int32, device="cuda")
        self.k_cache = torch.zeros(num_blocks, PAGE, kv_heads, DIM, dtype=torch.bfloat16,
                                   device="cuda")  # fmt: skip
        self.v_cache = torch.zeros_like(self.k_cache)
        ctx = ForwardContext(
            positions=torch.zeros(rows, dtype=torch.int64, device="cuda"),
            slot_mapping=self.slots, cu_seqlens_q=torch.arange(rows + 1, dtype=torch.int32,
                                                               device="cuda"),
            seq_lens_k=self.seq_lens, block_tables=self.tables,
            logits_indices=torch.arange(rows, device="cuda"), max_seqlen_q=1,
            max_seqlen_k=width * PAGE, num_decode_seqs=rows, attn_backend=self.backend,
        )  # fmt: skip
        self.graph = torch.cuda.CUDAGraph()
        self.out = self._capture(ctx)

    def _capture(self, ctx: ForwardContext) -> torch.Tensor:
        def forward() -> torch.Tensor:  # as the engine's graphs: rows sorted in the graph
            return self.backend.forward(ctx.with_attn_metadata(), self.q, self.k, self.v,
                                        self.k_cache, self.v_cache, DIM**-0.5)  # fmt: skip

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()  # warm-up outside the graph
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph):
            return forward()

    def replay(self, step: Step) -> torch.Tensor:
        """Copy `step` (decode rows + padding, this graph's row count) in and replay."""
        assert step.q.shape[0] == self.rows and step.ctx.block_tables.shape[1] <= self.width
        self.q.copy_(step.q)
        self.k.copy_(step.k)
        self.v.copy_(step.v)
        self.slots.copy_(step.ctx.slot_mapping)
        self.seq_lens.copy_(step.ctx.seq_lens_k)
        self.tables[:, : step.ctx.block_tables.shape[1]].copy_(step.ctx.block_tables)
        self.k_cache[: step.k_cache.shape[0]].copy_(step.k_cache)
        self.v_cache[: step.v_cache.shape[0]].copy_(step.v_cache)
        self.graph.replay()
        return self.out


def graph_steps(rows: int) -> Iterator[Step]:
    """Decode steps of `rows` padded rows: full, partly padding, one real row, long rows."""
    for seed, lens in enumerate([[_rng.randint(1, 1500) for _ in range(rows)], [700, 3, 1200],
                                 [1], [4000, 4096, 1, 255]]):  # fmt: skip
        yield make_step(lens, num_padding=rows - len(lens), num_kv_heads=4, group=4, seed=seed,
                        width=16)  # fmt: skip


def test_decode_graph_replays_match_the_reference() -> None:
    captured = CapturedDecode(rows=8, width=16, num_blocks=80, kv_heads=4, group=4)
    for step in graph_steps(8):
        want, want_k, _ = reference(step)
        out = captured.replay(step)
        blocks = step.k_cache.shape[0]
        assert torch.equal(captured.k_cache[:blocks].float(), want_k), "graph store_kv differs"
        assert_close(out[: step.num_real_tokens], want, torch.bfloat16)
        padding = out[step.num_real_tokens :]
        assert torch.equal(padding, torch.zeros_like(padding)), "graph padding rows not zero"


def test_decode_graph_replay_equals_an_eager_step_bitwise() -> None:
    """One split: a row's result does not depend on the block table's width (the graph's is
    wider than an eager step's), so replays and eager steps give identical bits."""
    captured = CapturedDecode(rows=8, width=16, num_blocks=80, kv_heads=4, group=4)
    for step in graph_steps(8):
        replayed = captured.replay(step)[: step.num_real_tokens].clone()
        eager = run_flash(real_rows(step, narrow=True))
        assert torch.equal(replayed, eager)


# ---- the engine ----------------------------------------------------------------------------

FLASH_SHAPE = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=DIM, tie_word_embeddings=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def flash_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("flash-model")
    write_random_model(directory, seed=4, **FLASH_SHAPE)
    return directory


def engine_for(model_dir: Path, **overrides: Any) -> AsyncEngine:
    settings: dict[str, Any] = dict(device="cuda", block_size=PAGE, num_kv_blocks=64,
                                    max_num_seqs=16, dtype="bfloat16")  # fmt: skip
    settings.update(overrides)
    return AsyncEngine.from_pretrained(str(model_dir), **settings)


def prompts_of(count: int, seed: int, max_len: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2048) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int = 40, **overrides: Any
           ) -> tuple[list[list[int]], str, int]:  # fmt: skip
    """(tokens, backend name, graph replays) of a greedy run (synchronous: no plugin needed)."""

    async def run() -> tuple[list[list[int]], str, int]:
        replays = 0
        async with engine_for(model_dir, **overrides) as engine:
            runner = engine._core.runner
            assert runner is not None
            if runner.graphs is not None:
                replay = runner.graphs.replay

                def counted(*args: Any) -> torch.Tensor:
                    nonlocal replays
                    replays += 1
                    return replay(*args)

                runner.graphs.replay = counted  # type: ignore[method-assign]
            params = SamplingParams(temperature=0, max_tokens=max_tokens)
            outs = await engine.generate_many(prompts, params)
            backend = engine.stats().attention_backend
        return [o.token_ids for o in outs], backend, replays

    return asyncio.run(run())


def test_engine_decodes_flash_attn_steps_in_cuda_graphs(flash_model_dir: Path) -> None:
    prompts = prompts_of(12, seed=1)
    tokens, backend, replays = greedy(flash_model_dir, prompts, attention_backend="flash_attn")
    assert backend == "flash_attn"
    assert replays >= 30, f"only {replays} decode steps replayed a graph"
    assert [len(t) for t in tokens] == [40] * len(prompts)


def test_flash_attn_graphs_give_the_same_tokens_as_eager(flash_model_dir: Path) -> None:
    prompts = prompts_of(16, seed=2)
    graphed, _, replays = greedy(flash_model_dir, prompts, attention_backend="flash_attn")
    eager, _, none = greedy(flash_model_dir, prompts, attention_backend="flash_attn",
                            enforce_eager=True)  # fmt: skip
    assert replays > 0 and none == 0
    assert graphed == eager


def step_logits(runner: ModelRunner, steps: list[SeqStep]) -> torch.Tensor:
    """Logits of one step (a graph replay when the step is decode-only), in float32."""
    prepared = runner.prepare(StepBatch.from_steps(steps))
    with torch.inference_mode(), runner.on_stream():
        logits = runner._logits(prepared, prepared.input_ids).float()
    torch.cuda.synchronize()
    return logits


def test_flash_attn_and_triton_logits_agree_in_bfloat16(flash_model_dir: Path) -> None:
    """Prefill, mixed, prefill after a cached prefix, graph-replayed decode: same logits."""
    rng = random.Random(5)
    a, b, c = ([rng.randrange(2048) for _ in range(n)] for n in (301, 41, 701))
    spec = SampleSpec(SamplingParams(temperature=0), 0, 0)
    schedule = [
        [SeqStep(a[:300], 0, [0, 1], spec), SeqStep(b[:40], 0, [2], spec)],
        [SeqStep(a[300:301], 300, [0, 1], spec), SeqStep(c[:500], 0, [3, 4], spec)],
        [SeqStep(b[40:41], 40, [2], spec), SeqStep(c[500:700], 500, [3, 4, 5], spec)],
        [SeqStep([7], 301, [0, 1], spec), SeqStep([9], 41, [2], spec),
         SeqStep(c[700:701], 700, [3, 4, 5], spec)],
    ]  # fmt: skip
    logits: dict[str, list[torch.Tensor]] = {}
    for name in ("flash_attn", "triton"):
        engine = engine_for(flash_model_dir, attention_backend=name, num_kv_blocks=8)
        engine._core.load()
        runner = engine._core.runner
        assert runner is not None and runner.attn_backend.name == name
        assert runner.graphs is not None and runner.graphs.fits(
            runner.prepare(StepBatch.from_steps(schedule[-1])).ctx
        )
        logits[name] = [step_logits(runner, steps) for steps in schedule]
        del engine, runner
    for index, (flash, triton) in enumerate(zip(logits["flash_attn"], logits["triton"])):
        err = float((flash - triton).norm() / triton.norm())
        assert err < 2e-2, f"step {index}: relative logits error {err:.2e}"


def test_float32_auto_stays_exact_with_the_torch_backend(flash_model_dir: Path) -> None:
    """flash-attn has no float32: "auto" must pick a backend that keeps greedy parity."""
    prompts = prompts_of(6, seed=6, max_len=200)
    auto, backend, _ = greedy(flash_model_dir, prompts, 24, dtype="float32")
    torch_ref, _, _ = greedy(flash_model_dir, prompts, 24, dtype="float32",
                             attention_backend="torch")  # fmt: skip
    assert backend != "flash_attn"
    assert auto == torch_ref
    reference = load_reference(flash_model_dir)  # transformers, float32, on the CPU
    assert auto == [reference_greedy(reference, p, 24, stop_at_eos=False) for p in prompts]


def test_explicit_flash_attn_refuses_float32(flash_model_dir: Path) -> None:
    engine = engine_for(flash_model_dir, attention_backend="flash_attn", dtype="float32")
    with pytest.raises(ConfigError, match=r"float16 or bfloat16, not torch\.float32"):
        engine._core.load()


def test_explicit_flash_attn_refuses_small_blocks(flash_model_dir: Path) -> None:
    engine = engine_for(flash_model_dir, attention_backend="flash_attn", block_size=16)
    with pytest.raises(ConfigError, match="multiple of 256, got 16"):
        engine._core.load()
