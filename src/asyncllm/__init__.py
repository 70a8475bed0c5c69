"""asyncllm: an asyncio-native LLM inference engine that lives inside your event loop.

Example:
    >>> import asyncio
    >>> from asyncllm import AsyncEngine, SamplingParams
    >>> async def main() -> None:
    ...     async with AsyncEngine.from_pretrained() as engine:
    ...         async for token in engine.stream("Once upon a time", SamplingParams(max_tokens=16)):
    ...             print(token.text, end="")
    >>> asyncio.run(main())  # doctest: +SKIP
"""

from asyncllm import errors
from asyncllm.config import EngineConfig
from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.engine.stream import RequestStream
from asyncllm.engine.sync import LLM
from asyncllm.errors import AsyncLLMError
from asyncllm.outputs import (
    CompletionChoice,
    EngineStats,
    RequestMetrics,
    RequestOutput,
    StreamToken,
    TokenLogprobs,
    Usage,
)
from asyncllm.sampling import SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "AsyncLLMError",
    "CompletionChoice",
    "EngineConfig",
    "EngineStats",
    "RequestMetrics",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "StreamToken",
    "TokenLogprobs",
    "Usage",
    "errors",
]

__version__ = "0.1.0"
