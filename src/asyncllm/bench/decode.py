"""`asyncllm bench decode`: steady-state decode throughput at fixed batch sizes.

For each batch size B, B requests with random prompts of `--prompt-len` tokens and
`--output-len` greedy output tokens (ignore_eos) are submitted at once. Decode throughput is
counted over the window in which all B are decoding (from the last request's first token to
the first request's last token), from each request's token timestamps: output tokens in the
window / its length. So prefill and the ragged tail do not dilute it.

    asyncllm bench decode --model-shape qwen3-30b-a3b --num-layers 8 --batches 1,64,256
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from asyncllm.bench.throughput import add_shape_arguments, random_model_dir, workload
from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.outputs import RequestOutput
from asyncllm.sampling import SamplingParams

__all__ = ["add_parser", "decode_tokens_per_s"]


def decode_tokens_per_s(outputs: list[RequestOutput]) -> tuple[float, float]:
    """(output tok/s, window seconds) over the span in which every request was decoding."""
    token_times = []
    for out in outputs:
        assert out.metrics.ttft is not None
        first = out.metrics.arrival_time + out.metrics.ttft
        token_times.append(list(itertools.accumulate(out.metrics.itl, initial=first)))
    start = max(times[0] for times in token_times)
    end = min(times[-1] for times in token_times)
    count = sum(1 for times in token_times for t in times if start < t <= end)
    return (count / (end - start) if end > start else 0.0), end - start


async def _measure(model_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    overrides: dict[str, Any] = {"enforce_eager": args.enforce_eager or args.moe_impl == "loop"}
    if args.max_num_seqs:
        overrides["max_num_seqs"] = args.max_num_seqs
    engine = AsyncEngine.from_pretrained(str(model_dir), **overrides)
    rows = []
    async with engine:
        vocab = engine._core.model_config.vocab_size
        for batch in map(int, args.batches.split(",")):
            prompts, _ = workload(batch, batch, (args.prompt_len,) * 2, (1, 1), vocab)
            params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
            await engine.generate_many(prompts[: min(batch, 8)], params)  # warm-up
            engine.reset_prefix_cache()
            start = time.perf_counter()
            outs = await engine.generate_many(prompts, params)
            wall = time.perf_counter() - start
            tok_per_s, window = decode_tokens_per_s(outs)
            rows.append({
                "batch": batch, "decode_tok_per_s": tok_per_s, "window_s": window,
                "ms_per_step": 1000 * batch / tok_per_s if tok_per_s else None,
                "wall_s": wall, "output_tokens": sum(len(o.token_ids) for o in outs),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        stats = engine.stats()
        runner = engine._core.runner
        assert runner is not None
        meta = {
            "attention_backend": stats.attention_backend,
            "cuda_graphs": runner.graphs is not None,
        }
    return [row | meta for row in rows]


def add_parser(kinds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`asyncllm bench decode`."""
    p = kinds.add_parser("decode", help="steady-state decode tok/s at fixed batch sizes")
    p.add_argument("--model", default=None, help="model dir (default: a random model)")
    add_shape_arguments(p)
    p.add_argument("--batches", default="1,64,256", help="batch sizes to measure, comma-separated")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--output-len", type=int, default=128, help="tokens decoded per sequence")
    p.add_argument("--max-num-seqs", type=int, default=0, help="default: the engine's")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument(
        "--moe-impl", choices=("fused", "loop"), default="fused",
        help="MoE layers: the fused Triton kernel, or the per-expert torch loop (eager only)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    model_dir = random_model_dir(args)
    with ExitStack() as stack:
        if args.moe_impl == "loop":  # the per-expert loop syncs the host: no CUDA graphs
            from asyncllm.kernels import moe

            stack.enter_context(mock.patch.object(moe, "_triton_moe", return_value=None))
        rows = asyncio.run(_measure(model_dir, args))
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": str(model_dir), "moe_impl": args.moe_impl, "prompt_len": args.prompt_len,
        "output_len": args.output_len, "rows": rows,
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0
