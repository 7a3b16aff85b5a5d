"""Shared fixtures: one tiny random Gemma-2 model (with its BPE tokenizer) per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

_BUILT: dict[str, Path] = {}


def tiny_model_dir_in(base: Path) -> Path:
    """Build the tiny test model under ``base`` once per process and return its directory.

    For tests that need the model outside the fixture (a subprocess, a module-level helper).
    The model is deterministic (seed 0), so every copy is the same model.
    """
    from pva_sae.default.tiny import make_tiny_model

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
    from pva_sae.model.registry import load_model

    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))


D_SAE = 96


def replace_dataset(run, dataset) -> None:
    """Write ``dataset`` as the run's labelled dataset and record it in the build marker, as a build would
    (tests plant labels this way; any other change of the dataset is caught as stale by later stages)."""
    from pva_sae.rundir.atomic import atomic_write_json, read_json
    from pva_sae.rundir.fingerprints import records_digest

    atomic_write_json(run.dataset_json, dataset)
    marker = read_json(run.marker("build"))
    marker["outputs"]["records"] = records_digest(run)
    atomic_write_json(run.marker("build"), marker)


def make_saes(folder, n_layers, d_model, seed=0):
    import numpy as np

    from pva_sae.sae.loaders import save_gemmascope_npz

    rng = np.random.default_rng(seed)
    for layer in range(n_layers):
        w_dec = rng.normal(size=(D_SAE, d_model)).astype(np.float32)
        w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
        save_gemmascope_npz(folder / f"layer_{layer}" / "params.npz", W_enc=w_dec.T.copy(), W_dec=w_dec,
                            b_enc=np.zeros(D_SAE, np.float32), b_dec=np.zeros(d_model, np.float32),
                            threshold=np.full(D_SAE, 0.05, np.float32))


@pytest.fixture(scope="session")
def analysed(tiny_model_dir, tmp_path_factory):
    """A finished build (labels planted: task_id % 3 == 0 passes) and analysis on 30 tasks; do not mutate."""
    from transformers import AutoConfig

    from pva_sae.config import resolve_config
    from pva_sae.rundir.paths import RunDir
    from pva_sae.stages.analyze import analyze
    from pva_sae.stages.build import build_dataset

    base = tmp_path_factory.mktemp("analyze")
    run_dir = base / "run"
    common = [f"model.name={tiny_model_dir}", f"output.run_dir={run_dir}", "checkpoint.resume=auto",
              "generation.max_new_tokens=4", "generation.batch_size=10"]
    build_dataset(resolve_config(overrides=common + ["data.end_idx=29"]), progress=False)
    run = RunDir.at(run_dir)
    dataset = json.loads(run.dataset_json.read_text())
    for record in dataset["records"]:  # a random model solves nothing: plant labels to exercise both classes
        record["passed"] = record["task_id"] % 3 == 0
    replace_dataset(run, dataset)

    hf = AutoConfig.from_pretrained(tiny_model_dir)
    make_saes(base / "saes", hf.num_hidden_layers, hf.hidden_size)
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}  # doc {i}"}) + "\n"
                              for i in range(25)))
    cfg = resolve_config(overrides=common + [
        "analysis.sae_release=local", f"analysis.sae_local_dir={base / 'saes'}",
        f"analysis.general_corpus={corpus}", f"analysis.cache_dir={base / 'cache'}", "analysis.top_k=5",
        "analysis.general_max_frequency=0.5"])
    summary = analyze(cfg, progress=False)
    return cfg, run, summary, hf


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
