"""The Python API: every stage through `pva_sae`, the run directory as the source of truth, and `load_run`'s
tables (the tiny model of conftest, on a copy of the analysed fixture's run)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import pva_sae
from pva_sae.config import Config
from pva_sae.errors import InputError, MissingInputError, PvaSaeError
from pva_sae.rundir.artifacts import load_ranked, load_records
from pva_sae.rundir.paths import AnalysisPaths, RunDir, SteeringPaths, ValidationPaths

VALIDATION = {"validation.temperatures": [0.0], "validation.robustness_max_tasks": 3,
              "validation.samples_per_temperature": 1, "validation.bootstrap_resamples": 50,
              "validation.probe_folds": 2, "validation.probe_cs": 2}
STEERING = {"steering.alpha_grid": [4.0], "steering.refine_steps": 0, "steering.n_controls": 2,
            "steering.tuning_controls": 1, "steering.control_max_separation": 1.0, "steering.max_tasks": 4,
            "steering.tuning_max_tasks": 4, "steering.n_permutations": 100, "steering.bootstrap_resamples": 100}


def _copy(analysed, dest):
    shutil.copytree(analysed[1].root, dest)
    return dest


@pytest.fixture(scope="module")
def finished(analysed, tmp_path_factory, tiny_loaded):
    """Validation, steering and the report through the API, keyed by run directory only; then load_run."""
    run_dir = _copy(analysed, tmp_path_factory.mktemp("api") / "run")
    validation = pva_sae.validate(run_dir=run_dir, overrides=VALIDATION, progress=False, loaded=tiny_loaded)
    steering = pva_sae.steer(run_dir=run_dir, overrides=STEERING, progress=False, loaded=tiny_loaded)
    html, md = pva_sae.report(run_dir)
    return RunDir.at(run_dir), validation, steering, (html, md), pva_sae.load_run(run_dir)


def test_import_stays_torch_free_and_exports_every_stage():
    code = ("import sys, pva_sae; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(' '.join(n for n in pva_sae.__all__ if n != '__version__'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    names = out.stdout.split()
    assert set(names) == {"run", "build_dataset", "analyze", "validate", "steer", "report", "load_run", "make_config"}
    assert all(callable(getattr(pva_sae, name)) for name in names)
    with pytest.raises(AttributeError, match="no_such_stage"):
        pva_sae.no_such_stage  # noqa: B018


def test_stages_through_the_api_and_load_run(finished, tiny_model_dir):
    run, validation, steering, (html, md), loaded = finished
    assert loaded.stages_done == ("build", "analyze", "validate", "steer")
    assert html.is_file() and md.is_file()
    records = load_records(run.root)
    assert isinstance(loaded.records, pd.DataFrame) and len(loaded.records) == len(records)
    assert loaded.records["task_id"].tolist() == [r["task_id"] for r in records]
    assert loaded.records["passed"].tolist() == [r["passed"] for r in records]
    ranked = load_ranked(AnalysisPaths.of(run))
    assert len(loaded.ranked) == len(ranked) and {"layer", "latent", "direction", "metric"} <= set(loaded.ranked)
    assert loaded.analysis["release"] == "local"
    # the dicts are the stages' own results, the tables their per-task files
    assert loaded.validation == json.loads(ValidationPaths.of(run).results.read_text()) == json.loads(
        json.dumps(validation))
    assert loaded.steering == json.loads(SteeringPaths.of(run).results.read_text()) == json.loads(json.dumps(steering))
    scores = loaded.validation_scores
    assert {"task_id", "correct", "difficulty"} <= set(scores)
    assert len(scores) == validation["splits"]["validation"]["n"]
    assert set(scores["task_id"]) <= set(loaded.records["task_id"])
    tasks = loaded.steered_tasks
    assert {"task_id", "kind", "baseline_passed", "steered_passed"} <= set(tasks)
    assert set(tasks["kind"]) == {"target", "latent", "random"}
    # the run directory was the source of truth: model and SAEs from the run, each stage's settings from its call
    assert isinstance(loaded.config, Config)
    assert loaded.config.model.name == str(tiny_model_dir) and loaded.config.analysis.sae_release == "local"
    assert loaded.config.steering.max_tasks == 4 and loaded.config.validation.probe_cs == 2
    assert any("net effect" in line for line in loaded.summary())
    assert "stages done: build, analyze, validate, steer" in repr(loaded)


def test_a_rerun_through_the_api_reuses_the_run(finished, tiny_loaded):
    run, _, steering, _, _ = finished
    again = pva_sae.steer(run_dir=run.root, progress=False, loaded=tiny_loaded)   # settings from steering/config.json
    assert again["tasks"]["generated"] == 0 and again["experiments"] == steering["experiments"]
    with pytest.raises(PvaSaeError, match="generation.max_new_tokens"):
        pva_sae.validate(run_dir=run.root, overrides={"generation.max_new_tokens": 16}, progress=False)


def test_a_config_object_and_keywords(analysed, tmp_path):
    cfg, run, _, _ = analysed
    dest = _copy(analysed, tmp_path / "run")
    # a finished build returns its saved records, given its Config (with keywords on top) or its settings
    assert pva_sae.build_dataset(config=cfg, end_idx=29, run_dir=dest, progress=False) == load_records(dest)
    assert pva_sae.build_dataset(model=cfg.model.name, end_idx=29, run_dir=dest, progress=False, overrides={
        "generation.max_new_tokens": 4, "generation.batch_size": 10}) == load_records(dest)
    mine = pva_sae.make_config(run_dir=dest, overrides={"model.name": cfg.model.name})
    with pytest.raises(PvaSaeError, match="differing fields: data.end_idx, generation.max_new_tokens"):
        pva_sae.build_dataset(config=mine, progress=False)     # other build settings are refused by name
    with pytest.raises(InputError, match="not both"):
        pva_sae.analyze(mine, config_file="x.toml")
    with pytest.raises(InputError, match="Config"):
        pva_sae.analyze({"output": {"run_dir": str(dest)}})
    with pytest.raises(InputError, match="unknown stage"):
        pva_sae.api.stage_config("transmogrify")
    # a later stage's keywords start from the run's saved config, not the defaults
    resolved = pva_sae.api.stage_config("validate", items=[f"output.run_dir={dest}", "validation.probe_cs=4"])
    assert resolved.model.name == cfg.model.name and resolved.analysis.sae_local_dir == cfg.analysis.sae_local_dir
    assert resolved.validation.probe_cs == 4


def test_load_run_of_a_partial_run_and_missing_artifacts(analysed, tmp_path):
    with pytest.raises(MissingInputError, match=r"not a run directory.*pva-sae build"):
        pva_sae.load_run(tmp_path / "nothing")
    dest = _copy(analysed, tmp_path / "run")
    run = RunDir.at(dest)
    partial = pva_sae.load_run(dest)                    # built and analysed only: later stages are None
    assert partial.stages_done == ("build", "analyze") and partial.ranked is not None
    assert partial.validation is None and partial.validation_scores is None
    assert partial.steering is None and partial.steered_tasks is None and partial.summary() == []
    AnalysisPaths.of(run).ranked_json.unlink()          # a finished stage lost an artifact: rerun that stage
    with pytest.raises(MissingInputError, match=r"analyze stage is marked done.*ranked_latents\.json.*pva-sae analyze"):
        pva_sae.load_run(dest)
    run.marker("build").unlink()
    with pytest.raises(MissingInputError, match="pva-sae build"):
        pva_sae.load_run(dest)
