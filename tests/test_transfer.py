"""Transfer (``validation.transfer_from``): a base run's choices and alphas applied frozen to another run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import replace_dataset
from test_steer import SMALL_STEER
from test_validate import copy_run

from pva_sae.cli import _overrides, make_parser
from pva_sae.config import resolve_config
from pva_sae.errors import InputError, MissingInputError
from pva_sae.rundir.atomic import atomic_write_json, read_json
from pva_sae.rundir.paths import AnalysisPaths, RunDir, SteeringPaths, ValidationPaths
from pva_sae.stages import steer as steer_stage
from pva_sae.stages import validate as validate_stage
from pva_sae.stages.analyze import analyze
from pva_sae.stats.predictors import Features, SealedLabels, fit_predictors
from pva_sae.stats.transfer import compare_metrics, frozen_predictors, pass_rates, weights_table

FAST = ["validation.temperatures=[0.0]"]
FROZEN_KEYS = ("name", "direction", "layer", "latent", "threshold", "label")


def _refuse(*_, **__):
    raise AssertionError("a transferring run must not select, fit or tune anything")


@pytest.fixture(scope="module")
def base_run(analysed, tmp_path_factory):
    dest = tmp_path_factory.mktemp("transfer_base") / "run"
    cfg = resolve_config(base=copy_run(analysed, dest).to_dict(), overrides=FAST)
    validate_stage.validate(cfg, progress=False)
    cfg = resolve_config(base=cfg.to_dict(), overrides=SMALL_STEER)
    steer_stage.steer(cfg, progress=False)
    return cfg, RunDir.at(dest)


def _other_run(analysed, dest):
    """A copy of the analysed run with other labels (as another model would get), analysed again."""
    cfg = resolve_config(base=copy_run(analysed, dest).to_dict(), overrides=FAST)
    run = RunDir.at(dest)
    dataset = json.loads(run.dataset_json.read_text())
    for record in dataset["records"]:
        record["passed"] = record["task_id"] % 2 == 0
    replace_dataset(run, dataset)
    analyze(cfg, progress=False)
    return cfg, run


@pytest.fixture(scope="module")
def transferred(analysed, base_run, tmp_path_factory):
    _, base = base_run
    cfg, run = _other_run(analysed, tmp_path_factory.mktemp("transfer_it") / "run")
    cfg = resolve_config(base=cfg.to_dict(), overrides=SMALL_STEER + [f"validation.transfer_from={base.root}"])
    with pytest.MonkeyPatch.context() as mp:
        for module, name in ((validate_stage, "select_latents"), (validate_stage, "fit_predictors"),
                             (steer_stage, "select_latents"), (steer_stage, "AlphaSearch")):
            mp.setattr(module, name, _refuse)
        validation = validate_stage.validate(cfg, progress=False)
        steering = steer_stage.steer(cfg, progress=False)
    return cfg, run, validation, steering


def test_the_base_choices_are_reused_frozen(base_run, transferred):
    _, base = base_run
    _, run, _, _ = transferred
    before, after = read_json(ValidationPaths.of(base).choices), read_json(ValidationPaths.of(run).choices)
    assert after["selection"] == before["selection"] and after["steering_selection"] == before["steering_selection"]
    assert [{k: p.get(k) for k in FROZEN_KEYS} for p in after["predictors"]] == \
           [{k: p.get(k) for k in FROZEN_KEYS} for p in before["predictors"]]
    assert read_json(ValidationPaths.of(run).weights) == read_json(ValidationPaths.of(base).weights)
    assert before["label_reads"] == ["sae", "tuning"] and after["label_reads"] == []  # nothing was fitted here
    assert after["transfer"]["base_run"] == str(base.root)
    # a selection on this run's own labels would have chosen otherwise: the frozen choice is not this run's
    own = validate_stage.select_latents(validate_stage.load_ranked(AnalysisPaths.of(run)), "t")
    assert own != after["selection"]


def test_transfer_results_name_pass_rates_and_frozen_metrics(base_run, transferred):
    _, base = base_run
    _, run, validation, _ = transferred
    t = validation["transfer"]
    assert t["base_run"] == str(base.root) and t["sae_release"] == "local"
    rates = t["pass_rate"]["validation"]
    n = validation["splits"]["validation"]["n"]
    assert rates["n_shared"] == rates["this"]["n"] == n
    assert rates["this"]["successes"] == validation["splits"]["validation"]["n_correct"]
    every = t["pass_rate"]["all"]  # planted: task_id % 3 == 0 passes there, task_id % 2 == 0 here (30 tasks)
    assert (every["base"]["successes"], every["this"]["successes"], every["n_shared"]) == (10, 15, 30)
    assert len(rates["this"]["ci"]) == 2 and rates["change"]["n"] == n
    rows = {(r["direction"], r["name"]): r for r in t["predictors"]}
    for direction in ("correct", "incorrect"):
        latent = rows[(direction, "latent")]
        for metric in ("auroc", "f1"):
            assert {"estimate", "low", "high"} <= set(latent[metric]["this"])
        assert latent["auroc"]["base"] != latent["auroc"]["this"]
    saved = read_json(ValidationPaths.of(run).results)
    assert saved["transfer"]["predictors"] == t["predictors"]


def test_steering_reuses_the_base_alphas_against_controls(base_run, transferred):
    _, base = base_run
    _, _, _, steering = transferred
    base_steering = read_json(SteeringPaths.of(base).results)
    for direction in ("correct", "incorrect"):
        here, there = steering["directions"][direction], base_steering["directions"][direction]
        assert here["tuning"]["table"] == [] and "transferred from" in here["tuning"]["objective"]
        assert here["target"]["alpha_abs"] == pytest.approx(there["target"]["alpha_abs"])
        assert [here["target"][k] for k in ("layer", "latent")] == [there["target"][k] for k in ("layer", "latent")]
        assert len(here["controls"]) == 4
    t = steering["transfer"]
    assert set(t["experiments"]) == {"correction", "preservation_failure", "corruption"}
    for name, e in t["experiments"].items():
        assert e["base"]["rate"] == base_steering["experiments"][name]["rate"]
        assert e["this"]["rate"] == steering["experiments"][name]["rate"] and e["this"]["n_controls"] == 4
        assert "rank_p" in e["this"] and len(e["this"]["paired_difference"]["ci"]) == 2
    assert t["alphas"]["correct"]["alpha_abs"] == base_steering["directions"]["correct"]["target"]["alpha_abs"]


def test_the_report_has_a_transfer_section_beside_the_base_run(base_run, transferred):
    from pva_sae.stages.report import write_report

    _, base = base_run
    _, run, _, _ = transferred
    _, md = write_report(run.root)
    text = md.read_text()
    assert "## Transfer from another run" in text and str(base.root) in text
    assert "AUROC: base -> this run" in text and "controls' mean" in text
    assert text.index("Transferred from") < text.index("## Transfer from another run")   # the summary box names it
    _, base_md = write_report(base.root)
    assert "Transfer from another run" not in base_md.read_text()


@pytest.mark.slow
def test_a_missing_or_incompatible_base_is_refused(analysed, base_run, tmp_path):
    _, base = base_run
    cfg, run = _other_run(analysed, tmp_path / "it")

    def validate_from(path):
        c = resolve_config(base=cfg.to_dict(), overrides=[f"validation.transfer_from={path}"])
        return validate_stage.validate(c, progress=False)

    with pytest.raises(MissingInputError, match="is not a run with a finished validation stage"):
        validate_from(tmp_path / "nowhere")
    with pytest.raises(InputError, match="is this run directory"):
        validate_from(run.root)
    other = tmp_path / "other_sae"
    shutil.copytree(base.root, other)
    summary = read_json(AnalysisPaths.of(RunDir.at(other)).summary)
    atomic_write_json(AnalysisPaths.of(RunDir.at(other)).summary, {**summary, "release": "gemma-scope-2b-pt-res"})
    with pytest.raises(InputError, match="SAE release 'gemma-scope-2b-pt-res' there, 'local' here"):
        validate_from(other)
    layers = tmp_path / "other_layers"
    shutil.copytree(base.root, layers)
    choices = read_json(ValidationPaths.of(RunDir.at(layers)).choices)
    choices["selection"]["correct"] = {**choices["selection"]["correct"], "layer": 7}
    atomic_write_json(ValidationPaths.of(RunDir.at(layers)).choices, choices)
    with pytest.raises(InputError, match=r"layers \[7\] are not analysed here"):
        validate_from(layers)
    unsteered = tmp_path / "unsteered"
    shutil.copytree(base.root, unsteered)
    RunDir.at(unsteered).clear_done("steer")
    validate_from(unsteered)  # validation needs no steering stage; the steering stage does
    with pytest.raises(MissingInputError, match="no finished steering stage"):
        steer_stage.steer(resolve_config(base=read_json(ValidationPaths.of(run).config), overrides=SMALL_STEER),
                          progress=False)
    assert not run.is_done("steer")


def test_frozen_predictors_score_as_the_fitted_ones():
    rng = np.random.default_rng(0)
    ids = list(range(60))
    feats = Features(rng.normal(size=(60, 2, 8)).astype(np.float32), ids, [0, 1])
    feats.latent_acts[(1, 3)] = rng.random(60).astype(np.float32)
    feats.scalars["prompt tokens"] = {t: float(t % 7) for t in ids}
    labels = {t: bool(t % 3 == 0) for t in ids}
    split = {t: "sae" if t < 30 else "tuning" if t < 40 else "validation" for t in ids}
    row = {"layer": 1, "latent": 3, "t_correct": 1.0, "f_correct": 0.5, "f_incorrect": 0.2}
    fitted = fit_predictors({"correct": row, "incorrect": row}, feats, SealedLabels(labels, split), ids[:30],
                            ids[30:40], folds=2, n_cs=2, seed=5)
    rows = json.loads(json.dumps([p.as_dict() for p in fitted]))
    frozen = frozen_predictors(rows, json.loads(json.dumps(weights_table(fitted))), seed=5, d_model=8)
    assert [p.label for p in frozen] == [p.label for p in fitted]
    for a, b in zip(fitted, frozen):
        assert b.threshold == a.threshold
        np.testing.assert_allclose(b.score(feats, ids[40:]), a.score(feats, ids[40:]), rtol=1e-12)
    with pytest.raises(ValueError, match="this run's residual has 16 dimensions"):
        frozen_predictors(rows, weights_table(fitted), seed=5, d_model=16)


def test_pass_rates_and_metric_comparison_are_paired():
    base = {t: t < 3 for t in range(10)}
    this = {t: t < 5 for t in range(10)}
    out = pass_rates(base, this, {"validation": list(range(10))}, 0.95, 200, 0)
    v = out["validation"]
    assert (v["base"]["successes"], v["this"]["successes"], v["n_shared"]) == (3, 5, 10)
    assert v["change"]["estimate"] == pytest.approx(0.2) and v["change"]["corrections"] == 2
    assert v["base"]["ci"][0] < 0.3 < v["base"]["ci"][1]
    disjoint = pass_rates({1: True, 2: False}, {3: True}, {"validation": [1, 2, 3]}, 0.95, 200, 0)["validation"]
    assert (disjoint["base"]["estimate"], disjoint["this"]["estimate"], disjoint["change"]) == (0.5, 1.0, None)
    metric = {"estimate": 0.7, "low": 0.6, "high": 0.8}
    rows = compare_metrics({"correct": [{"direction": "correct", "label": "x", "name": "latent",
                                          "metrics": {"auroc": metric}}]},
                           {"correct": [{"direction": "correct", "label": "x", "name": "latent",
                                         "metrics": {"auroc": {**metric, "estimate": 0.5}}},
                                        {"direction": "correct", "label": "new", "name": "probe", "metrics": {}}]},
                           metrics=("auroc",))
    assert rows == [{"direction": "correct", "label": "x", "name": "latent",
                     "auroc": {"base": metric, "this": {**metric, "estimate": 0.5}}}]


def test_the_cli_option_sets_the_field():
    for command in ("validate", "steer", "run"):
        args = make_parser().parse_args([command, "--transfer-from", "runs/base", "--run-dir", "runs/it"])
        assert "validation.transfer_from=runs/base" in _overrides(args)
    args = make_parser().parse_args(["build", "--dataset", "humaneval"])
    assert "data.dataset=humaneval" in _overrides(args)
