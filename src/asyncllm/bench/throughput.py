"""`asyncllm bench throughput`: the nano-vllm workload, asyncllm against its peers, one run.

256 requests (seed 0) with prompts of U[100, 1024] random token ids and U[100, 1024] output
tokens, ignore_eos, temperature 0.6, on a published model's exact shape (`--model-shape`,
default Qwen3-0.6B; see `asyncllm.bench.model.SHAPES`) with random bf16 weights.
Measured one after the other:

(a) asyncllm offline (`generate_many`);
(b) asyncllm with one `stream()` consumer per request, while a heartbeat coroutine in the same
    loop measures event-loop lag;
(c) the device's copy bandwidth and matrix rate, and from them the workload's floor
    (`asyncllm.bench.floor`);
(d) each of `--peers` (nano-vllm, transformers' continuous batching) in a process of its own
    on the same prompts and output lengths (`asyncllm.bench.peers`); one that cannot run
    here is skipped, and its entry in the JSON says why.

    asyncllm bench throughput --peers nano-vllm,transformers --block-size 256 --out t.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import anyio
import torch

from asyncllm.bench.floor import measure_copy_bandwidth, measure_matmul_rate, workload_floor
from asyncllm.bench.loop_lag import LagMonitor
from asyncllm.bench.model import SHAPES, write_random_checkpoint
from asyncllm.bench.peers import (
    PEERS,
    PeerOptions,
    PeerWorkload,
    default_nano_vllm_path,
    parse_peers,
    run_peers,
)
from asyncllm.bench.trace import StepTrace, summarize
from asyncllm.config import ATTENTION_BACKEND_NAMES, KV_CACHE_DTYPES
from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.sampling import SamplingParams

__all__ = ["add_parser", "peer_ratios", "random_model_dir", "workload"]


def workload(
    num_requests: int, seed: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
    vocab_size: int,
) -> tuple[list[list[int]], list[int]]:  # fmt: skip
    """Random prompts (token ids) and output lengths, reproducible from `seed`."""
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_range))]
        for _ in range(num_requests)
    ]
    outputs = [rng.randint(*output_range) for _ in range(num_requests)]
    return prompts, outputs


async def _offline(engine: AsyncEngine, prompts: list[list[int]], params: list[SamplingParams]
                   ) -> float:  # fmt: skip
    start = time.perf_counter()
    outs = await engine.generate_many(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(o.usage.completion_tokens == p.max_tokens for o, p in zip(outs, params))
    return elapsed


async def _streams(engine: AsyncEngine, prompts: list[list[int]], params: list[SamplingParams]
                   ) -> tuple[float, dict[str, float]]:  # fmt: skip
    monitor = LagMonitor()

    async def consume(prompt: list[int], sp: SamplingParams) -> None:
        async for _ in engine.stream(prompt, sp):
            pass

    async with anyio.create_task_group() as lag_group:
        lag_group.start_soon(monitor.run)
        start = time.perf_counter()
        async with anyio.create_task_group() as group:
            for prompt, sp in zip(prompts, params):
                group.start_soon(consume, prompt, sp)
        elapsed = time.perf_counter() - start
        lag = monitor.stop()
    return elapsed, lag


async def _asyncllm(model_dir: Path, prompts: list[list[int]], outputs: list[int],
                    args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    overrides: dict[str, Any] = {
        "enforce_eager": args.enforce_eager,
        "attention_backend": args.attention_backend,
        "kv_cache_dtype": args.kv_cache_dtype,
    }
    if args.block_size:
        overrides["block_size"] = args.block_size
    if args.num_decode_steps:
        overrides["num_decode_steps"] = args.num_decode_steps
    if args.max_num_batched_tokens:
        overrides["max_num_batched_tokens"] = args.max_num_batched_tokens
    engine = AsyncEngine.from_pretrained(str(model_dir), **overrides)
    params = [SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True)
              for n in outputs]  # fmt: skip
    result: dict[str, Any] = {}
    async with engine:
        # Warm-up with real prompt lengths: full-size prefill chunks allocate their memory now.
        await engine.generate_many(prompts[:16], SamplingParams(max_tokens=8))
        engine.reset_prefix_cache()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trace = StepTrace(engine) if args.trace else None
        with trace.run("offline") if trace else nullcontext():
            result["offline_s"] = await _offline(engine, prompts, params)
        engine.reset_prefix_cache()  # run (b) must prefill its prompts like run (a)
        with trace.run("streams") if trace else nullcontext():
            result["streams_s"], result["loop_lag"] = await _streams(engine, prompts, params)
        if trace is not None:
            result["trace"] = trace.events
            result["trace_summary"] = summarize(trace.events)
        stats = engine.stats()
        runner = engine._core.runner
        assert runner is not None
        result["kv_cache"] = {
            "blocks": stats.kv_blocks_total,
            "block_size": runner.block_size,
            "tokens": stats.kv_blocks_total * runner.block_size,
            "gib": stats.kv_blocks_total * runner.kv_block_bytes / 2**30,
        }
        result["attention_backend"] = stats.attention_backend
        result["num_decode_steps"] = engine.config.num_decode_steps
        result["step_seconds"] = stats.step_seconds
        result["steps"] = stats.num_steps
        result["cuda_graphs"] = runner.graphs is not None
        result["device_type"] = runner.device.type
        result["dtype"] = str(runner.dtype).removeprefix("torch.")
        result["kv_cache_dtype"] = str(runner.kv_dtype).removeprefix("torch.")
        result["max_num_batched_tokens"] = engine.config.max_num_batched_tokens
        if torch.cuda.is_available():
            result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def add_parser(kinds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`asyncllm bench throughput`."""
    p = kinds.add_parser("throughput", help="nano-vllm workload: asyncllm vs its peers")
    p.add_argument("--model", default=None, help="model dir (default: a random --model-shape)")
    add_shape_arguments(p)
    p.add_argument("--num-requests", type=int, default=256, help="requests (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload (default: 0)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"),
                   help="prompt lengths, uniform in [MIN, MAX] (default: 100 1024)")  # fmt: skip
    p.add_argument("--output-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"),
                   help="output lengths, uniform in [MIN, MAX] (default: 100 1024)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.6,
                   help="sampling temperature (default: 0.6)")  # fmt: skip
    p.add_argument("--block-size", type=int, default=0,
                   help="KV block size (default: 0, the engine's default)")  # fmt: skip
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKEND_NAMES,
                   help="attention kernels to use (default: auto)")  # fmt: skip
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="what the KV cache stores (default: auto, the compute dtype; "
                        "peers keep theirs)")  # fmt: skip
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    p.add_argument("--num-decode-steps", type=int, default=0,
                   help="decode steps per launch (default: 0, the engine's default)")  # fmt: skip
    p.add_argument("--max-num-batched-tokens", type=int, default=0,
                   help="tokens per step (default: 0, the engine's default)")  # fmt: skip
    p.add_argument("--peers", type=_peers_argument, default=("transformers",),
                   help=f"peers to run on the same workload, each in its own process: "
                        f"comma-separated from {','.join(PEERS)}, or none "
                        f"(default: transformers)")  # fmt: skip
    p.add_argument("--nano-vllm-path", type=Path, default=None,
                   help=f"folder holding nano-vllm's nanovllm package (default: "
                        f"$NANO_VLLM_PATH, else {PeerOptions().nano_vllm_path})")  # fmt: skip
    p.add_argument("--peer-timeout", type=_positive_seconds, default=PeerOptions().timeout_s,
                   help="seconds each peer may take (default: %(default)s)")  # fmt: skip
    p.add_argument("--skip-transformers", action="store_true",
                   help="leave transformers out of --peers")  # fmt: skip
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--trace", default=None,
                   help="write per-phase timestamps (JSON) here; the results then also hold "
                        "trace_summary (asyncllm.bench.trace)")  # fmt: skip
    p.set_defaults(run=_run)


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """--model-shape, --num-layers, --work-dir: which random model to write (and where)."""
    p.add_argument("--model-shape", default="qwen3-0.6b", choices=sorted(SHAPES),
                   help="shape of the random model written when --model is not given "
                        "(default: qwen3-0.6b)")  # fmt: skip
    p.add_argument("--num-layers", type=int, default=None,
                   help="keep this many decoder layers of the shape (default: all)")  # fmt: skip
    p.add_argument("--work-dir", default=None,
                   help="where the random model is written (default: temp dir)")  # fmt: skip


def random_model_dir(args: argparse.Namespace) -> Path:
    """`--model`, or the random model of `--model-shape` (written on first use)."""
    if args.model:
        return Path(args.model)
    config = dict(SHAPES[args.model_shape])
    name = f"asyncllm-{args.model_shape}-random"
    if args.num_layers is not None:
        config["num_hidden_layers"] = args.num_layers
        name += f"-{args.num_layers}-layers"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return write_random_checkpoint(Path(args.work_dir or tempfile.gettempdir()) / name, config,
                              device=device)  # fmt: skip


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"--peer-timeout must be a positive number, got {text!r}")
    return seconds


def _peers_argument(text: str) -> tuple[str, ...]:
    try:
        return parse_peers(text)
    except ValueError as exc:  # argparse reports it as a usage error
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _run(args: argparse.Namespace) -> int:
    model_dir = random_model_dir(args)
    config = json.loads((model_dir / "config.json").read_text())
    prompts, outputs = workload(args.num_requests, args.seed, tuple(args.prompt_len),
                                tuple(args.output_len), config["vocab_size"])  # fmt: skip
    total_out = sum(outputs)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": str(model_dir),
        "requests": len(prompts),
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens": total_out,
    }
    result |= asyncio.run(_asyncllm(model_dir, prompts, outputs, args))
    if args.trace:
        Path(args.trace).write_text(json.dumps(result.pop("trace")))
    result["offline_tok_per_s"] = total_out / result["offline_s"]
    result["streams_tok_per_s"] = total_out / result["streams_s"]
    _release_device_memory()
    result |= _floor(config, prompts, outputs, result)
    _release_device_memory()  # the peers size their KV caches from the free memory
    peer_workload = PeerWorkload(
        model_dir=str(model_dir), prompts=prompts, output_lens=outputs,
        temperature=args.temperature, device=result["device_type"], dtype=result["dtype"],
    )  # fmt: skip
    result["peers"] = _run_peers(args, peer_workload)
    result |= peer_ratios(result["offline_tok_per_s"], result["peers"])
    _print_peer_notes(result["peers"])
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def _run_peers(args: argparse.Namespace, workload: PeerWorkload) -> dict[str, dict[str, Any]]:
    """`--peers` (less transformers under `--skip-transformers`), one after the other."""
    names = tuple(p for p in args.peers if not (args.skip_transformers and p == "transformers"))
    options = PeerOptions(
        nano_vllm_path=args.nano_vllm_path or default_nano_vllm_path(),
        timeout_s=args.peer_timeout,
    )
    return run_peers(names, workload, options)


def peer_ratios(offline_tok_per_s: float, peers: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`ratio_offline_vs_<peer>`: asyncllm's offline tok/s over each peer's that ran."""
    return {
        f"ratio_offline_vs_{name}": offline_tok_per_s / peer["tok_per_s"]
        for name, peer in peers.items()
        if peer.get("tok_per_s")
    }


def _floor(config: dict[str, Any], prompts: list[list[int]], outputs: list[int],
           result: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The workload's floor on this device, with both rates measured now."""
    device = torch.device(result["device_type"])
    dtype = getattr(torch, result["dtype"])
    kv_dtype = getattr(torch, result["kv_cache_dtype"])
    floor = workload_floor(
        config, [len(p) for p in prompts], outputs, dtype_bytes=dtype.itemsize,
        kv_dtype_bytes=kv_dtype.itemsize,
        max_batched_tokens=result["max_num_batched_tokens"],
        copy_bytes_per_s=measure_copy_bandwidth(device),
        matmul_flop_per_s=measure_matmul_rate(device, dtype),
    )  # fmt: skip
    return {
        "floor_tok_per_s": floor.tok_per_s,
        "floor": floor._asdict(),
        "offline_vs_floor": result["offline_tok_per_s"] / floor.tok_per_s,
    }


def _release_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _print_peer_notes(peers: dict[str, dict[str, Any]]) -> None:
    """One line per peer that did not run, on stderr, so a skip is never silent."""
    for name, peer in peers.items():
        if "skipped" in peer:
            print(f"note: peer {name} skipped: {peer['skipped']}", file=sys.stderr)
        elif "error" in peer:
            print(f"note: peer {name} failed: {peer['error']}", file=sys.stderr)
