"""Incremental detokenization: pieces concatenate to the full decode, never split a character."""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from asyncllm.tokenizer import IncrementalDetokenizer
from tests.models import TINY_MODEL_DIR, byte_level_tokenizer

BYTE_LEVEL = byte_level_tokenizer(300).backend_tokenizer


@functools.cache
def tiny_tokenizer() -> Tokenizer:
    backend: Tokenizer = PreTrainedTokenizerFast.from_pretrained(
        str(TINY_MODEL_DIR)
    ).backend_tokenizer
    return backend


def byte_fallback_tokenizer() -> Tokenizer:
    """A sentencepiece-style tokenizer: a few word pieces, everything else as <0xNN> bytes."""
    pieces = ["▁the", "▁a", "▁cat", "▁", "t", "h", "e", "a", "c"]
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({p: 256 + i for i, p in enumerate(pieces)})
    model = models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token=None)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tok


BYTE_FALLBACK = byte_fallback_tokenizer()


def stream_pieces(backend: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(backend)
    return [detok.push(i) for i in ids]


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_byte_level_pieces_rebuild_the_text(text: str) -> None:
    ids = BYTE_LEVEL.encode(text).ids
    pieces = stream_pieces(BYTE_LEVEL, ids)
    assert "".join(pieces) == BYTE_LEVEL.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_byte_fallback_pieces_rebuild_the_text(text: str) -> None:
    ids = BYTE_FALLBACK.encode(text).ids
    pieces = stream_pieces(BYTE_FALLBACK, ids)
    assert "".join(pieces) == BYTE_FALLBACK.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**16), min_size=1, max_size=30))
def test_arbitrary_token_sequences_of_the_embedded_tokenizer(raw: list[int]) -> None:
    tiny = tiny_tokenizer()
    ids = [i % tiny.get_vocab_size() for i in raw]
    detok = IncrementalDetokenizer(tiny)
    pieces = [detok.push(i) for i in ids]
    # A byte sequence cut short is held back while streaming and flushed at the end.
    assert "".join(pieces) + detok.flush(ids) == tiny.decode(ids, skip_special_tokens=True)


def test_a_multibyte_character_is_released_whole() -> None:
    ids = BYTE_LEVEL.encode("é🙂").ids
    assert len(ids) == 6  # 2 + 4 bytes, one token each
    assert stream_pieces(BYTE_LEVEL, ids) == ["", "é", "", "", "", "🙂"]
