"""Where a decode step's device time goes: torch.profiler over eager and graphed steps.

    python benchmarks/profile_step.py --batch 16 --context 1900

Uses the random Qwen3-0.6B-shaped model (written on first use), hand-made block tables, and
the engine's own runner, then prints the kernels that take the most device time.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from asyncllm.bench.model import write_random_qwen3
from asyncllm.config import EngineConfig
from asyncllm.engine.runner import ModelRunner, SampleSpec, SeqStep
from asyncllm.kernels.triton_attn import DecodeTuning
from asyncllm.model.config import ModelConfig
from asyncllm.sampling import SamplingParams


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


def attention_ms(runner: ModelRunner, steps: list[SeqStep]) -> float:
    """Device time of the decode attention kernels (split + reduce) per step."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner.execute(steps)
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages() if "decode_" in e.key)
    return total / 3 / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=1900)
    parser.add_argument("--rows", type=int, default=25, help="kernels to print")
    parser.add_argument("--spread", action="store_true", help="vary contexts in the batch")
    parser.add_argument(
        "--sweep-splits", action="store_true", help="time decode attention per programs_per_sm"
    )
    args = parser.parse_args()
    model_dir = write_random_qwen3(Path(tempfile.gettempdir()) / "asyncllm-qwen3-0.6b-random")
    for eager in (True, False):
        config = EngineConfig(model=str(model_dir), num_kv_blocks=20000, enforce_eager=eager,
                              max_num_seqs=256)  # fmt: skip
        runner = ModelRunner(model_dir, ModelConfig.from_dir(model_dir), config)
        steps = decode_steps(args.batch, args.context, config.block_size, 20000, args.spread)
        if eager and args.sweep_splits:
            backend = runner.attn_backend
            for per_sm in (2, 4, 8, 16, 32):
                backend.decode_tuning = DecodeTuning(programs_per_sm=per_sm)  # type: ignore[attr-defined]
                runner.execute(steps)  # compile
                print(f"programs_per_sm {per_sm}: attention {attention_ms(runner, steps):.3f} ms")
            backend.decode_tuning = DecodeTuning()  # type: ignore[attr-defined]
        for _ in range(3):
            runner.execute(steps)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(runner.stream)
        for _ in range(10):
            runner.execute(steps)
        end.record(runner.stream)
        end.synchronize()
        label = "eager" if eager else "graphs"
        print(f"\n{label}: {start.elapsed_time(end) / 10:.3f} ms per step "
              f"(batch {args.batch}, context {args.context})")  # fmt: skip
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                runner.execute(steps)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
        del runner
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
