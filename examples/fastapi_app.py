"""A FastAPI app: the engine lives in the app's lifespan; completions stream as server-sent
events; a client that disconnects aborts its request.

    pip install fastapi uvicorn
    uvicorn examples.fastapi_app:app --port 8000
    curl -N "localhost:8000/generate?prompt=Once%20upon%20a%20time&max_tokens=64"
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse

from asyncllm import AsyncEngine, SamplingParams, errors


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncEngine.from_pretrained() as engine:
        app.state.engine = engine
        yield  # leaving aborts whatever is still streaming


app = FastAPI(lifespan=lifespan)


@app.get("/generate")
async def generate(prompt: str, max_tokens: int = 64, temperature: float = 0.0) -> Any:
    engine: AsyncEngine = app.state.engine
    try:
        stream = engine.stream(prompt, SamplingParams(max_tokens=max_tokens,
                                                      temperature=temperature))  # fmt: skip
    except errors.InvalidRequestError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc

    async def events() -> AsyncIterator[str]:
        # If the client goes away, the server cancels this generator: `async with` aborts.
        async with stream:
            async for chunk in stream.chunks():  # a slow client gets fewer, larger events
                text = "".join(token.text for token in chunk)
                yield f"data: {json.dumps({'text': text})}\n\n"
            yield f"data: {json.dumps({'finish_reason': stream.output().finish_reason})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/stats")
async def stats() -> dict[str, Any]:
    engine: AsyncEngine = app.state.engine
    return engine.stats()._asdict()
