"""The OpenAI wire format: request and response bodies as pydantic models.

Requests are validated by FastAPI against these models (a failure is a 400 in OpenAI's error
shape). Fields OpenAI defines but asyncllm cannot honour are accepted only at their neutral
value (`echo=False`, no `logit_bias`, no tools...), so a client relying on them gets a clear
400 instead of a silently different answer; unknown fields are refused the same way.
Responses are built as these models too, except stream chunks, which `convert` renders
directly (the models below still define their shape, and the tests hold the two together).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "ChatStreamChunk",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamChunk",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "ErrorBody",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "TokenizeRequest",
    "TokenizeResponse",
    "UsageInfo",
]

Number = float  # pydantic accepts ints for float fields


class _Strict(BaseModel):
    """Refuses fields it does not know, naming them (OpenAI does the same), and values of
    the wrong JSON type: `"temperature": true` or `"n": "2"` is a mistake, not 1 or 2."""

    model_config = ConfigDict(extra="forbid", strict=True)


# ---- requests --------------------------------------------------------------------------------


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send one more chunk before `[DONE]` with the usage of the whole request."""


class _SamplingFields(_Strict):
    """Fields shared by both generation endpoints (OpenAI's, then vLLM's extensions)."""

    model: str | None = None
    """A served model name; None takes the (only) served model."""
    temperature: Number | None = None
    top_p: Number | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    """Accepted and ignored."""
    logit_bias: dict[str, float] | None = None
    """Only empty: biasing logits is not supported."""
    # vLLM's extensions, in the body:
    top_k: int | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """Text, token ids, or a batch of either (each prompt gets `n` choices)."""
    max_tokens: int | None = 16
    """OpenAI's default for completions is 16; None runs to a stop or the context limit."""
    logprobs: int | None = None
    """Log-probabilities of the sampled token and of this many alternatives (0-20)."""
    echo: bool = False
    """Only False: echoing the prompt is not supported."""
    suffix: str | None = None
    """Only None: insertion is not supported."""
    best_of: int | None = None
    """Only None or equal to n: server-side ranking is not supported."""


class ChatMessage(BaseModel):
    """One message of a chat; extra fields reach the chat template unchanged."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    """Text, or a list of content parts of which only `{"type": "text"}` is supported."""
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    """Deprecated by OpenAI in favour of `max_completion_tokens`; either works."""
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    """How many alternatives to return per token (0-20); needs `logprobs: true`."""
    response_format: dict[str, Any] | None = None
    """Only `{"type": "text"}`: structured output is not supported."""
    tools: list[dict[str, Any]] | None = None
    """Only empty: tool calling is not supported."""
    tool_choice: str | dict[str, Any] | None = None
    """Only "none" (or absent)."""
    parallel_tool_calls: bool | None = None
    # vLLM's extensions:
    add_generation_prompt: bool = True
    """End the rendered chat with the assistant's turn header."""
    continue_final_message: bool = False
    """Render the last (assistant) message open, so the reply continues it."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables for the chat template (e.g. `{"enable_thinking": false}`)."""


class TokenizeRequest(_Strict):
    """`POST /tokenize`: either a `prompt` or chat `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Strict):
    """`POST /detokenize`."""

    model: str | None = None
    tokens: list[int]


# ---- responses -------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int
    """Prompt tokens whose KV came from the prefix cache."""


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoiceBody(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoiceBody]
    usage: UsageInfo


class CompletionStreamChunk(BaseModel):
    """One server-sent event of a streamed completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoiceBody]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoiceBody(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoiceBody]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatStreamChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "asyncllm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorBody
