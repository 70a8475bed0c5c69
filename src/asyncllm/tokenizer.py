"""Tokenizer loading and incremental detokenization."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from asyncllm.errors import InvalidRequestError, ModelLoadError

__all__ = ["IncrementalDetokenizer", "Tokenizer", "require_unicode"]


def require_unicode(text: str, source: str) -> None:
    """Raise `InvalidRequestError` naming `source` and the position when `text` holds a lone
    surrogate: Python strings may, but UTF-8 (and so every tokenizer) cannot encode one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end]
        raise InvalidRequestError(
            f"{source} is not valid Unicode: lone surrogate {bad!r} at index {exc.start}"
        ) from None


class Tokenizer:
    """A model's tokenizer: `encode`, `decode`, and per-request incremental detokenizers."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer  # slow import; only when a model is loaded

        # Checked here: transformers builds an empty tokenizer when the files are missing.
        if not (model_dir / "tokenizer.json").is_file():
            raise ModelLoadError(f"{model_dir}: tokenizer.json is missing")
        try:
            self._hf = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as exc:  # transformers raises many types for broken tokenizer files
            raise ModelLoadError(f"{model_dir}: cannot load the tokenizer: {exc}") from exc
        if not getattr(self._hf, "is_fast", False):
            raise ModelLoadError(f"{model_dir}: a fast tokenizer (tokenizer.json) is required")
        self._backend: Any = self._hf.backend_tokenizer

    def encode(self, text: str, source: str = "prompt") -> list[int]:
        """Token ids of `text`, with the special tokens the model expects (e.g. BOS).

        Raises `InvalidRequestError` naming `source` when `text` is not valid Unicode (a lone
        surrogate, e.g. from a JSON "\\ud800" escape), which no tokenizer can encode.
        """
        require_unicode(text, source)
        return cast(list[int], self._hf.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        """Text of `token_ids`, special tokens skipped."""
        text: str = self._backend.decode(token_ids, skip_special_tokens=True)
        return text

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat, formatted by the model's chat template."""
        for index, message in enumerate(messages):
            for key, value in message.items():
                if isinstance(value, str):
                    require_unicode(value, f"message {index} {key!r}")
        ids = self._hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return cast(list[int], ids)

    def detokenizer(self) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one request's output."""
        return IncrementalDetokenizer(self._backend)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces that never split a UTF-8 character.

    Built on `tokenizers.decoders.DecodeStream`, which withholds bytes until they form whole
    characters (byte-level and byte-fallback tokens alike). The pieces concatenate to the
    full decode of the ids.
    """

    def __init__(self, backend: Any) -> None:
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=True)
        self._emitted: list[str] = []

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while a character is still partial)."""
        piece: str | None = self._stream.step(self._backend, token_id)
        if piece:
            self._emitted.append(piece)
        return piece or ""

    def flush(self, token_ids: list[int]) -> str:
        """At the end of the stream: what a full decode of `token_ids` (every id pushed so
        far) has beyond the pieces already returned, e.g. the replacement character of a
        byte sequence cut short."""
        full: str = self._backend.decode(token_ids, skip_special_tokens=True)
        emitted = "".join(self._emitted)
        return full[len(emitted) :] if full.startswith(emitted) else ""
