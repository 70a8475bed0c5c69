"""`ModelConfig`: the parts of a checkpoint's config.json the engine needs, validated."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncllm.errors import ModelLoadError
from asyncllm.layers.rotary import RopeScaling, yarn_attention_factor
from asyncllm.validation import MAX_INT32

__all__ = ["MOE_ARCHITECTURES", "ROPE_TYPES", "MoEConfig", "ModelConfig"]

MOE_ARCHITECTURES = frozenset({"Qwen3MoeForCausalLM"})
"""Architectures whose config.json describes experts (num_experts, moe_intermediate_size, ...);
other architectures' files are not read for those keys."""

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
"""Rotary variants the engine computes exactly as transformers does."""


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """The mixture-of-experts keys of config.json (`MOE_ARCHITECTURES` only)."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    """Renormalise the top-k routing weights to sum to 1."""
    decoder_sparse_step: int
    """Every decoder_sparse_step-th layer (1-based) is sparse..."""
    mlp_only_layers: tuple[int, ...]
    """...unless listed here (0-based): those keep a dense MLP of intermediate_size."""

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` (0-based) routes to experts."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def check(self, num_hidden_layers: int, source: str) -> None:
        """Raise `ModelLoadError` naming `source` and the key for values that contradict
        each other or the layer count."""
        if self.num_experts_per_tok > self.num_experts:
            raise ModelLoadError(
                f"{source}: 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the "
                f"number of experts ({self.num_experts})"
            )
        outside = [i for i in self.mlp_only_layers if not 0 <= i < num_hidden_layers]
        if outside:
            raise ModelLoadError(
                f"{source}: 'mlp_only_layers' names layers {outside} outside "
                f"[0, {num_hidden_layers})"
            )


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
    mlp_bias: bool = False
    rope_scaling: RopeScaling | None = None
    """None: plain rotary ("default")."""
    sliding_window: int | None = None
    """The attention window a checkpoint asks for (None: full attention). The engine only
    serves such a model when max_model_len <= sliding_window, where the two are the same."""
    moe: MoEConfig | None = None

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

        get = _Reader(raw, source).get

        archs = raw.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ModelLoadError(f"{source}: 'architectures' must be a non-empty list of names")
        _reject_unsupported_features(raw, source)
        heads = get("num_attention_heads", int)
        hidden = get("hidden_size", int)
        vocab_size = get("vocab_size", int)
        max_positions = get("max_position_embeddings", int)
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
            max_position_embeddings=max_positions,
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            attention_bias=get("attention_bias", bool, False),
            eos_token_ids=_eos_ids(raw, generation or {}, vocab_size, eos_source),
            mlp_bias=get("mlp_bias", bool, False),
            rope_scaling=_rope_scaling(raw, source, max_positions),
            sliding_window=_sliding_window(raw, source),
            moe=_moe(raw, source) if archs[0] in MOE_ARCHITECTURES else None,
        )
        config._check(source)
        return config

    @property
    def position_limit(self) -> int:
        """How many positions the model serves (the longest max_model_len): with yarn rope
        scaling, original_max_position_embeddings * factor where that exceeds
        max_position_embeddings (its frequencies are the same at every length, so transformers
        computes every position alike; vLLM serves as long), else max_position_embeddings."""
        scaling = self.rope_scaling
        if scaling is None or scaling.rope_type != "yarn":
            return self.max_position_embeddings
        extended = int(scaling.original_max_position_embeddings * scaling.factor)
        return max(self.max_position_embeddings, extended)

    @property
    def rotary_table_bytes(self) -> int:
        """Bytes of the rotary cos and sin tables: float32, one row per position up to
        position_limit (the least that building the model allocates)."""
        return 2 * self.position_limit * self.head_dim * 4

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
        self._check_yarn(source)
        if self.moe is not None:
            self.moe.check(self.num_hidden_layers, source)

    def _check_yarn(self, source: str) -> None:
        if self.rope_scaling is None or self.rope_scaling.rope_type != "yarn":
            return
        if self.rope_theta <= 1:  # yarn's ramp divides by log(rope_theta)
            raise ModelLoadError(
                f"{source}: rope_theta must exceed 1 for yarn rope scaling, got {self.rope_theta}"
            )
        if self.position_limit > MAX_INT32:  # positions are int32 in the kernels
            raise ModelLoadError(
                f"{source}: yarn's original_max_position_embeddings * factor "
                f"({self.position_limit}) must be at most 2**31 - 1"
            )


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


class _Reader:
    """Typed reads of config.json keys; errors name the file, the key and the value."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def get(self, key: str, kind: type, default: Any = None) -> Any:
        """`raw[key]` as `kind`; absent or null means `default` (None: the key is required)."""
        value = self.raw.get(key)
        if value is None:  # absent, or null: both mean "not set"
            value = default
        if value is None:
            raise ModelLoadError(f"{self.source}: required key {key!r} is missing")
        return _typed(value, kind, f"{self.source}: {key!r}")

    def positive(self, key: str, kind: type, default: Any = None) -> Any:
        """`get`, then a check that the number is positive (and an int fits int32)."""
        value = self.get(key, kind, default)
        limit = MAX_INT32 if kind is int else math.inf
        if not 0 < value <= limit:
            bound = "[1, 2**31 - 1]" if kind is int else "positive"
            raise ModelLoadError(f"{self.source}: {key!r} must be {bound}, got {value!r}")
        return value


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
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported")


def _rope_scaling(raw: dict[str, Any], source: str, max_positions: int) -> RopeScaling | None:
    """The rope scaling of `rope_scaling` (transformers 4) or else `rope_parameters` (5)."""
    key = "rope_scaling" if raw.get("rope_scaling") is not None else "rope_parameters"
    params = _rope_parameters(raw, key, source)
    where = f"{source}: {key!r}"
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:  # a rotary over part of each head: no family here uses one
        raise ModelLoadError(
            f"{source}: 'partial_rotary_factor' {partial!r} is not supported (only 1.0)"
        )
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(
            f"{where}: rope type {rope_type!r} is not supported (supported: {list(ROPE_TYPES)})"
        )
    if rope_type == "default":
        return None
    read = _Reader(params, where).positive
    original = 0
    if rope_type in ("llama3", "yarn"):
        original = _original_max_positions(raw, params, source, where, max_positions)
    # transformers 5 derives a null yarn factor from the two lengths (DeepSeek-V3's configs).
    factor = read("factor", float, max_positions / original if rope_type == "yarn" else None)
    if factor < 1.0:
        raise ModelLoadError(f"{where}: 'factor' must be >= 1, got {factor!r}")
    if rope_type == "yarn":
        return _yarn(params, where, factor, original)
    if rope_type != "llama3":
        return RopeScaling(rope_type, factor)
    low, high = read("low_freq_factor", float), read("high_freq_factor", float)
    if high <= low:
        raise ModelLoadError(
            f"{where}: 'high_freq_factor' ({high!r}) must exceed 'low_freq_factor' ({low!r})"
        )
    return RopeScaling(rope_type, factor, low, high, original)


def _original_max_positions(
    raw: dict[str, Any], params: dict[str, Any], source: str, where: str, max_positions: int
) -> int:
    """The pre-training context of llama3 / yarn scaling, where transformers 5 looks for it: a
    top-level original_max_position_embeddings (Phi-3 keeps it there) wins over the rope
    parameters' own, and max_position_embeddings stands in for both when absent."""
    if raw.get("original_max_position_embeddings") is not None:
        top: int = _Reader(raw, source).positive("original_max_position_embeddings", int)
        return top
    nested: int = _Reader(params, where).positive(
        "original_max_position_embeddings", int, max_positions
    )
    return nested


def _yarn(params: dict[str, Any], where: str, factor: float, original: int) -> RopeScaling:
    """YaRN's fields, with transformers' defaults (beta_fast 32, beta_slow 1, truncate on, the
    attention factor from `factor` and, when both are set, mscale / mscale_all_dim)."""
    read = _Reader(params, where)
    beta_fast = read.positive("beta_fast", float, 32.0)
    beta_slow = read.positive("beta_slow", float, 1.0)
    if beta_fast < beta_slow:
        raise ModelLoadError(
            f"{where}: 'beta_fast' ({beta_fast!r}) must be at least 'beta_slow' ({beta_slow!r})"
        )
    mscale, mscale_all_dim = (
        None if params.get(key) is None else read.positive(key, float)
        for key in ("mscale", "mscale_all_dim")
    )
    default_attention = yarn_attention_factor(factor, mscale, mscale_all_dim)
    attention = read.positive("attention_factor", float, default_attention)
    # transformers tests truncate's truth, so a null one is false (not the default, true).
    truncate = params.get("truncate", True) is not None and read.get("truncate", bool, True)
    return RopeScaling(
        "yarn", factor, original_max_position_embeddings=original, beta_fast=beta_fast,
        beta_slow=beta_slow, attention_factor=attention, truncate=truncate,
    )  # fmt: skip


def _sliding_window(raw: dict[str, Any], source: str) -> int | None:
    """The window the checkpoint's attention uses, or None for full attention.

    Qwen2/Qwen3 files carry `sliding_window` even when `use_sliding_window` is false (then it
    is unused); Mistral's have no switch: a non-null `sliding_window` is used. transformers 5
    may also list per-layer `layer_types`.
    """
    read = _Reader(raw, source)
    enabled = read.get("use_sliding_window", bool, True)
    layer_types = raw.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types)
    ):
        raise ModelLoadError(
            f"{source}: 'layer_types' must be a list of names, got {layer_types!r}"
        )
    if "sliding_attention" in (layer_types or []):
        enabled = True
    if raw.get("sliding_window") is None or not enabled:
        return None
    window: int = read.positive("sliding_window", int)
    return window


def _moe(raw: dict[str, Any], source: str) -> MoEConfig:
    read = _Reader(raw, source)
    # transformers 5 writes num_local_experts; the published checkpoints say num_experts.
    key = "num_experts"
    if raw.get(key) is None and raw.get("num_local_experts") is not None:
        key = "num_local_experts"
    only = raw.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(_typed_int(i) is None for i in only):
        raise ModelLoadError(
            f"{source}: 'mlp_only_layers' must be a list of layer indices, got {only!r}"
        )
    return MoEConfig(
        num_experts=read.positive(key, int),
        num_experts_per_tok=read.positive("num_experts_per_tok", int),
        moe_intermediate_size=read.positive("moe_intermediate_size", int),
        norm_topk_prob=read.get("norm_topk_prob", bool, False),
        decoder_sparse_step=read.positive("decoder_sparse_step", int, 1),
        mlp_only_layers=tuple(only),
    )


def _typed_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
