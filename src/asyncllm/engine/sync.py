"""`LLM`: a blocking facade for scripts, running an `AsyncEngine` on a private loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.engine.core import Prompt
from asyncllm.errors import BlockingCallError
from asyncllm.outputs import EngineStats, RequestOutput, StreamToken
from asyncllm.sampling import SamplingParams

__all__ = ["LLM"]

T = TypeVar("T")


class LLM:
    """Blocking inference for scripts and threaded apps (no event loop needed).

    The engine lives on a private event-loop thread; every method may be called from any
    thread that is not running an event loop (inside one it raises `BlockingCallError`:
    use `AsyncEngine` there).

    Example:
        >>> with LLM() as llm:  # doctest: +SKIP
        ...     [out] = llm.generate(["Once upon a time"], SamplingParams(max_tokens=16))
        ...     print(out.text)
    """

    def __init__(self, model: str | None = None, **overrides: Any) -> None:
        _refuse_inside_loop("LLM()")
        self._engine = AsyncEngine.from_pretrained(model, **overrides)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="asyncllm-llm", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._engine.start())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def engine(self) -> AsyncEngine:
        """The `AsyncEngine` behind this facade (it runs on the facade's own loop)."""
        return self._engine

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Run `prompts` to completion; outputs in the same order."""
        _refuse_inside_loop("LLM.generate()")
        return self._call(self._engine.generate_many(prompts, params, progress=progress))

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamToken]:
        """Iterate one request's tokens, blocking for each; closing the iterator aborts it."""
        _refuse_inside_loop("LLM.stream()")
        return self._engine.stream_threadsafe(prompt, params)

    def stats(self) -> EngineStats:
        """The engine's current `EngineStats`."""
        return self._engine.stats()

    def close(self) -> None:
        """Shut the engine down and stop the loop thread (idempotent)."""
        if not self._loop.is_closed():
            self._call(self._engine.shutdown())
            self._stop_loop()

    def __enter__(self) -> LLM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def _refuse_inside_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise BlockingCallError(
        f"{what} blocks and would freeze the running event loop; use AsyncEngine instead"
    )
