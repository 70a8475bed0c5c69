"""Mounting asyncllm's OpenAI-compatible server inside an existing FastAPI app.

The app below has routes of its own (`/generate`, a plain server-sent-event stream, and
`/stats`) and serves the OpenAI API under `/openai`, all from one engine that lives in the
app's lifespan. A client that disconnects aborts its request on either side.

    pip install "asyncllm[server]"
    uvicorn examples.fastapi_app:app --port 8000
    curl -N "localhost:8000/generate?prompt=Once%20upon%20a%20time&max_tokens=64"
    curl localhost:8000/openai/v1/completions -H "Content-Type: application/json" \\
        -d '{"prompt": "Once upon a time", "max_tokens": 32}'

or with OpenAI's client: `OpenAI(base_url="http://localhost:8000/openai/v1", api_key="-")`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse

from asyncllm import AsyncEngine, SamplingParams, errors
from asyncllm.server import create_app

engine = AsyncEngine.from_pretrained()  # the embedded tiny model; the weights load on start
openai_api = create_app(engine, served_model_name="tiny")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # A mounted app's own lifespan does not run, so the engine starts here; the mounted
    # server sees it running and leaves its start and stop to us.
    async with engine:
        yield  # leaving aborts whatever is still streaming


app = FastAPI(lifespan=lifespan)
app.mount("/openai", openai_api)


@app.get("/generate")
async def generate(prompt: str, max_tokens: int = 64, temperature: float = 0.0) -> Any:
    try:
        stream = engine.stream(
            prompt, SamplingParams(max_tokens=max_tokens, temperature=temperature)
        )
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
    return engine.stats()._asdict()
