"""Builds a model from a directory of config.json + *.safetensors (never pickle).

With a `model.safetensors.index.json` (sharded checkpoints), the files it names are read
and nothing else; without one, every *.safetensors file in the directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from torch import nn
from torch.overrides import TorchFunctionMode

from asyncllm.errors import ModelLoadError
from asyncllm.layers.linear import MergedColumnParallelLinear
from asyncllm.model.base import CausalLM
from asyncllm.model.config import ModelConfig
from asyncllm.model.registry import model_class
from asyncllm.parallel import CheckpointLayout, TPGroup, WeightShard, shard_range

__all__ = ["INDEX_FILE", "CheckpointFile", "checkpoint_files", "load_model", "load_weights"]

INDEX_FILE = "model.safetensors.index.json"


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
    # Parameters are created in `dtype` directly: built in float32 and then cast, a model
    # would hold both copies at once (a 30B model: 120 GB + 60 GB for a moment).
    with torch.device(device), _FactoryDtype(dtype):
        model = cls(config, tp or TPGroup())
    model.to(dtype=dtype)  # buffers computed in float32 (the rotary tables) follow
    load_weights(model, model_dir)
    return model.eval().requires_grad_(False)


class _FactoryDtype(TorchFunctionMode):
    """Within it, in this thread only, `torch.empty` / `zeros` / `ones` without a dtype make
    `dtype` tensors (as `torch.device(...)` does for the device)."""

    _FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones})

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in self._FACTORIES and kwargs.get("dtype") is None:
            kwargs["dtype"] = self.dtype
        return func(*args, **kwargs)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy every tensor of the checkpoint in `model_dir` into `model`, checking names and
    shapes.

    Each tensor is read from disk as the slice this rank holds (`WeightShard`), never whole
    when the model is split, and packed experts are filled slab by slab as their tensors are
    read. Raises `ModelLoadError` naming the file and tensor on: no safetensors files, an
    index naming a missing file or a tensor its file lacks, an unreadable file, an unexpected
    tensor, a shape mismatch (full shapes), a non-floating tensor, or missing tensors.
    """
    plan = _load_plan(model)
    loaded: set[str] = set()
    for file in checkpoint_files(Path(model_dir)):
        loaded |= _read_file(file, plan)
    for packed, replaced in plan.stands_for.items():
        if packed in loaded:
            loaded.update(replaced)
    required = set(plan.targets) - set(plan.stands_for)
    missing = sorted(required - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelLoadError(f"{model_dir}: checkpoint is missing tensors: {shown}")


class CheckpointFile(NamedTuple):
    """A safetensors file to read, and the tensors the index says it holds (None: no
    index)."""

    path: Path
    indexed: frozenset[str] | None = None


def checkpoint_files(model_dir: Path) -> list[CheckpointFile]:
    """The files that make up the checkpoint in `model_dir`: those the index names (each
    must exist), or without an index every *.safetensors file there."""
    index = model_dir / INDEX_FILE
    if not index.is_file():
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(
                f"{model_dir}: no *.safetensors files (other formats are not read)"
            )
        return [CheckpointFile(path) for path in files]
    by_file: dict[str, set[str]] = {}
    for name, file in _weight_map(index).items():
        by_file.setdefault(file, set()).add(name)
    for file, names in sorted(by_file.items()):
        if not (model_dir / file).is_file():
            raise ModelLoadError(
                f"{index}: names {file!r} (holding {len(names)} tensors, e.g. "
                f"{min(names)!r}), which does not exist"
            )
    return [CheckpointFile(model_dir / f, frozenset(n)) for f, n in sorted(by_file.items())]


def _weight_map(index: Path) -> dict[str, str]:
    """The index's `weight_map` (tensor name -> file name in the same directory)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{index} is not readable JSON: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: 'weight_map' must be a non-empty object")
    for name, file in weight_map.items():
        # A plain file name: an index must not send the loader elsewhere on the disk.
        if (
            not isinstance(file, str)
            or Path(file).name != file
            or not file.endswith(".safetensors")
        ):
            raise ModelLoadError(
                f"{index}: tensor {name!r} maps to {file!r}, not a *.safetensors file name"
            )
    return weight_map


def _read_file(file: CheckpointFile, plan: _LoadPlan) -> set[str]:
    """Copy every tensor of `file` to its target; returns the names read."""
    names: set[str] = set()
    try:
        with safe_open(str(file.path), framework="pt", device="cpu") as reader:
            for name in reader.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if name not in plan.aliases:  # a tied head's copy: the first name is the source
                    _copy_tensor(plan.targets, name, reader.get_slice(name), file.path)
                names.add(name)
    except ModelLoadError:
        raise
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ModelLoadError(f"{file.path}: not a readable safetensors file: {exc}") from exc
    absent = sorted((file.indexed or set()) - names)
    if absent:
        raise ModelLoadError(
            f"{file.path}: the index says it holds {absent[0]!r}"
            + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
            + ", but it does not"
        )
    return names


# checkpoint tensor name -> (parameter, which slice of the tensor goes where in it)
_Target = tuple[torch.Tensor, WeightShard]


class _LoadPlan(NamedTuple):
    targets: dict[str, _Target]
    """Every checkpoint name this model reads, mapped to where the tensor goes."""
    aliases: set[str]
    """Names of a parameter already named (tied weights): optional, and not read."""
    stands_for: dict[str, tuple[str, ...]]
    """Optional packed names -> the (required) names each replaces."""


def _load_plan(model: nn.Module) -> _LoadPlan:
    """What the checkpoint of `model` holds and where each tensor goes."""
    packed: dict[str, tuple[str, str]] = getattr(model, "packed_modules", {})
    modules = dict(model.named_modules())
    plan = _LoadPlan({}, set(), {})
    seen: set[int] = set()
    laid_out: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            plan.aliases.add(name)
            continue
        seen.add(id(param))
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name]
        if hasattr(module, "checkpoint_layout"):
            if module_name not in laid_out:
                laid_out.add(module_name)
                _add_layout(plan, module_name, module)
        elif isinstance(module, MergedColumnParallelLinear):
            parent, _, packed_name = module_name.rpartition(".")
            for source, (target, shard) in packed.items():
                if target == packed_name:
                    shard_of = module.weight_shard(leaf, shard)
                    plan.targets[f"{parent}.{source}.{leaf}"] = (param, shard_of)
        elif hasattr(module, "weight_shard"):  # a layer split across tensor-parallel ranks
            plan.targets[name] = (param, module.weight_shard(leaf, None))
        else:
            plan.targets[name] = (param, WeightShard())
    return plan


def _add_layout(plan: _LoadPlan, module_name: str, module: nn.Module) -> None:
    """The checkpoint names of a layer that declares its own (packed experts)."""
    layout: CheckpointLayout = module.checkpoint_layout()  # type: ignore[operator]
    params = dict(module.named_parameters(recurse=False))
    prefix = f"{module_name}."
    for name, (leaf, shard) in layout.tensors.items():
        plan.targets[prefix + name] = (params[leaf], shard)
    for name, replaced in layout.stands_for.items():
        plan.stands_for[prefix + name] = tuple(prefix + r for r in replaced)


def _copy_tensor(targets: dict[str, _Target], name: str, stored: Any, file: Path) -> None:
    """Copy this rank's slice of the stored tensor `name` (a safetensors slice handle)."""
    if name not in targets:
        raise ModelLoadError(f"{file}: unexpected tensor {name!r} (not part of this model)")
    param, shard = targets[name]
    destination = param.data if shard.expert is None else param.data[shard.expert]
    if shard.rows is not None:
        destination = destination[shard.rows]
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
    # Each of the `chunks` projections stacked along `dim` is cut into `parts` on its own.
    chunk_size = shape[shard.dim] // shard.chunks
    local_chunk = destination.shape[shard.dim] // shard.chunks
    for chunk in range(shard.chunks):
        start, end = shard_range(chunk_size, shard.part, shard.parts)
        index: list[slice] = [slice(None)] * len(shape)
        index[shard.dim] = slice(chunk * chunk_size + start, chunk * chunk_size + end)
        target = destination.narrow(shard.dim, chunk * local_chunk, local_chunk)
        target.copy_(stored[tuple(index)])


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
