"""`ModelConfig`: the parts of a checkpoint's config.json the engine needs, validated."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncllm.errors import ModelLoadError
from asyncllm.validation import MAX_INT32

__all__ = ["ModelConfig"]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture hyper-parameters read from config.json (and generation_config.json).

    Every value is checked for its type (a bool is not an int, 1.7 is not an id, floats are
    finite) and range (sizes in [1, 2**31 - 1], EOS ids inside the vocabulary); errors are
    `ModelLoadError`s naming the file, the key and the value.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """Read `model_dir`/config.json (and generation_config.json); raises `ModelLoadError`
        naming the file, the key and the value that is wrong."""
        config_path = model_dir / "config.json"
        generation_path = model_dir / "generation_config.json"
        raw = _read_json(config_path, required=True)
        assert raw is not None  # required=True raises instead
        generation = _read_json(generation_path, required=False)
        return cls.from_dict(
            raw, generation, source=str(config_path), generation_source=str(generation_path)
        )

    @classmethod
    def from_dict(
        cls,
        raw: dict[str, Any],
        generation: dict[str, Any] | None = None,
        source: str = "config.json",
        generation_source: str = "generation_config.json",
    ) -> ModelConfig:
        """Build from the parsed config.json (and optional generation_config.json); `source`
        and `generation_source` name them in errors."""

        def get(key: str, kind: type, default: Any = None) -> Any:
            value = raw.get(key)
            if value is None:  # absent, or null: both mean "not set"
                value = default
            if value is None:
                raise ModelLoadError(f"{source}: required key {key!r} is missing")
            return _typed(value, kind, f"{source}: {key!r}")

        archs = raw.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ModelLoadError(f"{source}: 'architectures' must be a non-empty list of names")
        _reject_unsupported_features(raw, source)
        heads = get("num_attention_heads", int)
        hidden = get("hidden_size", int)
        vocab_size = get("vocab_size", int)
        eos_source = generation_source if generation and "eos_token_id" in generation else source
        config = cls(
            architecture=archs[0],
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int),
            num_hidden_layers=get("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", int, heads),
            head_dim=get("head_dim", int, hidden // heads if heads > 0 else 0),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            rope_theta=_rope_theta(raw, source),
            max_position_embeddings=get("max_position_embeddings", int),
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            attention_bias=get("attention_bias", bool, False),
            eos_token_ids=_eos_ids(raw, generation or {}, vocab_size, eos_source),
        )
        config._check(source)
        return config

    @property
    def rotary_table_bytes(self) -> int:
        """Bytes of the rotary cos and sin tables: float32, one row per position up to
        max_position_embeddings (the least that building the model allocates)."""
        return 2 * self.max_position_embeddings * self.head_dim * 4

    def _check(self, source: str) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            # Token ids, positions and sizes are int32 in the kernels.
            if not 0 < getattr(self, name) <= MAX_INT32:
                raise ModelLoadError(
                    f"{source}: {name} must be in [1, 2**31 - 1], got {getattr(self, name)}"
                )
        if self.rms_norm_eps <= 0:
            raise ModelLoadError(
                f"{source}: rms_norm_eps must be positive, got {self.rms_norm_eps}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"{source}: head_dim must be even for rotary, got {self.head_dim}")


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path} does not exist (is this a model directory?)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _typed(value: object, kind: type, where: str) -> Any:
    """`value` as `kind` (int, float or bool), or `ModelLoadError` naming `where`: a bool is
    not an int, 1.7 is not an int, and a float must be finite."""
    if kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ModelLoadError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ModelLoadError(f"{where} must be finite, got {value!r}")
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ModelLoadError(f"{where} must be {kind.__name__}, got {value!r}")
    return value


def _rope_parameters(raw: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelLoadError(f"{source}: {key!r} must be an object (or null), got {value!r}")
    return value


def _rope_theta(raw: dict[str, Any], source: str) -> float:
    # transformers 5 nests it in rope_parameters; older config.json files keep it top-level.
    params = _rope_parameters(raw, "rope_parameters", source)
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not 0 < theta < math.inf:
        raise ModelLoadError(
            f"{source}: rope_theta must be a positive finite number, got {theta!r}"
        )
    return float(theta)


def _reject_unsupported_features(raw: dict[str, Any], source: str) -> None:
    scaling = _rope_parameters(raw, "rope_scaling", source) or _rope_parameters(
        raw, "rope_parameters", source
    )
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default":
        raise ModelLoadError(f"{source}: rope type {rope_type!r} is not supported (only 'default')")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported")
    sliding = raw.get("use_sliding_window")
    if sliding is not None and not isinstance(sliding, bool):
        raise ModelLoadError(f"{source}: 'use_sliding_window' must be a bool, got {sliding!r}")
    if sliding:
        raise ModelLoadError(f"{source}: sliding-window attention is not supported")


def _eos_ids(
    raw: dict[str, Any], generation: dict[str, Any], vocab_size: int, source: str
) -> tuple[int, ...]:
    """The EOS ids, from `source` (generation_config.json, which wins since transformers'
    generate() uses it, else config.json): each an int id inside the vocabulary."""
    value = generation["eos_token_id"] if "eos_token_id" in generation else raw.get("eos_token_id")
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    for token in ids:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
            raise ModelLoadError(
                f"{source}: eos_token_id must be a token id in [0, {vocab_size}) or a list of "
                f"them, got {value!r}"
            )
    return tuple(ids)
