"""The `asyncllm` command: generate text, or run the benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.sampling import SamplingParams

__all__ = ["main"]


def _generate_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("generate", help="stream a completion of PROMPT to stdout")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="model directory (default: embedded tiny model)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--tensor-parallel-size", type=int, default=1,
        help="split the model across this many GPUs (under torchrun: one process per rank)",
    )  # fmt: skip


async def _generate(args: argparse.Namespace) -> None:
    engine = AsyncEngine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
    )  # fmt: skip
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    async with engine:
        sys.stdout.write(args.prompt)
        async for token in engine.stream(args.prompt, params):
            sys.stdout.write(token.text)
            sys.stdout.flush()
    sys.stdout.write("\n")


def _serves_as_torchrun_worker(args: argparse.Namespace) -> bool:
    """Under torchrun, ranks > 0 serve rank 0's steps (and print nothing) until it is done."""
    from asyncllm.engine.workers import serve_torchrun_worker, torchrun_rank

    if args.tensor_parallel_size == 1 or torchrun_rank() in (None, 0):
        return False
    serve_torchrun_worker()  # with rank 0's EngineConfig
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `asyncllm` command."""
    parser = argparse.ArgumentParser(prog="asyncllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine events")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    from asyncllm.bench import add_bench_parser

    add_bench_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.command == "generate":
        if _serves_as_torchrun_worker(args):
            return 0
        asyncio.run(_generate(args))
        return 0
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
