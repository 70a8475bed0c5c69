"""OpenAI requests to engine calls, engine outputs to OpenAI responses: the one place that
knows both sides.

Requests become prompts and a `SamplingParams`; finished `RequestOutput`s become response
models; streamed `StreamToken`s become server-sent events. Stream chunks are rendered as JSON
text directly rather than through the pydantic models: there is one event per token per
stream, and at hundreds of streams the models' cost would slow the engine loop that shares
this thread (the tests check that the text parses into those models).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from json.encoder import encode_basestring as _json_str  # C-accelerated: a JSON string literal
from typing import Any, cast

from asyncllm.engine.core import Prompt
from asyncllm.errors import InvalidRequestError
from asyncllm.outputs import CompletionChoice, RequestOutput, StreamToken, TokenLogprobs
from asyncllm.sampling import MAX_LOGPROBS, SamplingParams
from asyncllm.server.errors import APIError
from asyncllm.server.protocol import (
    AssistantMessage,
    ChatChoiceBody,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    CompletionChoiceBody,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from asyncllm.tokenizer import Tokenizer

__all__ = [
    "ChatEvents",
    "CompletionEvents",
    "chat_messages",
    "chat_params",
    "chat_response",
    "completion_params",
    "completion_prompts",
    "completion_response",
    "usage",
]

MIN_LOGPROB = -9999.0
"""What a log-probability of -inf is reported as (JSON has no infinity; OpenAI does this)."""


# ---- requests --------------------------------------------------------------------------------


def completion_prompts(request: CompletionRequest) -> list[Prompt]:
    """The prompts of a completions request: one text or id list, or a batch of either."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]  # checked: a list of ids
    return list(prompt)  # type: ignore[arg-type]  # a batch of texts or of id lists


def completion_params(request: CompletionRequest) -> SamplingParams:
    """The `SamplingParams` of a completions request (raises `APIError` 400)."""
    _refuse_unsupported(request, echo=False, suffix=None)
    if request.best_of is not None and request.best_of != request.n:
        raise APIError(400, "best_of must equal n (ranking is not supported)", param="best_of")
    return _sampling_params(request, request.max_tokens, request.logprobs)


def chat_params(request: ChatCompletionRequest) -> SamplingParams:
    """The `SamplingParams` of a chat request (raises `APIError` 400)."""
    _refuse_unsupported(request, tools=None, parallel_tool_calls=None)
    if request.response_format not in (None, {"type": "text"}):
        raise APIError(
            400, "only response_format {'type': 'text'} is supported", param="response_format"
        )
    if request.tool_choice not in (None, "none"):
        raise APIError(400, "tool calling is not supported", param="tool_choice")
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if request.top_logprobs is not None and not 0 <= request.top_logprobs <= MAX_LOGPROBS:
        raise APIError(
            400,
            f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {request.top_logprobs}",
            param="top_logprobs",
        )
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    max_tokens = request.max_completion_tokens
    if max_tokens is None:
        max_tokens = request.max_tokens
    return _sampling_params(request, max_tokens, logprobs)


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template reads them: content parts flattened to text."""
    return [_template_message(message, index) for index, message in enumerate(messages)]


def _template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    rendered = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(
                    400,
                    f"messages[{index}]: only text content parts are supported, got "
                    f"{part.get('type')!r}",
                    param="messages",
                )
            texts.append(part["text"])
        rendered["content"] = "\n".join(texts)
    elif content is None:
        rendered["content"] = ""
    return rendered


def _refuse_unsupported(request: Any, **neutral: Any) -> None:
    """400 for a field set to something other than its neutral value."""
    for name, value in neutral.items():
        given = getattr(request, name)
        if given != value and not (value is None and given in ([], {})):
            raise APIError(400, f"{name} is not supported (got {given!r})", param=name)
    if request.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")


def _sampling_params(request: Any, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """Fields the client set, under the engine's names; the engine validates the values."""
    fields: dict[str, Any] = {
        "n": request.n,
        "max_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "seed": request.seed,
        "stop": request.stop,
        "stop_token_ids": request.stop_token_ids,
        "ignore_eos": request.ignore_eos,
        "min_tokens": request.min_tokens,
        "logprobs": logprobs,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "repetition_penalty": request.repetition_penalty,
    }
    fields = {name: value for name, value in fields.items() if value is not None}
    try:
        return SamplingParams(**fields)
    except InvalidRequestError as exc:  # its message starts with the field's name
        name = str(exc).split(" ", 1)[0].split("[", 1)[0]
        raise APIError(400, str(exc), param=name if name in fields else None) from exc


# ---- finished outputs ------------------------------------------------------------------------


def choices_of(output: RequestOutput) -> Sequence[CompletionChoice]:
    """The choices of `output` (one unless the request asked for `n`; an output built by
    hand without `choices` is its own choice 0)."""
    if output.choices:
        return output.choices
    only = CompletionChoice(0, output.token_ids, output.text, output.finish_reason,
                            output.logprobs)  # fmt: skip
    return (only,)


def usage(outputs: Sequence[RequestOutput]) -> UsageInfo:
    """Token counts summed over the prompts of a request (each prompt counted once)."""
    prompt = sum(out.usage.prompt_tokens for out in outputs)
    completion = sum(out.usage.completion_tokens for out in outputs)
    cached = sum(out.usage.cached_tokens for out in outputs)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def completion_response(
    request_id: str,
    created: int,
    model: str,
    outputs: Sequence[RequestOutput],
    n: int,
    tokenizer: Tokenizer,
) -> CompletionResponse:
    """The body of a non-streamed completion: choice `i * n + j` is prompt i's choice j."""
    choices = []
    for prompt_index, output in enumerate(outputs):
        for choice in choices_of(output):
            logprobs = None
            if choice.logprobs is not None:
                logprobs = _completion_logprobs(choice.token_ids, choice.logprobs, tokenizer)
            choices.append(
                CompletionChoiceBody(
                    index=prompt_index * n + choice.index,
                    text=choice.text,
                    logprobs=logprobs,
                    finish_reason=_finish_reason(choice.finish_reason),
                )
            )
    return CompletionResponse(
        id=request_id, created=created, model=model, choices=choices, usage=usage(outputs)
    )


def chat_response(
    request_id: str, created: int, model: str, output: RequestOutput, tokenizer: Tokenizer
) -> ChatCompletionResponse:
    """The body of a non-streamed chat completion."""
    choices = []
    for choice in choices_of(output):
        logprobs = None
        if choice.logprobs is not None:
            logprobs = ChatLogprobs(
                content=[
                    _chat_token_logprob(token, lp, tokenizer)
                    for token, lp in zip(choice.token_ids, choice.logprobs)
                ]
            )
        choices.append(
            ChatChoiceBody(
                index=choice.index,
                message=AssistantMessage(content=choice.text),
                logprobs=logprobs,
                finish_reason=_finish_reason(choice.finish_reason),
            )
        )
    return ChatCompletionResponse(
        id=request_id, created=created, model=model, choices=choices, usage=usage([output])
    )


def _finish_reason(reason: str | None) -> Any:
    if reason == "abort":  # only a shutdown aborts a request a client still waits for
        raise APIError(503, "the request was aborted: the server is shutting down")
    return reason


def _completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprobs],
    tokenizer: Tokenizer,
    offset: int = 0,
) -> CompletionLogprobs:
    tokens = [_token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[_finite(lp.logprob) for lp in logprobs],
        top_logprobs=[
            {_token_text(tokenizer, t): _finite(v) for t, v in lp.top} for lp in logprobs
        ],
        text_offset=offsets,
    )


def _chat_token_logprob(token_id: int, lp: TokenLogprobs, tokenizer: Tokenizer) -> TokenLogprob:
    raw = tokenizer.token_bytes(token_id)
    return TokenLogprob(
        token=raw.decode("utf-8", "replace"),
        logprob=_finite(lp.logprob),
        bytes=list(raw),
        top_logprobs=[_top_logprob(t, v, tokenizer) for t, v in lp.top],
    )


def _top_logprob(token_id: int, logprob: float, tokenizer: Tokenizer) -> TopLogprob:
    raw = tokenizer.token_bytes(token_id)
    return TopLogprob(
        token=raw.decode("utf-8", "replace"), logprob=_finite(logprob), bytes=list(raw)
    )


def _logprobs_of(tokens: Sequence[StreamToken]) -> list[TokenLogprobs]:
    """The tokens' logprobs, which the engine attaches to every token of a request that
    asked for them."""
    found = [t.logprobs for t in tokens]
    assert all(lp is not None for lp in found), "a token without logprobs"
    return cast(list[TokenLogprobs], found)


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", "replace")


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


# ---- streamed events -------------------------------------------------------------------------


class _Events:
    """Shared by both endpoints: every chunk's fixed JSON around its one choice, rendered
    once per request, so an event costs a few string concatenations."""

    object_name = ""

    def __init__(
        self,
        request_id: str,
        created: int,
        model: str,
        tokenizer: Tokenizer,
        include_usage: bool,
        logprobs: bool,
    ) -> None:
        self._tokenizer = tokenizer
        self._logprobs = logprobs
        self._head = (
            f'data: {{"id":{_json_str(request_id)},"object":"{self.object_name}",'
            f'"created":{created},"model":{_json_str(model)},"system_fingerprint":null,'
            f'"choices":['
        )
        # OpenAI: with include_usage, every chunk has "usage": null but the last.
        self._tail = '],"usage":null}\n\n' if include_usage else "]}\n\n"
        self._open: dict[int, str] = {}

    def _choice_head(self, index: int, key: str) -> str:
        """`{"index":i,"<key>":` for choice i (cached)."""
        head = self._open.get(index)
        if head is None:
            head = self._open[index] = f'{self._head}{{"index":{index},{key}'
        return head

    def usage_event(self, outputs: Sequence[RequestOutput]) -> str:
        """The last chunk when `stream_options.include_usage`: no choices, the usage."""
        return f'{self._head}],"usage":{usage(outputs).model_dump_json()}}}\n\n'


def _by_choice(
    tokens: Sequence[StreamToken], n: int
) -> Iterator[tuple[int, Sequence[StreamToken]]]:
    if n == 1:
        yield 0, tokens
        return
    groups: dict[int, list[StreamToken]] = {}
    for token in tokens:
        groups.setdefault(token.choice, []).append(token)
    yield from groups.items()


def _stream_finish(tokens: Sequence[StreamToken]) -> str:
    reason = tokens[-1].finish_reason
    if reason is None:
        return "null"
    _finish_reason(reason)  # raises for "abort"
    return f'"{reason}"'


class CompletionEvents(_Events):
    """Renders one completions request: `events(prompt_index, tokens)` gives the SSE text
    for a batch of one prompt's tokens (one chunk per choice that has news, as OpenAI)."""

    object_name = "text_completion"

    def __init__(
        self,
        request_id: str,
        created: int,
        model: str,
        tokenizer: Tokenizer,
        include_usage: bool,
        n: int,
        logprobs: bool,
    ) -> None:
        super().__init__(request_id, created, model, tokenizer, include_usage, logprobs)
        self._n = n
        self._offsets: dict[int, int] = {}

    def events(self, prompt_index: int, tokens: Sequence[StreamToken]) -> str:
        out = []
        for choice, group in _by_choice(tokens, self._n):
            text = group[0].text if len(group) == 1 else "".join(t.text for t in group)
            finish = _stream_finish(group)
            if not text and finish == "null" and not self._logprobs:
                continue  # nothing to say yet (a partial character, held-back text)
            index = prompt_index * self._n + choice
            logprobs = self._logprobs_json(index, group) if self._logprobs else "null"
            head = self._choice_head(index, '"text":')
            out.append(
                f'{head}{_json_str(text)},"logprobs":{logprobs},"finish_reason":{finish}}}'
                + self._tail
            )
        return "".join(out)

    def _logprobs_json(self, index: int, group: Sequence[StreamToken]) -> str:
        offset = self._offsets.get(index, 0)
        ids = [t.token_id for t in group]
        body = _completion_logprobs(ids, _logprobs_of(group), self._tokenizer, offset)
        self._offsets[index] = offset + sum(map(len, body.tokens))
        return body.model_dump_json()


class ChatEvents(_Events):
    """Renders one chat stream: `first_events(n)` announces the assistant's role for each
    choice, `events(tokens)` carries the content."""

    object_name = "chat.completion.chunk"

    def __init__(
        self,
        request_id: str,
        created: int,
        model: str,
        tokenizer: Tokenizer,
        include_usage: bool,
        n: int,
        logprobs: bool,
    ) -> None:
        super().__init__(request_id, created, model, tokenizer, include_usage, logprobs)
        self._n = n

    def first_events(self) -> str:
        role = '{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
        return "".join(self._choice_head(i, '"delta":') + role + self._tail for i in range(self._n))

    def events(self, tokens: Sequence[StreamToken]) -> str:
        out = []
        for choice, group in _by_choice(tokens, self._n):
            text = group[0].text if len(group) == 1 else "".join(t.text for t in group)
            finish = _stream_finish(group)
            if not text and finish == "null" and not self._logprobs:
                continue
            logprobs = "null"
            if self._logprobs:
                content = [
                    _chat_token_logprob(t.token_id, lp, self._tokenizer)
                    for t, lp in zip(group, _logprobs_of(group))
                ]
                logprobs = ChatLogprobs(content=content).model_dump_json()
            delta = f'{{"content":{_json_str(text)}}}' if text else "{}"
            head = self._choice_head(choice, '"delta":')
            out.append(
                f'{head}{delta},"logprobs":{logprobs},"finish_reason":{finish}}}{self._tail}'
            )
        return "".join(out)
