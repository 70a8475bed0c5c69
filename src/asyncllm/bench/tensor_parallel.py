"""`asyncllm bench tp`: tensor parallelism measured, TP=1 against TP=2 in one run.

On a random-weight model of a given shape (default Qwen3-8B's, bf16), for each
tensor_parallel_size in turn:

- decode latency per token (ITL) at batch 1 and batch 64 (prompts of 128 tokens, greedy);
- output tok/s on the nano-vllm workload (256 requests, prompts and outputs U[100, 1024],
  temperature 0.6, ignore_eos), offline (`generate_many`);
- device time of NCCL kernels per decode step on rank 0 (torch profiler over a few decode
  steps), and the step-input broadcast's wall time per step on rank 0;

plus, with two GPUs: all-reduce of one decode step's hidden states, eager and inside a CUDA
graph (2 x layers in a row), NCCL and peer memory, in two processes of their own; TP=2 again
with small sums over peer memory (`peer_all_reduce=True`, after which this process aborts
at exit: see `EngineConfig.peer_all_reduce`; `--skip-peer` skips it); and float32
greedy parity, TP=2 against TP=1, on a small random model. `--broadcast-only` measures the
step-input broadcast alone (two processes, gloo; runs on a CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from asyncllm.bench.model import SHAPES, write_random_qwen3
from asyncllm.bench.throughput import workload
from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.sampling import SamplingParams

__all__ = ["add_parser"]

# A small float32 model whose logits are peaked enough that parity is not decided by ties.
_PARITY_SHAPE: dict[str, Any] = {
    **SHAPES["qwen3-0.6b"], "vocab_size": 2048, "hidden_size": 512, "intermediate_size": 1024,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "tie_word_embeddings": False, "eos_token_id": 2047,
}  # fmt: skip


def add_parser(kinds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`asyncllm bench tp`."""
    p = kinds.add_parser("tp", help="tensor parallelism: TP=1 vs TP=2, ITL, tok/s, NCCL time")
    p.add_argument("--model-shape", choices=sorted(SHAPES), default="qwen3-8b",
                   help="shape of the random model (default: qwen3-8b)")  # fmt: skip
    p.add_argument("--model", default=None, help="model dir (default: a random --model-shape)")
    p.add_argument("--work-dir", default=None, help="where random models are written")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="tensor_parallel_size")
    p.add_argument("--num-requests", type=int, default=256,
                   help="requests of the throughput run (default: 256)")  # fmt: skip
    p.add_argument("--itl-tokens", type=int, default=128,
                   help="tokens generated per request when timing ITL (default: 128)")  # fmt: skip
    p.add_argument(
        "--num-decode-steps",
        type=int,
        default=0,
        help="decode steps per launch of every engine (default: 0, the engine's "
        "default); the ITL medians then count gaps inside a launch: read the means",
    )
    p.add_argument("--skip-throughput", action="store_true", help="skip the throughput run")
    p.add_argument("--skip-parity", action="store_true", help="skip the float32 parity check")
    p.add_argument("--skip-peer", action="store_true",
                   help="skip TP=2 with small sums over peer memory (peer_all_reduce)")  # fmt: skip
    p.add_argument("--broadcast-only", action="store_true",
                   help="only time the step-input broadcast (two processes, gloo)")  # fmt: skip
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    work = Path(args.work_dir or tempfile.gettempdir())
    result: dict[str, Any] = {"device": _device_name(), "gpus": torch.cuda.device_count()}

    def save() -> None:  # after every phase: a later one that fails loses nothing before it
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    if args.broadcast_only:
        result["broadcast"] = broadcast_probe()
    else:
        _full(args, work, result, save)
    save()
    print(json.dumps(result, indent=2))
    return 0


def _full(args: argparse.Namespace, work: Path, result: dict[str, Any], save: Any) -> None:
    result["model_shape"] = args.model_shape
    draw = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model:
        model_dir = Path(args.model)
    else:
        model_dir = work / f"asyncllm-{args.model_shape}-random"
        started = time.perf_counter()
        write_random_qwen3(model_dir, SHAPES[args.model_shape], device=draw)
        result["model_write_s"] = time.perf_counter() - started
    shape = json.loads((model_dir / "config.json").read_text())
    save()
    if torch.cuda.device_count() >= 2:
        result["allreduce"] = allreduce_probe(shape["hidden_size"], shape["num_hidden_layers"])
        save()
    runs = [(f"tp{size}", size, False) for size in args.sizes]
    if 2 in args.sizes and torch.cuda.device_count() >= 2 and not args.skip_peer:
        runs.append(("tp2_peer", 2, True))
    for name, size, peer in runs:
        started = time.perf_counter()
        try:
            result[name] = asyncio.run(_measure(model_dir, size, args, peer))
        except Exception as exc:  # record it, and still measure the other sizes
            traceback.print_exc()
            result[name] = {"error": repr(exc)}
        result[name]["total_s"] = time.perf_counter() - started
        _release_memory()
        save()
    _ratios(result, args.sizes)
    if not args.skip_parity and 2 in args.sizes:
        parity_dir = write_random_qwen3(work / "asyncllm-parity-random", _PARITY_SHAPE, std=0.08,
                                        device=draw)  # fmt: skip
        result["parity_float32"] = asyncio.run(_parity(parity_dir))


def _ratios(result: dict[str, Any], sizes: list[int]) -> None:
    if 1 not in sizes or 2 not in sizes or "error" in result["tp1"] or "error" in result["tp2"]:
        return
    one, two = result["tp1"], result["tp2"]
    # Several decode steps per launch deliver tokens in bursts: the median gap is then 0.
    stat = "median_ms" if one.get("num_decode_steps", 1) == 1 else "mean_ms"
    result["tp2_vs_tp1"] = {
        "itl_batch1": two["itl_batch1"][stat] / one["itl_batch1"][stat],
        "itl_batch64": two["itl_batch64"][stat] / one["itl_batch64"][stat],
        "itl_statistic": stat,
        "targets": {"itl_batch1": "<= 0.6", "throughput": ">= 1.6"},
    }
    if "throughput" in one and "throughput" in two:
        result["tp2_vs_tp1"]["throughput"] = (
            two["throughput"]["tok_per_s"] / one["throughput"]["tok_per_s"]
        )


# ---- one engine ------------------------------------------------------------------------------


async def _measure(
    model_dir: Path, size: int, args: argparse.Namespace, peer: bool
) -> dict[str, Any]:
    started = time.perf_counter()
    steps = {"num_decode_steps": args.num_decode_steps} if args.num_decode_steps else {}
    engine = AsyncEngine.from_pretrained(
        str(model_dir), tensor_parallel_size=size, peer_all_reduce=peer, **steps
    )
    out: dict[str, Any] = {"num_decode_steps": engine._core.config.num_decode_steps}
    async with engine:
        out["start_s"] = time.perf_counter() - started
        runner = engine._core.runner
        assert runner is not None
        out["kv_blocks"] = runner.num_kv_blocks
        out["cuda_graphs"] = runner.graphs is not None
        out["peer_all_reduce"] = runner.tp.peer is not None
        await engine.generate_many([[5] * 300] * 8, SamplingParams(max_tokens=8))  # warm-up
        engine.reset_prefix_cache()
        for batch in (1, 64):
            out[f"itl_batch{batch}"] = await _itl(engine, batch, args.itl_tokens)
            out[f"itl_batch{batch}"] |= await _profile_decode(engine, batch)
        if not args.skip_throughput:
            out["throughput"] = await _throughput(engine, args.num_requests)
    return out


def _broadcast_totals(engine: AsyncEngine) -> tuple[int, float, float]:
    """(steps sent, rank 0's own seconds in `send`, the sender thread's broadcast seconds)."""
    runner = engine._core.runner
    sender = runner.workers.sender if runner is not None and runner.workers else None
    if sender is None:
        return 0, 0.0, 0.0
    return sender.num_sent, sender.seconds, sender.transfer_seconds


def _broadcast_per_step(engine: AsyncEngine, before: tuple[int, float, float]
                        ) -> dict[str, float] | None:  # fmt: skip
    """Microseconds per step: on rank 0's loop (`send`) and in the broadcast itself."""
    count, seconds, transfer = _broadcast_totals(engine)
    steps = count - before[0]
    if not steps:
        return None
    return {"rank0_us": (seconds - before[1]) / steps * 1e6,
            "transfer_us": (transfer - before[2]) / steps * 1e6}  # fmt: skip


def _prompts(batch: int, length: int, salt: int, vocab: int) -> list[list[int]]:
    # Distinct prompts (no prefix-cache hits between them or across runs).
    return [[(salt * 7919 + i * 131 + j * 17) % (vocab - 1) + 1 for j in range(length)]
            for i in range(batch)]  # fmt: skip


def _vocab(engine: AsyncEngine) -> int:
    return engine._core.model_config.vocab_size


async def _itl(engine: AsyncEngine, batch: int, tokens: int) -> dict[str, Any]:
    """Median/mean inter-token latency of `batch` requests decoding together."""
    engine.reset_prefix_cache()
    before = _broadcast_totals(engine)
    greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    outs = await engine.generate_many(_prompts(batch, 128, batch, _vocab(engine)), greedy)
    gaps = [gap for out in outs for gap in out.metrics.itl[4:]]  # after the ramp-up
    return {
        "batch": batch,
        "median_ms": statistics.median(gaps) * 1e3,
        "mean_ms": statistics.fmean(gaps) * 1e3,
        "broadcast_us_per_step": _broadcast_per_step(engine, before),
    }


async def _profile_decode(engine: AsyncEngine, batch: int, steps: int = 24) -> dict[str, Any]:
    """Device time per decode step on rank 0, of everything and of NCCL kernels alone."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return {}
    greedy = SamplingParams(temperature=0, max_tokens=steps + 40, ignore_eos=True)
    streams = [engine.stream(p, greedy) for p in _prompts(batch, 128, batch + 1, _vocab(engine))]
    for stream in streams:  # prefill done, everyone decoding
        await stream.__anext__()
    for _ in range(4):
        await streams[0].__anext__()
    first = engine.stats().num_steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            await streams[0].__anext__()
        torch.cuda.synchronize()
    counted = engine.stats().num_steps - first
    for stream in streams:
        await stream.aclose()
    kernels = [(e.key.lower(), _device_us(e)) for e in prof.key_averages()]
    nccl = sum(us for key, us in kernels if "nccl" in key)
    peer = sum(us for key, us in kernels if "all_reduce" in key and "nccl" not in key)
    total = sum(us for _, us in kernels)
    return {
        "profiled_steps": counted,
        "device_us_per_step": total / counted if counted else None,
        "nccl_us_per_step": nccl / counted if counted else None,
        "peer_all_reduce_us_per_step": peer / counted if counted else None,
    }


def _device_us(event: Any) -> float:
    value: Any = getattr(event, "device_time_total", None)
    if value is None:  # older torch
        value = getattr(event, "cuda_time_total", 0.0)
    return float(value)


async def _throughput(engine: AsyncEngine, num_requests: int) -> dict[str, Any]:
    """The nano-vllm workload, offline."""
    shape = engine._core.model_config
    prompts, lengths = workload(num_requests, 0, (100, 1024), (100, 1024), shape.vocab_size)
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in lengths]
    engine.reset_prefix_cache()
    before, steps = _broadcast_totals(engine), engine.stats().num_steps
    started = time.perf_counter()
    await engine.generate_many(prompts, params)
    elapsed = time.perf_counter() - started
    return {
        "seconds": elapsed,
        "output_tokens": sum(lengths),
        "tok_per_s": sum(lengths) / elapsed,
        "steps": engine.stats().num_steps - steps,
        "broadcast_us_per_step": _broadcast_per_step(engine, before),
    }


async def _parity(model_dir: Path) -> dict[str, Any]:
    """Greedy tokens of TP=2 against TP=1, float32, the same 32 prompts."""
    vocab = _PARITY_SHAPE["vocab_size"]
    prompts = [p[: 20 + 9 * i] for i, p in enumerate(_prompts(32, 300, 3, vocab))]
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    tokens = {}
    for size in (1, 2):
        engine = AsyncEngine.from_pretrained(str(model_dir), tensor_parallel_size=size,
                                             dtype="float32", max_num_seqs=32)  # fmt: skip
        async with engine:
            tokens[size] = [o.token_ids for o in await engine.generate_many(prompts, greedy)]
        _release_memory()
    same = [a == b for a, b in zip(tokens[1], tokens[2])]
    return {"prompts": len(prompts), "identical": sum(same), "all_identical": all(same)}


def _release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ---- two-process probes ----------------------------------------------------------------------

_PROBE = (
    "import json, sys\n"
    "from asyncllm.bench.tensor_parallel import probe_rank\n"
    "probe_rank(json.loads(sys.argv[1]))\n"
)


def _two_ranks(kind: str, settings: dict[str, Any], timeout_s: float = 90.0) -> Any:
    """Run `probe_rank` of `kind` in two fresh processes; rank 0's JSON result."""
    from asyncllm.engine.workers import _loopback_store

    store = _loopback_store(3)  # this process holds the store; the ranks are its clients
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        procs = [
            subprocess.Popen([sys.executable, "-c", _PROBE, json.dumps(
                {**settings, "kind": kind, "rank": rank, "port": store.port, "out": str(out)})])
            for rank in (0, 1)
        ]  # fmt: skip
        try:
            for proc in procs:
                proc.wait(timeout_s)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        if not out.is_file():
            return {"error": f"probe failed: exit codes {[p.returncode for p in procs]}"}
        return json.loads(out.read_text())


def allreduce_probe(hidden: int, layers: int) -> Any:
    """NCCL all-reduce time of one decode step's hidden states [batch, hidden] (bf16) through
    the engine's own group code: eager, and inside a CUDA graph of 2 x layers calls."""
    return _two_ranks("allreduce", {"hidden": hidden, "layers": layers})


def broadcast_probe() -> Any:
    """Wall time of the step-input broadcast (the engine's own encoder and gloo group) for
    decode steps of 1, 64 and 256 sequences."""
    return _two_ranks("broadcast", {})


def probe_rank(settings: dict[str, Any]) -> None:
    """One rank of a probe (run by `_two_ranks` in a fresh process)."""
    import torch.distributed

    from asyncllm.parallel import connect

    rank, kind = settings["rank"], settings["kind"]
    dist: Any = torch.distributed
    store = dist.TCPStore("127.0.0.1", settings["port"], 3, is_master=False)
    cuda = kind == "allreduce"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    tp = connect(dist.PrefixStore(kind, store), rank, 2, device, loopback=True,
                 peer_all_reduce=cuda)  # fmt: skip
    try:
        result = _allreduce_times(tp, settings) if cuda else _broadcast_times(tp)
    finally:
        tp.close()
    if rank == 0:
        Path(settings["out"]).write_text(json.dumps(result))


def _allreduce_times(tp: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Each path's time per all-reduce, for one decode step's hidden states at a few batch
    sizes: NCCL always, and peer memory (one-shot and two-shot) when this machine has it."""
    from asyncllm.parallel import PeerAllReduce

    hidden, calls = settings["hidden"], 2 * settings["layers"]
    paths = {"nccl": dataclasses.replace(tp, peer=None)}
    if tp.peer is not None:
        paths["peer"] = tp
        # The same mapped buffer, every sum two-shot (closed with `tp`'s own).
        two_shot = PeerAllReduce(tp.peer.buffer, tp.peer.group_name, two_shot_bytes=0)
        paths["peer_two_shot"] = dataclasses.replace(tp, peer=two_shot)
    out: dict[str, Any] = {"calls_per_step": calls, "peer_available": tp.peer is not None}
    for batch in (1, 8, 64, 256, 512):
        for name, group in paths.items():
            x = torch.full((batch, hidden), float(tp.rank + 1), dtype=torch.bfloat16,
                           device="cuda")  # fmt: skip
            if group.peer is not None and not group.peer.fits(x):
                continue  # NCCL's, whichever path is asked for
            try:
                out[f"{name}_batch{batch}"] = _path_times(group, x, calls)
            except Exception as exc:  # a path this torch build lacks: say so, go on
                out[f"{name}_batch{batch}"] = {"error": repr(exc)}
    return out


def _path_times(tp: Any, x: torch.Tensor, calls: int) -> dict[str, Any]:
    ones = x.clone()  # each rank's rank + 1 (NCCL sums `x` in place below)
    assert bool((tp.all_reduce(ones.clone()) == 3).all()), "all-reduce gave a wrong sum"
    eager_us = _timed_us(lambda: tp.all_reduce(x), repeats=200)
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        tp.all_reduce(ones.clone())
    torch.cuda.synchronize()
    y = ones.clone()
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        z = y
        for _ in range(calls):
            z = tp.all_reduce(z)
    graph.replay()
    torch.cuda.synchronize()
    # Each replayed all-reduce doubles the sum of the two ranks' (1 + 2): exact in bf16.
    assert bool((z == 3.0 * 2.0 ** (calls - 1)).all()), "graph sum wrong"
    graph_us = _timed_us(graph.replay, repeats=20) / calls
    return {
        "bytes": x.numel() * x.element_size(),
        "eager_us": eager_us,
        "graph_us": graph_us,
        "graph_us_per_step": graph_us * calls,
    }


def _timed_us(fn: Any, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1e6


def _broadcast_times(tp: Any) -> dict[str, Any]:
    from asyncllm.engine.inputs import SampleSpec, StepBatch, pack_step
    from asyncllm.engine.step_channel import StepReceiver, StepSender

    if tp.rank != 0:  # one receiver for the whole probe, as in a worker
        receiver = StepReceiver(tp)
        while receiver.recv() is not None:
            pass
        return {}
    out: dict[str, Any] = {}
    sender, repeats = StepSender(tp), 300
    sampled = SampleSpec(SamplingParams(temperature=0.6), 0, 0)
    for batch in (1, 64, 256):
        steps = StepBatch()
        for i in range(batch):  # decodes at ~800 tokens of context: 50 blocks each
            steps.add([1], 800, list(range(i * 50, i * 50 + 50)), None, sampled)
        host = pack_step(steps, 16)
        own, transfer = sender.seconds, sender.transfer_seconds
        for _ in range(repeats):
            sender.send(host)
        sender.wait_sent(timeout_s=60)
        out[f"batch{batch}"] = {
            "rank0_us_per_step": (sender.seconds - own) / repeats * 1e6,
            "transfer_us_per_step": (sender.transfer_seconds - transfer) / repeats * 1e6,
        }
    sender.stop(timeout_s=30)
    return out
