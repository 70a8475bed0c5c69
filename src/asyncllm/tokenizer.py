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
        self._special_ids = frozenset(self._backend.get_added_tokens_decoder())
        self._byte_level = type(self._backend.decoder).__name__ == "ByteLevel"
        self._token_bytes: dict[int, bytes] = {}

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (the model may have more rows)."""
        return cast(int, self._backend.get_vocab_size(with_added_tokens=True))

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

    @property
    def has_chat_template(self) -> bool:
        """True when the model ships a chat template (tokenizer_config.json or a .jinja file)."""
        return bool(getattr(self._hf, "chat_template", None))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of a chat, formatted by the model's chat template (with transformers,
        which renders it in a sandboxed jinja2 environment).

        `add_generation_prompt` ends the text with the assistant's turn header;
        `continue_final_message` leaves the last message open so a reply continues it;
        `template_kwargs` are extra template variables (e.g. `enable_thinking`). Raises
        `InvalidRequestError` when the model has no template or the template rejects the
        messages (e.g. roles that do not alternate).
        """
        # The messages are checked first: a bad message is the caller's to fix on any model.
        for index, message in enumerate(messages):
            for key, value in message.items():
                if isinstance(value, str):
                    require_unicode(value, f"message {index} {key!r}")
        if not self.has_chat_template:
            raise InvalidRequestError("the model has no chat template; send a plain prompt")
        if add_generation_prompt and continue_final_message:
            raise InvalidRequestError(
                "add_generation_prompt and continue_final_message cannot both be true"
            )
        try:
            ids = self._hf.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=True,
                return_dict=False,
                **(template_kwargs or {}),
            )
        except Exception as exc:  # jinja2 errors, raise_exception() in templates, bad kwargs
            raise InvalidRequestError(f"the chat template failed: {exc}") from exc
        return cast(list[int], ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes token `token_id` stands for (a piece of a UTF-8 character, maybe).

        Byte-level BPE vocabularies spell bytes as printable characters; this undoes that.
        Special tokens give their text. Cached per id.
        """
        cached = self._token_bytes.get(token_id)
        if cached is None:
            cached = self._token_bytes[token_id] = self._compute_token_bytes(token_id)
        return cached

    def _compute_token_bytes(self, token_id: int) -> bytes:
        piece: str | None = self._backend.id_to_token(token_id)
        if piece is None:
            raise InvalidRequestError(f"token id {token_id} is not in the vocabulary")
        if token_id in self._special_ids or not self._byte_level:
            return cast(str, self._backend.decode([token_id], skip_special_tokens=False)).encode()
        return bytes(_UNICODE_TO_BYTE[char] for char in piece)

    def detokenizer(self) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one request's output."""
        return IncrementalDetokenizer(self._backend)


def _byte_level_alphabet() -> dict[str, int]:
    """The printable character a byte-level BPE vocabulary uses for each byte (GPT-2's map):
    printable Latin-1 bytes stand for themselves, the others take code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(b for b in range(256) if b not in chars):
        chars[byte] = chr(256 + offset)
    return {char: byte for byte, char in chars.items()}


_UNICODE_TO_BYTE = _byte_level_alphabet()


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
