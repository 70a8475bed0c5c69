"""Where a decode step's device time goes: torch.profiler over graphed (and eager) steps.

    python benchmarks/profile_step.py --batch 256 --context 550 --spread --block-size 256
    python benchmarks/profile_step.py --shape qwen3-8b --batch 1 --context 128

Uses a random model of the named shape (written on first use), hand-made block tables, and
the engine's own runner; prints the time per step, the kernels by category (count and device
time per step) and the kernels that take the most device time.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from asyncllm.bench.model import SHAPES, write_random_checkpoint
from asyncllm.config import EngineConfig
from asyncllm.engine.runner import ModelRunner, SampleSpec, SeqStep
from asyncllm.model.config import ModelConfig
from asyncllm.sampling import SamplingParams

# Kernel name fragment -> category, first match wins (lower-case).
CATEGORIES = (
    ("nccl", "all-reduce"), ("all_reduce", "all-reduce"), ("allreduce", "all-reduce"),
    ("decode_", "attention"), ("prefill", "attention"), ("flash", "attention"),
    ("store_kv", "kv store"), ("qk_norm_rope", "qk norm+rope"), ("rms_norm", "norms"),
    ("silu", "silu*mul"), ("gumbel", "sampler"), ("argmax", "sampler"),
    ("gemm", "gemm"), ("nvjet", "gemm"), ("cutlass", "gemm"), ("xmma", "gemm"),
    ("memcpy", "copies"), ("copy", "copies"), ("fill", "copies"), ("index", "copies"),
)  # fmt: skip


def decode_steps(batch: int, context: int, block_size: int, blocks: int,
                 spread: bool = False) -> list[SeqStep]:  # fmt: skip
    """One decode token per sequence; contexts all `context`, or U[100, 2 * context] with
    `spread` (as in a real batch)."""
    rng = random.Random(0)
    ids = list(range(blocks))
    rng.shuffle(ids)
    spec = SampleSpec(SamplingParams(temperature=0.6), 0, 0)
    steps, used = [], 0
    for _ in range(batch):
        length = rng.randint(100, 2 * context) if spread else context
        count = -(-(length + 1) // block_size)
        steps.append(SeqStep([rng.randrange(1000)], length, ids[used : used + count], spec))
        used += count
    return steps


def category(name: str) -> str:
    lower = name.lower()
    return next((c for key, c in CATEGORIES if key in lower), "other")


def breakdown(prof: profile, steps: int) -> dict[str, dict[str, float]]:
    """Device kernels by category: launches and milliseconds per step."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0.0, "ms": 0.0})
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        row = out[category(event.name)]
        row["count"] += 1 / steps
        row["ms"] += event.device_time / 1e3 / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms"]))


def run(args: argparse.Namespace, eager: bool, model_dir: Path) -> dict[str, object]:
    blocks = max(2000, args.batch * (2 * args.context // args.block_size + 2))
    config = EngineConfig(model=str(model_dir), num_kv_blocks=blocks, enforce_eager=eager,
                          max_num_seqs=max(args.batch, 8), block_size=args.block_size,
                          attention_backend=args.attention_backend,
                          kv_cache_dtype=args.kv_cache_dtype)  # fmt: skip
    runner = ModelRunner(model_dir, ModelConfig.from_dir(model_dir), config)
    steps = decode_steps(args.batch, args.context, args.block_size, blocks, args.spread)
    for _ in range(3):
        runner.execute(steps)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(runner.stream)
    for _ in range(20):
        runner.execute(steps)
    end.record(runner.stream)
    end.synchronize()
    step_ms = start.elapsed_time(end) / 20
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            runner.execute(steps)
        torch.cuda.synchronize()
    label = "eager" if eager else "graphs"
    cats = breakdown(prof, 5)
    print(
        f"\n{label}: {step_ms:.3f} ms per step (shape {args.shape}, batch {args.batch}, "
        f"context {args.context}{' spread' if args.spread else ''}, block {args.block_size}, "
        f"KV cache {args.kv_cache_dtype})"
    )
    for name, row in cats.items():
        print(f"  {name:14s} {row['count']:7.1f} kernels {row['ms']:8.3f} ms")
    print(
        f"  {'device total':14s} {sum(r['count'] for r in cats.values()):7.1f} kernels "
        f"{sum(r['ms'] for r in cats.values()):8.3f} ms"
    )
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    del runner
    torch.cuda.empty_cache()
    return {"mode": label, "step_ms": step_ms, "categories": cats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=1900)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    parser.add_argument("--rows", type=int, default=25, help="kernels to print")
    parser.add_argument("--spread", action="store_true", help="vary contexts in the batch")
    parser.add_argument("--eager", action="store_true", help="also profile eager steps")
    parser.add_argument("--out", type=Path, help="append the breakdown as a JSON line")
    args = parser.parse_args()
    root = Path(tempfile.gettempdir()) / f"asyncllm-{args.shape}-random"
    model_dir = write_random_checkpoint(root, SHAPES[args.shape], device="cuda")
    results = [run(args, eager, model_dir) for eager in ((True, False) if args.eager else (False,))]
    if args.out is not None:
        with args.out.open("a") as f:
            line = {"args": vars(args) | {"out": str(args.out)}, "runs": results}
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
