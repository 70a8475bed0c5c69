"""Builds a model from a directory of config.json + *.safetensors (never pickle)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from asyncllm.errors import ModelLoadError
from asyncllm.layers.linear import PackedLinear
from asyncllm.model.base import CausalLM
from asyncllm.model.config import ModelConfig
from asyncllm.model.registry import model_class

__all__ = ["load_model", "load_weights"]


def load_model(
    model_dir: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype
) -> CausalLM:
    """Instantiate the registered class for `config.architecture` and load its weights."""
    cls = model_class(config.architecture)
    with torch.device(device):
        model = cls(config)
    model.to(dtype=dtype)
    load_weights(model, model_dir)
    return model.eval().requires_grad_(False)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy every tensor of `model_dir`/*.safetensors into `model`, checking names and shapes.

    Raises `ModelLoadError` naming the file and tensor on: no safetensors files, an unreadable
    file, an unexpected tensor, a shape mismatch, a non-floating tensor, or missing tensors.
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
                        _copy_tensor(targets, name, reader.get_tensor(name), file)
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


# checkpoint tensor name -> (parameter, rows of it that the tensor fills, or None for all)
_Target = tuple[torch.Tensor, "slice | None"]


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
        if isinstance(module, PackedLinear):
            parent, _, packed_name = module_name.rpartition(".")
            for source, (target, shard) in packed.items():
                if target == packed_name:
                    targets[f"{parent}.{source}.{leaf}"] = (param, module.shard_slice(shard))
        else:
            targets[name] = (param, None)
    return targets, aliases


def _copy_tensor(targets: dict[str, _Target], name: str, tensor: torch.Tensor, file: Path) -> None:
    if name not in targets:
        raise ModelLoadError(f"{file}: unexpected tensor {name!r} (not part of this model)")
    param, rows = targets[name]
    destination = param.data if rows is None else param.data[rows]
    if not tensor.is_floating_point():
        raise ModelLoadError(f"{file}: tensor {name!r} has dtype {tensor.dtype}, expected floating")
    if tuple(tensor.shape) != tuple(destination.shape):
        raise ModelLoadError(
            f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
            f"expected {tuple(destination.shape)}"
        )
    destination.copy_(tensor)
