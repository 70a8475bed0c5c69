"""Shared fixtures: model directories (random and embedded) and their transformers twins."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import Qwen3ForCausalLM

from tests.models import RANDOM_CONFIGS, TINY_MODEL_DIR, load_reference, write_random_model


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 'gqa4-tied' Qwen3 without EOS (generation runs to max_tokens)."""
    directory = tmp_path_factory.mktemp("random-model")
    write_random_model(directory, seed=0)
    return directory


@pytest.fixture(scope="session")
def random_reference(random_model_dir: Path) -> Qwen3ForCausalLM:
    return load_reference(random_model_dir)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Name -> directory: "tiny" (the shipped model) and each of RANDOM_CONFIGS, made lazily."""

    class Dirs(dict[str, Path]):
        def __missing__(self, name: str) -> Path:
            directory = tmp_path_factory.mktemp(f"model-{name}")
            write_random_model(directory, seed=1, **RANDOM_CONFIGS[name])
            self[name] = directory
            return directory

    return Dirs(tiny=TINY_MODEL_DIR)


@pytest.fixture(scope="session", params=sorted(RANDOM_CONFIGS))
def random_config_dir(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> Path:
    """Each random shape in turn."""
    return model_dirs[request.param]
