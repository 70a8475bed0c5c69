"""The `asyncllm` command: generate text, chat, serve the OpenAI API, or run the benchmarks."""

from __future__ import annotations

import argparse
import ast
import asyncio
import dataclasses
import inspect
import itertools
import logging
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from asyncllm.config import EngineConfig
from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.errors import AsyncLLMError
from asyncllm.sampling import SamplingParams

__all__ = ["add_engine_args", "build_parser", "engine_flags", "engine_overrides", "main"]

_ENGINE_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str}
_ENGINE_DESTS = {"seed": "engine_seed"}
"""EngineConfig fields whose option is renamed (`--seed` is the request's sampling seed)."""


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One `--option` per `EngineConfig` field (but `model`), with the field's docstring as
    help; options left out keep the config's defaults."""
    group = parser.add_argument_group("engine options (EngineConfig fields)")
    docs = _engine_field_docs()
    for field in dataclasses.fields(EngineConfig):
        if field.name == "model":
            continue
        dest = _ENGINE_DESTS.get(field.name, field.name)
        flag = "--" + dest.replace("_", "-")
        kind = str(field.type).replace(" | None", "")
        help_text = f"{docs.get(field.name, '')} (default: {field.default})".replace("%", "%%")
        if kind == "bool":
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(
                flag,
                dest=dest,
                type=_ENGINE_TYPES[kind],
                default=None,
                help=help_text,
                metavar=kind.upper(),
            )


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `EngineConfig` fields given on the command line."""
    overrides = {}
    for field in dataclasses.fields(EngineConfig):
        value = getattr(args, _ENGINE_DESTS.get(field.name, field.name), None)
        if field.name != "model" and value is not None:
            overrides[field.name] = value
    return overrides


def engine_flags(overrides: dict[str, Any]) -> list[str]:
    """The command-line options that give `overrides` (the inverse of `engine_overrides`)."""
    flags = []
    for name, value in overrides.items():
        option = _ENGINE_DESTS.get(name, name).replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{option}" if value else f"--no-{option}")
        else:
            flags += [f"--{option}", str(value)]
    return flags


def _engine_field_docs() -> dict[str, str]:
    """Field -> the docstring under it in `EngineConfig`'s source (one line)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(EngineConfig)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int | None) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        help=f"most tokens to generate per reply (default: {max_tokens})",
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 is greedy; higher samples more freely (default: 0)",
    )
    group.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample from the smallest set of tokens whose probability reaches "
        "this (default: 1, off)",
    )
    group.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample from the k most likely tokens (default: 0, off)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the sampling, for repeatable output (default: random)",
    )


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


# ---- generate --------------------------------------------------------------------------------


def _generate_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "generate",
        help="stream a completion of PROMPT to stdout",
        description="Stream a completion of PROMPT to stdout.",
    )
    p.add_argument("prompt", help="the text to continue")
    p.add_argument(
        "--model", default=None, help="model directory (default: the embedded tiny model)"
    )
    _add_sampling_args(p, max_tokens=128)
    add_engine_args(p)
    p.set_defaults(run=_rank0_only(lambda args: asyncio.run(_generate(args))))


def _serves_as_torchrun_worker(args: argparse.Namespace) -> bool:
    """Under torchrun, ranks > 0 serve rank 0's steps (and print nothing) until it is done."""
    from asyncllm.engine.workers import serve_torchrun_worker, torchrun_rank

    if (args.tensor_parallel_size or 1) == 1 or torchrun_rank() in (None, 0):
        return False
    serve_torchrun_worker()  # with rank 0's EngineConfig
    return True


def _rank0_only(run: Any) -> Any:
    """`run(args)` on rank 0; the other ranks of a torchrun launch serve its steps instead."""

    def wrapped(args: argparse.Namespace) -> int:
        return 0 if _serves_as_torchrun_worker(args) else int(run(args))

    return wrapped


async def _generate(args: argparse.Namespace) -> int:
    engine = AsyncEngine.from_pretrained(args.model, **engine_overrides(args))
    async with engine:
        sys.stdout.write(args.prompt)
        async for token in engine.stream(args.prompt, _sampling(args)):
            sys.stdout.write(token.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---- chat ------------------------------------------------------------------------------------


def _chat_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Chat with a model in the terminal. Replies stream as they are generated "
        "and the conversation is kept; Ctrl-C stops the reply being written, Ctrl-D (end of "
        "input) quits.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model directory with a chat template (default: the embedded model)",
    )
    p.add_argument("--system", default=None, help="a system message to start the chat with")
    _add_sampling_args(p, max_tokens=512)
    add_engine_args(p)
    p.set_defaults(run=_rank0_only(_chat))


def _chat(args: argparse.Namespace) -> int:
    from asyncllm.engine.sync import LLM

    with LLM(args.model, **engine_overrides(args)) as llm:
        tokenizer = llm.engine.tokenizer
        if not tokenizer.has_chat_template:
            print(
                f"error: {args.model or 'the embedded model'} has no chat template", file=sys.stderr
            )
            return 2
        history = [{"role": "system", "content": args.system}] if args.system else []
        params = _sampling(args)
        while (line := _read_line()) is not None:
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            try:
                reply = _stream_reply(llm, tokenizer.apply_chat_template(history), params)
            except AsyncLLMError as exc:  # e.g. the conversation outgrew the context
                print(f"error: {exc}", file=sys.stderr)
                history.pop()
                continue
            history.append({"role": "assistant", "content": reply})
    return 0


def _read_line() -> str | None:
    """The user's next line; None at end of input (Ctrl-D). Ctrl-C discards the line."""
    while True:
        try:
            return input("> ")
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print()


def _stream_reply(llm: Any, prompt: list[int], params: SamplingParams) -> str:
    """Print the reply as it streams; Ctrl-C stops it (the request is aborted) and keeps
    what was written so far."""
    pieces: list[str] = []
    tokens = llm.stream(prompt, params)
    try:
        for token in tokens:
            pieces.append(token.text)
            sys.stdout.write(token.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        tokens.close()
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)


# ---- serve -----------------------------------------------------------------------------------


def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible HTTP API",
        description="Serve the OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics, /tokenize, /detokenize) with "
        "uvicorn. SIGTERM or Ctrl-C stops accepting connections, lets the requests in "
        "flight finish (up to --shutdown-timeout), and exits 0. The engine runs four decode "
        "steps a launch unless --num-decode-steps says otherwise. Needs "
        "`pip install asyncllm[server]`.",
    )
    p.add_argument(
        "model", nargs="?", default=None, help="model directory (default: the embedded tiny model)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; the default accepts local clients only, "
        "0.0.0.0 accepts any (default: 127.0.0.1)",
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` (except on /health and /metrics);"
        " also read from $ASYNCLLM_API_KEY (default: no key)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: the model path, or tiny-qwen3 "
        "for the embedded model)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=16 * 2**20,
        help="larger request bodies get 413 (default: 16 MiB)",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="fewest tokens per streamed event, but for the first and the last: more costs "
        "the server less per token, at the price of burstier streams (default: 1)",
    )
    p.add_argument(
        "--max-event-rate",
        type=float,
        default=None,
        help="streamed events a second over all streams before each stream's events are "
        "spaced out to carry several tokens (the server's thread is the engine's; 0: one "
        "event per token always) (default: 5000)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds to let requests in flight finish after SIGTERM before "
        "aborting them (default: 30)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level (default: info)",
    )
    p.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log one line per request (default: on)",
    )
    add_engine_args(p)
    p.set_defaults(run=_rank0_only(_serve))


def _serve(args: argparse.Namespace) -> int:
    from asyncllm.server.serve import serve

    return serve(args, engine_overrides(args))


# ---- main ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The parser of the `asyncllm` command and all its subcommands."""
    parser = argparse.ArgumentParser(prog="asyncllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine events")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _chat_parser(sub)
    _serve_parser(sub)
    from asyncllm.bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `asyncllm` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.run(args))
    except AsyncLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
