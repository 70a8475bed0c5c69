"""Builds a model from a directory of config.json + *.safetensors (never pickle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from asyncllm.errors import ModelLoadError
from asyncllm.layers.linear import MergedColumnParallelLinear
from asyncllm.model.base import CausalLM
from asyncllm.model.config import ModelConfig
from asyncllm.model.registry import model_class
from asyncllm.parallel import TPGroup, WeightShard, shard_range

__all__ = ["load_model", "load_weights"]


def load_model(
    model_dir: Path,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    tp: TPGroup | None = None,
) -> CausalLM:
    """Instantiate the registered class for `config.architecture` and load its weights (this
    rank's shard of them, under tensor parallelism)."""
    cls = model_class(config.architecture)
    with torch.device(device):
        model = cls(config, tp or TPGroup())
    model.to(dtype=dtype)
    load_weights(model, model_dir)
    return model.eval().requires_grad_(False)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy every tensor of `model_dir`/*.safetensors into `model`, checking names and shapes.

    Each tensor is read from disk as the slice this rank holds (`WeightShard`), never whole
    when the model is split. Raises `ModelLoadError` naming the file and tensor on: no
    safetensors files, an unreadable file, an unexpected tensor, a shape mismatch (full
    shapes), a non-floating tensor, or missing tensors.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors files (other formats are not read)")
    targets, aliases = _load_targets(model)
    loaded: set[str] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for name in reader.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if name not in aliases:  # a tied head's copy: the first name is the source
                        _copy_tensor(targets, name, reader.get_slice(name), file)
                    loaded.add(name)
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise ModelLoadError(f"{file}: not a readable safetensors file: {exc}") from exc
    missing = sorted(set(targets) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelLoadError(f"{model_dir}: checkpoint is missing tensors: {shown}")


# checkpoint tensor name -> (parameter, which slice of the tensor goes where in it)
_Target = tuple[torch.Tensor, WeightShard]


def _load_targets(model: nn.Module) -> tuple[dict[str, _Target], set[str]]:
    """Checkpoint names this model expects, mapped to where each tensor goes, and the names
    that alias an earlier parameter (tied weights: optional in a checkpoint)."""
    packed: dict[str, tuple[str, str]] = getattr(model, "packed_modules", {})
    modules = dict(model.named_modules())
    targets: dict[str, _Target] = {}
    aliases: set[str] = set()
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
            continue
        seen.add(id(param))
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name]
        if isinstance(module, MergedColumnParallelLinear):
            parent, _, packed_name = module_name.rpartition(".")
            for source, (target, shard) in packed.items():
                if target == packed_name:
                    targets[f"{parent}.{source}.{leaf}"] = (param, module.weight_shard(leaf, shard))
        elif hasattr(module, "weight_shard"):  # a layer split across tensor-parallel ranks
            targets[name] = (param, module.weight_shard(leaf, None))
        else:
            targets[name] = (param, WeightShard())
    return targets, aliases


def _copy_tensor(targets: dict[str, _Target], name: str, stored: Any, file: Path) -> None:
    """Copy this rank's slice of the stored tensor `name` (a safetensors slice handle)."""
    if name not in targets:
        raise ModelLoadError(f"{file}: unexpected tensor {name!r} (not part of this model)")
    param, shard = targets[name]
    destination = param.data if shard.rows is None else param.data[shard.rows]
    dtype = _SAFETENSORS_DTYPES.get(stored.get_dtype(), stored.get_dtype())
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ModelLoadError(f"{file}: tensor {name!r} has dtype {dtype}, expected floating")
    shape = tuple(stored.get_shape())
    expected = list(destination.shape)
    if shard.dim is not None:
        expected[shard.dim] *= shard.parts  # the stored tensor holds every rank's slice
    if shape != tuple(expected):
        raise ModelLoadError(
            f"{file}: tensor {name!r} has shape {shape}, expected {tuple(expected)}"
        )
    if shard.dim is None:
        destination.copy_(stored[:])
        return
    start, end = shard_range(shape[shard.dim], shard.part, shard.parts)
    index: list[slice] = [slice(None)] * len(shape)
    index[shard.dim] = slice(start, end)
    destination.copy_(stored[tuple(index)])


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
