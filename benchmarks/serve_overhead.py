"""What the HTTP layer costs in CPU time per streamed token, with the model stubbed out.

    python benchmarks/serve_overhead.py [--streams 128] [--output-len 100 200]

The engine runs the embedded model's tokenizer and the whole loop, but each step's launch
returns random tokens at once (as `asyncllm bench scheduler --engine-loop` does), so what
remains is the CPU work around the model: (a) in one process, `AsyncEngine.stream()`
readers; (b) `asyncllm serve`'s app on uvicorn in a child process, driven by
`asyncllm bench serve --url`. Reports CPU microseconds per token for each (for (b), the
server process's CPU only). On the GPU this CPU work shares the engine loop's thread, so it
is what bounds HTTP throughput against in-process streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from asyncllm import AsyncEngine, SamplingParams
from asyncllm.engine.runner import LaunchedStep
from asyncllm.layers.sampler import SamplerOutput


def stub_launch(prepared: Any, previous: Any) -> LaunchedStep:
    tokens = torch.randint(5, 1000, (prepared.sampling.seeds.shape[0],))
    return LaunchedStep(tokens, SamplerOutput(tokens, None, None, None), None)


def stub_engine(streams: int) -> AsyncEngine:
    return AsyncEngine.from_pretrained(
        None, device="cpu", num_kv_blocks=streams * 96, max_num_seqs=streams,
        overlap_scheduling=True,
    )  # fmt: skip


async def serve(port: int, streams: int, max_event_rate: float) -> None:
    """The child process: the stubbed engine behind the real app, on uvicorn."""
    import uvicorn

    from asyncllm.server import create_app

    engine = stub_engine(streams)
    async with engine:
        runner: Any = engine._core.runner
        runner.launch = stub_launch
        app = create_app(engine, max_event_rate=max_event_rate)
        config = uvicorn.Config(app, port=port, log_level="warning", access_log=False)
        await uvicorn.Server(config).serve()


async def in_process(args: argparse.Namespace) -> float:
    """CPU microseconds per token of `stream()` readers in this process."""
    engine = stub_engine(args.streams)
    async with engine:
        runner: Any = engine._core.runner
        runner.launch = stub_launch
        rng = random.Random(0)
        work = [([rng.randrange(1, 1000) for _ in range(rng.randint(100, 1024))],
                 rng.randint(*args.output_len)) for _ in range(args.streams)]  # fmt: skip

        async def read(prompt: list[int], max_tokens: int) -> None:
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.6)
            async with engine.stream(prompt, params) as stream:
                async for _ in stream.chunks():
                    pass

        before = _cpu_s()
        await asyncio.gather(*(read(p, m) for p, m in work))
        return (_cpu_s() - before) / sum(m for _, m in work) * 1e6


def over_http(args: argparse.Namespace) -> float:
    """Server CPU microseconds per token, the server in a child process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--streams", str(args.streams),
         "--max-event-rate", str(args.max_event_rate)]
    )  # fmt: skip
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", child)
        before = _child_cpu_s(child.pid)
        out = Path(tempfile.mkdtemp()) / "serve.json"
        subprocess.run(
            [sys.executable, "-m", "asyncllm", "bench", "serve", "--url",
             f"http://127.0.0.1:{port}", "--num-requests", str(args.streams), "--prompt-len",
             "100", "1024", "--output-len", *map(str, args.output_len), "--no-progress",
             "--out", str(out)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        tokens = json.loads(out.read_text())["http"]["output_tokens"]
        return (_child_cpu_s(child.pid) - before) / tokens * 1e6
    finally:
        child.terminate()
        child.wait()


def run(coro: Any) -> Any:
    """On uvloop when it is installed, as `asyncllm serve` runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_healthy(url: str, child: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while True:
        assert child.poll() is None, "the server exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=128, help="concurrent streams")
    parser.add_argument("--output-len", type=int, nargs=2, default=(100, 200),
                        metavar=("MIN", "MAX"), help="tokens per stream, uniform")  # fmt: skip
    parser.add_argument("--max-event-rate", type=float, default=5_000.0,
                        help="the server's max_event_rate (0: one event per token)")  # fmt: skip
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        run(serve(args.serve, args.streams, args.max_event_rate))
        return
    result = {"in_process_us_per_token": run(in_process(args)),
              "http_server_us_per_token": over_http(args)}  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
