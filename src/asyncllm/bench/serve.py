"""`asyncllm bench serve`: latency and throughput of the HTTP server, as clients see them.

Random prompts (token ids) and output lengths, reproducible from a seed, are sent to
`/v1/completions` as streams (`ignore_eos`, so each request generates exactly its length),
either all at once or as a Poisson process at `--request-rate`. With `--url` the requests go
to a running server; without, the command starts `asyncllm serve` itself, in a child process
so that this client does not share the server's CPU. `--compare-in-process` then runs the
same workload on an `AsyncEngine` in this process (one `stream()` consumer per request), so
the HTTP layer's cost is visible.

Metrics follow vLLM's serving benchmark: TTFT (submission to first content), TPOT ((end-to-
end - TTFT) / (output tokens - 1), per request), ITL (gaps between consecutive content
chunks, over all requests), E2EL (submission to the last byte); mean, median and p99 of
each, in milliseconds; throughput in requests and output tokens per second of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

__all__ = ["RequestResult", "add_parser", "summarize"]

WARMUP_REQUESTS = 8


@dataclass
class RequestResult:
    """One request as the client saw it (times in seconds, monotonic clock)."""

    prompt_tokens: int
    output_tokens: int = 0
    start: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    """When each chunk with content arrived."""
    end: float = 0.0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    warmup_prompts: list[list[int]]
    """Other random prompts, so warming up leaves nothing in the prefix cache to reuse."""


def make_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    rng = random.Random(args.seed)

    def prompt() -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(rng.randint(*args.prompt_len))]

    prompts = [prompt() for _ in range(args.num_requests)]
    output_lens = [rng.randint(*args.output_len) for _ in range(args.num_requests)]
    warmup = [prompt() for _ in range(min(WARMUP_REQUESTS, args.num_requests))]
    return Workload(prompts, output_lens, warmup)


# ---- sending -----------------------------------------------------------------------------------


async def _arrivals(count: int, rate: float, seed: int) -> Any:
    """Yield 0..count-1 spaced as a Poisson process of `rate` per second (inf: at once)."""
    rng = random.Random(seed + 1)
    for index in range(count):
        yield index
        if math.isfinite(rate) and index < count - 1:
            await asyncio.sleep(rng.expovariate(rate))


async def run_load(
    send: Callable[[list[int], int, RequestResult], Awaitable[None]],
    workload: Workload,
    args: argparse.Namespace,
) -> tuple[list[RequestResult], float]:
    """Send every request of `workload` through `send`; the results and the run's seconds."""
    limit = asyncio.Semaphore(args.max_concurrency or len(workload.prompts))
    bar = _progress(len(workload.prompts), args.progress)
    results = [RequestResult(len(p)) for p in workload.prompts]

    async def one(index: int) -> None:
        async with limit:
            result = results[index]
            result.start = time.monotonic()
            try:
                await send(workload.prompts[index], workload.output_lens[index], result)
            except Exception as exc:  # counted as failed, reported, never fatal
                result.error = f"{type(exc).__name__}: {exc}"
            result.end = time.monotonic()
        if bar is not None:
            bar.update(1)

    start = time.monotonic()
    tasks = []
    async for index in _arrivals(len(workload.prompts), args.request_rate, args.seed):
        tasks.append(asyncio.ensure_future(one(index)))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    if bar is not None:
        bar.close()
    return results, elapsed


def http_sender(client: Any, model: str, temperature: float) -> Any:
    """Streams one completion over HTTP, timing each chunk with content."""

    async def send(prompt: list[int], max_tokens: int, result: RequestResult) -> None:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "temperature": temperature,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        buffer, last = b"", b""
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())!r}")
            async for data in response.aiter_raw():
                now = time.monotonic()
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if event == b"data: [DONE]":
                        continue
                    if b'"choices":[]' not in event:  # the usage chunk has no content
                        result.chunk_times.append(now)
                    last = event
        usage = json.loads(last[len(b"data: ") :])["usage"]
        result.output_tokens = usage["completion_tokens"]

    return send


def engine_sender(engine: Any, temperature: float) -> Any:
    """Streams one request from an in-process `AsyncEngine`, timing each chunk."""
    from asyncllm.sampling import SamplingParams

    async def send(prompt: list[int], max_tokens: int, result: RequestResult) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True)
        async with engine.stream(prompt, params) as stream:
            async for tokens in stream.chunks():
                result.chunk_times.append(time.monotonic())
                result.output_tokens += len(tokens)

    return send


# ---- summarizing -------------------------------------------------------------------------------


def summarize(results: Sequence[RequestResult], elapsed_s: float) -> dict[str, Any]:
    """vLLM's serving-benchmark metrics of a run."""
    done = [r for r in results if r.error is None and r.chunk_times]
    output_tokens = sum(r.output_tokens for r in done)
    ttfts = [r.ttft for r in done]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itls = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    summary: dict[str, Any] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": elapsed_s,
        "input_tokens": sum(r.prompt_tokens for r in done),
        "output_tokens": output_tokens,
        "request_throughput": len(done) / elapsed_s,
        "output_throughput": output_tokens / elapsed_s,
        "tokens_per_chunk": output_tokens / max(1, sum(len(r.chunk_times) for r in done)),
    }
    for name, values in (
        ("ttft", ttfts),
        ("tpot", tpots),
        ("itl", itls),
        ("e2el", [r.latency for r in done]),
    ):
        summary[f"{name}_ms"] = _stats_ms(values)
    errors = sorted({r.error for r in results if r.error})
    if errors:
        summary["errors"] = errors[:5]
    return summary


def _stats_ms(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "median": math.nan, "p99": math.nan}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {
        "mean": 1e3 * statistics.fmean(ordered),
        "median": 1e3 * statistics.median(ordered),
        "p99": 1e3 * p99,
    }


def table(runs: dict[str, dict[str, Any]]) -> str:
    """The runs side by side, as a plain-text table."""
    names = list(runs)
    rows = [("", *names)]
    rows.append(
        ("completed / failed", *(f"{r['completed']} / {r['failed']}" for r in runs.values()))
    )
    rows.append(("duration (s)", *(f"{r['duration_s']:.2f}" for r in runs.values())))
    rows.append(("requests/s", *(f"{r['request_throughput']:.2f}" for r in runs.values())))
    rows.append(("output tok/s", *(f"{r['output_throughput']:,.0f}" for r in runs.values())))
    rows.append(("tokens per chunk", *(f"{r['tokens_per_chunk']:.2f}" for r in runs.values())))
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            label = f"{metric.upper()} {stat} (ms)"
            rows.append((label, *(f"{r[f'{metric}_ms'][stat]:.2f}" for r in runs.values())))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    )


# ---- the two runs ------------------------------------------------------------------------------


async def bench_http(url: str, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(None, connect=60)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=timeout, headers=_auth(args)
    ) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        send = http_sender(client, model, args.temperature)
        warm = Workload(workload.warmup_prompts, [8] * len(workload.warmup_prompts), [])
        await run_load(send, warm, _quiet(args))
        results, elapsed = await run_load(send, workload, args)
    return summarize(results, elapsed)


async def bench_in_process(workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    from asyncllm.cli import engine_overrides
    from asyncllm.engine.async_engine import AsyncEngine
    from asyncllm.server.serve import serving_overrides

    # The engine a started server would run: the same options, the same defaults.
    engine = AsyncEngine.from_pretrained(args.model, **serving_overrides(engine_overrides(args)))
    async with engine:
        send = engine_sender(engine, args.temperature)
        warm = Workload(workload.warmup_prompts, [8] * len(workload.warmup_prompts), [])
        await run_load(send, warm, _quiet(args))
        engine.reset_prefix_cache()
        results, elapsed = await run_load(send, workload, args)
    return summarize(results, elapsed)


@contextlib.contextmanager
def child_server(args: argparse.Namespace) -> Iterator[str]:
    """`asyncllm serve` in a child process on a free port; yields its URL, then SIGTERMs it."""
    import socket

    import httpx

    from asyncllm.cli import engine_flags, engine_overrides

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "asyncllm",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        "--stream-interval",
        str(args.stream_interval),
    ]
    if args.max_event_rate is not None:
        command += ["--max-event-rate", str(args.max_event_rate)]
    command += [*([args.model] if args.model else []), *engine_flags(engine_overrides(args))]
    server = subprocess.Popen(command, env={**os.environ, "ASYNCLLM_API_KEY": args.api_key or ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become healthy in 600 s")
            time.sleep(0.5)
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _auth(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def _quiet(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "progress": False, "request_rate": math.inf})


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="requests", unit="req")


def _vocab_size(model: str | None) -> int:
    from asyncllm.engine.core import DEFAULT_MODEL_DIR

    config = Path(model) if model else DEFAULT_MODEL_DIR
    return int(json.loads((config / "config.json").read_text())["vocab_size"])


# ---- command line ------------------------------------------------------------------------------


def add_parser(kinds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`asyncllm bench serve`."""
    from asyncllm.cli import add_engine_args

    p = kinds.add_parser(
        "serve",
        help="latency and throughput of the HTTP server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--url",
        default=None,
        help="a running server (default: start `asyncllm serve` in a child process)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model directory the server serves, read for its vocabulary and used "
        "to start servers and engines (default: the embedded model)",
    )
    p.add_argument("--api-key", default=None, help="the server's API key, if it needs one")
    p.add_argument("--num-requests", type=int, default=256, help="requests (default: 256)")
    p.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="mean requests per second, arriving as a Poisson process (default: inf, all at once)",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="most requests in flight at once (default: no limit)",
    )
    p.add_argument(
        "--prompt-len",
        type=int,
        nargs=2,
        default=(100, 1024),
        metavar=("MIN", "MAX"),
        help="prompt lengths in tokens, uniform in [MIN, MAX] (default: 100 1024)",
    )
    p.add_argument(
        "--output-len",
        type=int,
        nargs=2,
        default=(100, 1024),
        metavar=("MIN", "MAX"),
        help="output lengths in tokens, uniform in [MIN, MAX] (default: 100 1024)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.6, help="sampling temperature (default: 0.6)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the workload (default: 0)")
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="the started server's --stream-interval: fewest tokens per event (default: 1)",
    )
    p.add_argument(
        "--max-event-rate",
        type=float,
        default=None,
        help="the started server's --max-event-rate (default: the server's, 5000)",
    )
    p.add_argument(
        "--compare-in-process",
        action="store_true",
        help="also run the workload on an AsyncEngine in this process (after the "
        "server has stopped)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar (default: on)",
    )
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    add_engine_args(p)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    workload = make_workload(args, _vocab_size(args.model))
    result: dict[str, Any] = {
        "server": {
            "url": args.url,
            "stream_interval": None if args.url else args.stream_interval,
            "max_event_rate": None if args.url else args.max_event_rate,
        },
        "workload": {
            "requests": len(workload.prompts),
            "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
            "max_concurrency": args.max_concurrency,
            "prompt_tokens": sum(map(len, workload.prompts)),
            "output_tokens": sum(workload.output_lens),
            "prompt_len": list(args.prompt_len),
            "output_len": list(args.output_len),
            "temperature": args.temperature,
            "seed": args.seed,
        },
    }
    runs: dict[str, dict[str, Any]] = {}
    if args.url:
        runs["http"] = _run_loop(bench_http(args.url, workload, args))
    else:
        with child_server(args) as url:
            runs["http"] = _run_loop(bench_http(url, workload, args))
    if args.compare_in_process:
        runs["in_process"] = _run_loop(bench_in_process(workload, args))
        ratio = runs["http"]["output_throughput"] / runs["in_process"]["output_throughput"]
        result["http_vs_in_process_output_throughput"] = ratio
    result |= runs
    print(table(runs))
    if "http_vs_in_process_output_throughput" in result:
        print(
            f"HTTP / in-process output throughput: "
            f"{result['http_vs_in_process_output_throughput']:.1%}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if all(r["failed"] == 0 for r in runs.values()) else 1


def _run_loop(coro: Any) -> dict[str, Any]:
    """Run on uvloop when it is installed, as the server does."""
    try:
        import uvloop
    except ImportError:
        return cast(dict[str, Any], asyncio.run(coro))
    return cast(dict[str, Any], uvloop.run(coro))
