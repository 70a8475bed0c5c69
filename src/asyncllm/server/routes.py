"""The endpoints. Each one checks the model name, lets `convert` build the engine's inputs,
calls `AsyncEngine`, and lets `convert` shape the answer; nothing else happens here."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.engine.core import Prompt
from asyncllm.engine.stream import RequestStream
from asyncllm.errors import AsyncLLMError
from asyncllm.outputs import RequestOutput, StreamToken
from asyncllm.sampling import SamplingParams
from asyncllm.server import convert
from asyncllm.server.errors import APIError, from_engine_error
from asyncllm.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from asyncllm.server.streaming import Emit, EventStreamResponse, Pacer, run_unless_disconnected

__all__ = ["ServerContext", "build_router"]

CLIENT_GONE = 499
"""Status logged for a request whose client disconnected (nobody receives it)."""


@dataclass(frozen=True)
class ServerContext:
    """What every route needs: the engine and the name it is served under."""

    engine: AsyncEngine
    model_name: str
    created: int
    metrics: Callable[[], tuple[bytes, str]]
    """Renders the Prometheus exposition: (body, content type)."""
    stream_interval: int = 1
    """Fewest tokens per streamed event (the first and the last go out at once)."""
    pacer: Pacer = field(default_factory=lambda: Pacer(0))
    """Spaces the events of many concurrent streams (see `Pacer`)."""

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )


def build_router(ctx: ServerContext) -> APIRouter:
    """The OpenAI-compatible routes, plus health, metrics and tokenization."""
    router = APIRouter()
    engine, tokenizer = ctx.engine, ctx.engine.tokenizer

    @router.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        ctx.check_model(body.model)
        params = convert.completion_params(body)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = _submit(engine, convert.completion_prompts(body), params, request_id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = convert.CompletionEvents(
                request_id,
                created,
                ctx.model_name,
                tokenizer,
                include_usage,
                body.n,
                body.logprobs is not None,
            )

            async def produce(emit: Emit) -> None:
                await _stream_all(streams, events.events, emit, ctx, params.n)
                if include_usage:
                    await emit(events.usage_event([s.output() for s in streams]))

            return EventStreamResponse(produce, close=lambda: _abort(engine, streams))
        done, outputs = await run_unless_disconnected(request.receive, lambda: _finish(streams))
        if not done or outputs is None:
            return Response(status_code=CLIENT_GONE)
        return convert.completion_response(
            request_id, created, ctx.model_name, outputs, body.n, tokenizer
        )

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        ctx.check_model(body.model)
        params = convert.chat_params(body)
        prompt = tokenizer.apply_chat_template(
            convert.chat_messages(body.messages),
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            template_kwargs=body.chat_template_kwargs,
        )
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        streams = _submit(engine, [prompt], params, request_id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = convert.ChatEvents(
                request_id,
                created,
                ctx.model_name,
                tokenizer,
                include_usage,
                body.n,
                body.logprobs,
            )

            async def produce(emit: Emit) -> None:
                await emit(events.first_events())
                await _stream_all(
                    streams, lambda _, tokens: events.events(tokens), emit, ctx, params.n
                )
                if include_usage:
                    await emit(events.usage_event([streams[0].output()]))

            return EventStreamResponse(produce, close=lambda: _abort(engine, streams))
        done, outputs = await run_unless_disconnected(request.receive, lambda: _finish(streams))
        if not done or outputs is None:
            return Response(status_code=CLIENT_GONE)
        return convert.chat_response(request_id, created, ctx.model_name, outputs[0], tokenizer)

    @router.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[_model_card(ctx)])

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def model(model_id: str) -> ModelCard:
        ctx.check_model(model_id)
        return _model_card(ctx)

    @router.get("/health")
    async def health() -> Response:
        if engine.state != "running":
            raise APIError(503, f"the engine is {engine.state}", headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok"})

    @router.get("/metrics")
    async def metrics() -> Response:
        body, content_type = ctx.metrics()
        return Response(body, media_type=content_type)

    @router.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages")
        if body.messages is not None:
            tokens = tokenizer.apply_chat_template(
                convert.chat_messages(body.messages),
                add_generation_prompt=body.add_generation_prompt,
                template_kwargs=body.chat_template_kwargs,
            )
        else:
            tokens = tokenizer.encode(body.prompt or "")
        return TokenizeResponse(
            count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens
        )

    @router.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        ctx.check_model(body.model)
        vocab = tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))

    return router


def _model_card(ctx: ServerContext) -> ModelCard:
    return ModelCard(id=ctx.model_name, created=ctx.created, max_model_len=ctx.engine.max_model_len)


def _submit(
    engine: AsyncEngine, prompts: Sequence[Prompt], params: SamplingParams, request_id: str
) -> list[RequestStream]:
    """Submit every prompt, or none: a refused prompt aborts those already submitted."""
    streams: list[RequestStream] = []
    try:
        for index, prompt in enumerate(prompts):
            engine_id = request_id if len(prompts) == 1 else f"{request_id}-{index}"
            streams.append(engine.stream(prompt, params, request_id=engine_id))
    except AsyncLLMError as exc:
        _abort(engine, streams)
        error = from_engine_error(exc)
        if len(prompts) > 1:
            error.message = f"prompt {len(streams)}: {error.message}"
        raise error from exc
    except BaseException:
        _abort(engine, streams)
        raise
    return streams


def _abort(engine: AsyncEngine, streams: Sequence[RequestStream]) -> None:
    """Abort the streams' requests (those already finished are left alone)."""
    for stream in streams:
        engine.abort(stream.request_id)


async def _finish(streams: Sequence[RequestStream]) -> list[RequestOutput]:
    """Every stream's final output (the streams are aborted if this is cancelled)."""

    async def drain(stream: RequestStream) -> RequestOutput:
        async with stream:
            async for _ in stream.chunks():
                pass
            return stream.output()

    if len(streams) == 1:
        return [await drain(streams[0])]
    return await _gather([functools.partial(drain, stream) for stream in streams])


async def _stream_all(
    streams: Sequence[RequestStream],
    render: Callable[[int, list[StreamToken]], str],
    emit: Emit,
    ctx: ServerContext,
    choices: int,
) -> None:
    """Emit `render(prompt_index, tokens)` for the tokens of every stream: at least
    `ctx.stream_interval` tokens an event but for the first and the last, spaced by
    `ctx.pacer`. The streams are aborted if this ends early (cancelled, or the client left).
    """
    interval, pacer = ctx.stream_interval, ctx.pacer

    async def pump(index: int, put: Emit) -> None:
        pending: list[StreamToken] = []
        first = True
        pacer.active += choices
        try:
            async with streams[index] as stream:
                async for tokens in stream.chunks():  # after a pause: every token since
                    pending += tokens
                    if first or len(pending) >= interval:
                        await put(render(index, pending))
                        pending, first = [], False
                        await pacer.pause()
                if pending:
                    await put(render(index, pending))
        finally:
            pacer.active -= choices

    if len(streams) == 1:
        await pump(0, emit)
        return
    # Several prompts: each stream is read by its own task; one writer talks to the client.
    sender, receiver = anyio.create_memory_object_stream[str](max_buffer_size=len(streams))

    async def pump_all() -> None:
        async with sender:
            pumps = [functools.partial(pump, i, sender.send) for i in range(len(streams))]
            await _gather(pumps)

    async def write_all() -> None:
        async with receiver:
            async for text in receiver:
                await emit(text)

    await _gather([write_all, pump_all])


async def _gather(works: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run `works` concurrently and return their results. The first failure cancels the rest
    (each holds its stream in `async with`, so that aborts them) and is raised as is, not
    wrapped in an exception group."""
    results: list[Any] = [None] * len(works)
    errors: list[Exception] = []

    async def run(index: int, scope: anyio.CancelScope) -> None:
        try:
            results[index] = await works[index]()
        except Exception as exc:
            errors.append(exc)
            scope.cancel()

    async with anyio.create_task_group() as group:
        for index in range(len(works)):
            group.start_soon(run, index, group.cancel_scope)
    if errors:
        raise errors[0]
    return results
