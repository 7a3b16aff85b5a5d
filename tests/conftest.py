"""Shared fixtures: one tiny random Gemma-2 model (with its BPE tokenizer) per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

_BUILT: dict[str, Path] = {}


def tiny_model_dir_in(base: Path) -> Path:
    """Build the tiny test model under ``base`` once per process and return its directory.

    For tests that need the model outside the fixture (a subprocess, a module-level helper).
    The model is deterministic (seed 0), so every copy is the same model.
    """
    from pva_sae.tiny import make_tiny_model

    key = str(base)
    if key not in _BUILT:
        _BUILT[key] = make_tiny_model(Path(base) / "tiny-gemma2", seed=0)
    return _BUILT[key]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Directory of a random-weight 2-layer Gemma-2 (d_model 64, vocab 512) in Hugging Face format."""
    return tiny_model_dir_in(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """The tiny model loaded through ``pva_sae.models.load_model`` on CPU (float32). Do not mutate it."""
    from pva_sae.config import ModelConfig
    from pva_sae.models import load_model

    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))


def pytest_collection_modifyitems(config, items):
    """Deselect (not skip) GPU tests unless the -m expression names them, e.g. `pytest -m gpu`.

    Deselected tests are counted in pytest's summary line, so they never pass for having not run.
    """
    if "gpu" in (config.option.markexpr or ""):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
