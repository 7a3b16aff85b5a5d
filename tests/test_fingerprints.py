"""Results are never computed from stale inputs: stage markers carry fingerprints, stages check them,
caches are keyed by everything they depend on."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pva_sae.config import resolve_config
from pva_sae.errors import StaleInputError
from pva_sae.rundir.artifacts import load_activations
from pva_sae.rundir.atomic import read_json
from pva_sae.rundir.fingerprints import records_digest
from pva_sae.rundir.paths import AnalysisPaths, RunDir
from pva_sae.sae.general_filter import general_frequencies
from pva_sae.sae.jumprelu import JumpReLUSAE
from pva_sae.stages.analyze import analyze
from pva_sae.stages.validate import validate


@pytest.fixture()
def run_copy(analysed, tmp_path):
    from test_validate import copy_run, with_analysis

    cfg = with_analysis(copy_run(analysed, tmp_path / "run"), analysed)
    return cfg, RunDir.at(tmp_path / "run")


def test_markers_record_inputs_and_outputs(run_copy):
    cfg, run = run_copy
    build, analysis = read_json(run.marker("build")), read_json(run.marker("analyze"))
    assert build["outputs"]["records"] == records_digest(run)
    assert set(build["inputs"]) == {"config", "model_revision", "dataset_sha256"}
    assert analysis["inputs"]["records"] == records_digest(run)
    assert set(analysis["inputs"]["sae"]) == {"0", "1"} and analysis["outputs"]["activations"]


def test_a_changed_dataset_is_caught_downstream(run_copy):
    cfg, run = run_copy
    dataset = json.loads(run.dataset_json.read_text())
    dataset["records"][0]["passed"] = not dataset["records"][0]["passed"]
    run.dataset_json.write_text(json.dumps(dataset))          # replaced behind the build stage's back
    with pytest.raises(StaleInputError, match="build stage's outputs changed"):
        analyze(cfg, progress=False)
    with pytest.raises(StaleInputError, match="build stage's outputs changed"):
        validate(cfg, progress=False)


def test_validation_refuses_an_analysis_of_another_dataset(run_copy):
    from conftest import replace_dataset

    cfg, run = run_copy
    dataset = json.loads(run.dataset_json.read_text())
    dataset["records"][0]["passed"] = not dataset["records"][0]["passed"]
    replace_dataset(run, dataset)                              # a new build, but the analysis is the old one
    with pytest.raises(StaleInputError, match="analyze stage was computed from another records"):
        validate(cfg, progress=False)


def test_analysis_with_another_prompt_template_than_the_build_is_refused(run_copy):
    cfg, run = run_copy
    other = resolve_config(base=cfg.to_dict(), overrides=["prompt.template={tests}\n{text}\n{initiator}"])
    with pytest.raises(StaleInputError, match="prompt.template"):
        analyze(other, progress=False)


def test_activations_of_another_model_are_not_reused(run_copy, tmp_path):
    """Same depth and width, other weights: the cached activations carry the old revision and are recaptured."""
    from pva_sae.default.tiny import make_tiny_model

    cfg, run = run_copy
    other = make_tiny_model(tmp_path / "other-model", seed=1)   # same architecture, other weights
    paths = AnalysisPaths.of(run)
    _, _, _, _, before = load_activations(paths.activations)
    data = cfg.to_dict()
    data["model"]["name"] = str(other)
    json_cfg = read_json(run.config)
    json_cfg["model"]["name"] = str(other)                    # as if the run had been built with the other model
    run.config.write_text(json.dumps(json_cfg))
    analyze(resolve_config(base=data), progress=False)
    _, _, _, _, after = load_activations(paths.activations)
    assert after["revision"] != before["revision"]


def test_general_frequency_cache_is_keyed_by_dtype_device_and_positions(tmp_path):
    sae = JumpReLUSAE(torch.eye(4), torch.eye(4), torch.zeros(4), torch.zeros(4), torch.zeros(4),
                      meta={"sha256": "x"})
    calls = []

    def capture(model, tokenizer, texts, *, layers, **kw):
        calls.append(len(texts))
        return torch.ones(len(texts), len(layers), 4)

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"word{i} other words here"}) + "\n" for i in range(5)))

    def run(dtype):
        loaded = SimpleNamespace(path_or_id="m", revision="r", dtype=dtype, device=torch.device("cpu"),
                                 model=None, tokenizer=None)
        return general_frequencies(loaded, {0: sae}, str(corpus), n_docs=5, seed=0, site="resid_post", batch_size=2,
                                   max_tokens=16, cache_dir=str(tmp_path / "cache"), progress=False, capture=capture)

    run(torch.float32)
    _, info = run(torch.float32)
    assert info["cached"] and len(calls) == 1
    _, info = run(torch.bfloat16)
    assert not info["cached"] and len(calls) == 2


def test_steering_condition_keys_cover_direction_model_prompt_and_data():
    from pva_sae.stages.steer import Arm, Steerer

    def key(overrides=(), vector=torch.ones(4), revision="r1", schedule="batches"):
        cfg = resolve_config(overrides=list(overrides))
        fake = SimpleNamespace(cfg=cfg, site="resid_post", loaded=SimpleNamespace(revision=revision),
                               generator=SimpleNamespace(backend="hf"), batch_size=8, schedule=schedule)
        arm = Arm("target", "correct", 1, 5, "L1:5")
        return Steerer.condition_key(fake, arm, vector, 0.5, (1, 2, 3))

    base = key()
    assert key() == base
    assert key(vector=torch.ones(4) * 2) != base                          # another direction (another SAE file)
    assert key(revision="r2") != base                                     # other model weights
    assert key(["prompt.initiator=# Code:"]) != base
    assert key(["data.source=/elsewhere/mbpp.jsonl"]) != base
    assert key(["sandbox.workers=7"]) == base                            # cannot change a label
    assert key(schedule="queue") != base                                  # continuous batching vs static batches


def test_a_saved_config_without_a_newer_field_compares_as_its_default():
    """A run made before a field existed is not refused when the field keeps its default, only when it differs."""
    from pva_sae.config import Config, record_fields_differing

    current = Config().to_dict()
    saved = Config().to_dict()
    del saved["generation"]["temperature"]
    assert record_fields_differing(saved, current) == []
    changed = Config().to_dict()
    changed["generation"]["max_new_tokens"] = current["generation"]["max_new_tokens"] + 1
    assert record_fields_differing(saved, changed) == ["generation.max_new_tokens"]
