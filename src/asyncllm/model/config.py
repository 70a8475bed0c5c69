"""`ModelConfig`: the parts of a checkpoint's config.json the engine needs, validated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncllm.errors import ModelLoadError

__all__ = ["ModelConfig"]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture hyper-parameters read from config.json (and generation_config.json)."""

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
        """Read `model_dir`/config.json; raises `ModelLoadError` naming what is wrong."""
        raw = _read_json(model_dir / "config.json", required=True)
        assert raw is not None  # required=True raises instead
        generation = _read_json(model_dir / "generation_config.json", required=False)
        return cls.from_dict(raw, generation, source=str(model_dir / "config.json"))

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], generation: dict[str, Any] | None = None, source: str = "config"
    ) -> ModelConfig:
        """Build from the parsed config.json (and optional generation_config.json)."""

        def get(key: str, kind: type, default: Any = None) -> Any:
            value = raw.get(key, default)
            if value is None:
                raise ModelLoadError(f"{source}: required key {key!r} is missing")
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ModelLoadError(f"{source}: {key!r} must be {kind.__name__}, got {value!r}")
            return value

        archs = raw.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ModelLoadError(f"{source}: 'architectures' must be a non-empty list of names")
        _reject_unsupported_features(raw, source)
        heads = get("num_attention_heads", int)
        hidden = get("hidden_size", int)
        config = cls(
            architecture=archs[0],
            vocab_size=get("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int),
            num_hidden_layers=get("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", int, heads),
            head_dim=get("head_dim", int, hidden // heads if heads else 0),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            rope_theta=_rope_theta(raw, source),
            max_position_embeddings=get("max_position_embeddings", int),
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            attention_bias=get("attention_bias", bool, False),
            eos_token_ids=_eos_ids(raw, generation or {}),
        )
        config._check(source)
        return config

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
            if getattr(self, name) <= 0:
                raise ModelLoadError(
                    f"{source}: {name} must be positive, got {getattr(self, name)}"
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


def _rope_theta(raw: dict[str, Any], source: str) -> float:
    # transformers 5 nests it in rope_parameters; older config.json files keep it top-level.
    params = raw.get("rope_parameters") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ModelLoadError(f"{source}: rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def _reject_unsupported_features(raw: dict[str, Any], source: str) -> None:
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default":
        raise ModelLoadError(f"{source}: rope type {rope_type!r} is not supported (only 'default')")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported")
    if raw.get("use_sliding_window"):
        raise ModelLoadError(f"{source}: sliding-window attention is not supported")


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    # generation_config.json wins: it is what transformers' generate() uses.
    value = generation.get("eos_token_id", raw.get("eos_token_id"))
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    return tuple(int(i) for i in ids)
