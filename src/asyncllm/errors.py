"""The exception hierarchy: every error asyncllm raises on purpose derives from `AsyncLLMError`.

    AsyncLLMError
    ├── ConfigError                 an invalid EngineConfig or override, or memory it cannot get
    ├── InvalidRequestError         a bad prompt or SamplingParams (also a ValueError)
    │   ├── PromptTooLongError      a request that can never fit the model or the KV pool
    │   └── DuplicateRequestIdError a request id that is already in flight
    ├── ModelLoadError              missing, unreadable or malformed model files
    │   └── UnsupportedArchitectureError
    ├── NoForwardContextError       a layer ran outside `forward_context(...)`
    ├── BlockingCallError           a blocking API was called inside a running event loop
    ├── StreamInUseError            a second task read a RequestStream another task is reading
    └── EngineError                 a failure inside an engine step (carries `__cause__`)
        ├── EngineDeadError         the engine failed earlier and accepts no more work
        ├── EngineOverloadedError   the waiting queue is full: retry later
        ├── EngineNotRunningError   the engine was never started or has shut down
        └── WrongEventLoopError     the engine was used from a loop it was not started in

Example:
    >>> from asyncllm import errors
    >>> try:
    ...     raise errors.InvalidRequestError("temperature must be >= 0, got -1")
    ... except errors.AsyncLLMError as exc:
    ...     print(type(exc).__name__, exc)
    InvalidRequestError temperature must be >= 0, got -1
"""

from __future__ import annotations

__all__ = [
    "AsyncLLMError",
    "BlockingCallError",
    "ConfigError",
    "DuplicateRequestIdError",
    "EngineDeadError",
    "EngineError",
    "EngineNotRunningError",
    "EngineOverloadedError",
    "InvalidRequestError",
    "ModelLoadError",
    "NoForwardContextError",
    "PromptTooLongError",
    "StreamInUseError",
    "UnsupportedArchitectureError",
    "WrongEventLoopError",
]


class AsyncLLMError(Exception):
    """Base class of every error asyncllm raises on purpose."""


class ConfigError(AsyncLLMError, ValueError):
    """An `EngineConfig` field (or a `from_pretrained` override) is invalid or unknown, or
    asks for what this machine cannot give: a missing device, a KV pool or model table that
    cannot fit in memory (the message names the bytes and the setting to change)."""


class InvalidRequestError(AsyncLLMError, ValueError):
    """A request was rejected at submission: bad prompt, token ids or sampling values.

    The engine keeps serving other requests.
    """


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus `max_tokens`) can never fit `max_model_len` or the KV-cache pool."""


class DuplicateRequestIdError(InvalidRequestError):
    """A request was submitted with the id of a request still in flight (ids are free again
    once a request finishes or is aborted)."""


class ModelLoadError(AsyncLLMError):
    """A model directory is missing files, or a file or tensor in it is malformed."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture that no registered model class implements."""


class NoForwardContextError(AsyncLLMError, RuntimeError):
    """A layer asked for the forward context outside a `forward_context(...)` block."""


class BlockingCallError(AsyncLLMError, RuntimeError):
    """A blocking call (e.g. `LLM.generate`) was made from a thread running an event loop,
    where it would freeze the loop; use `AsyncEngine` there instead."""


class StreamInUseError(AsyncLLMError, RuntimeError):
    """A task tried to read a `RequestStream` while another task is waiting on it: a stream
    has one reader at a time (hand its tokens on to others yourself)."""


class EngineError(AsyncLLMError):
    """A step of the engine failed; the original exception is attached as `__cause__`."""


class EngineDeadError(EngineError):
    """The engine failed earlier and accepts no more requests; create a new engine."""


class EngineOverloadedError(EngineError):
    """The engine's waiting queue is full (`EngineConfig.max_waiting_requests`): the request
    was refused at submission, before taking any resources; the engine keeps serving.

    A child of `EngineError`, not of `InvalidRequestError`: nothing is wrong with the
    request, the same request can succeed a moment later, and a server should answer it
    as a temporary refusal (HTTP 503 with Retry-After), never as a client error (400).
    """


class EngineNotRunningError(EngineError):
    """The engine is not running: start it with `async with engine:` first."""


class WrongEventLoopError(EngineError):
    """The engine was used from an event loop other than the one it was started in."""
