"""Steering stage: control choice, alpha objective, statistics, batched steered generation, end to end."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from pva_sae.config import GenerationConfig, resolve_config
from pva_sae.rundir.paths import RunDir
from pva_sae.rundir.paths import SteeringPaths
from pva_sae.stages.steer import choose_alpha, experiment_stats, pick_controls, rates, selective, steer


def outcome(task_id, before, after, sim=1.0):
    return {"task_id": task_id, "baseline_passed": before, "steered_passed": after, "similarity": sim}


def test_controls_are_matched_near_zero_and_seeded():
    fc = np.array([0.50, 0.30, 0.31, 0.10, 0.30, 0.0, 0.32, 0.9])
    fi = np.array([0.10, 0.30, 0.30, 0.10, 0.50, 0.0, 0.31, 0.1])
    scores = {"f_correct": fc, "f_incorrect": fi}
    got = pick_controls(scores, target=0, n_correct=50, n_incorrect=50, n=3, max_separation=0.02, seed=0)
    # target fires on 30%: latents 1, 2, 6 fire on ~30% with |sep| <= 0.02; 4 and 7 separate, 5 never fires
    assert [c["latent"] for c in got] == [1, 2, 6]
    assert got == pick_controls(scores, 0, 50, 50, 3, 0.02, seed=0)
    with pytest.raises(ValueError, match="control latents"):
        pick_controls(scores, 0, 50, 50, 5, 0.02, seed=0)


def test_alpha_objective():
    rows = [{"alpha": 0.1, "correction": 0.05, "corruption": 0.0},
            {"alpha": 0.3, "correction": 0.20, "corruption": 0.05},
            {"alpha": 1.0, "correction": 0.40, "corruption": 0.30},
            {"alpha": 2.0, "correction": 0.20, "corruption": 0.05}]
    best, met = choose_alpha(rows, "correct", max_corruption=0.1)
    assert best["alpha"] == 0.3 and met                     # ties at 0.20 go to the smaller alpha
    best, met = choose_alpha(rows, "correct", max_corruption=0.0)
    assert best["alpha"] == 0.1 and met
    best, met = choose_alpha([dict(r, corruption=0.5) for r in rows], "correct", max_corruption=0.1)
    assert best["alpha"] == 0.1 and not met
    best, _ = choose_alpha(rows, "incorrect", 0.1)
    assert best["alpha"] == 1.0


def test_experiment_statistics_by_hand():
    target = [outcome(i, False, i < 6) for i in range(20)] + [outcome(100 + i, True, i >= 2) for i in range(10)]
    controls = {7: [outcome(i, False, i < 1) for i in range(20)], 8: [outcome(i, False, False) for i in range(20)]}
    e = experiment_stats(target, controls, baseline_passed=False, success_passed=True)
    assert (e["successes"], e["n"], e["control_successes"], e["control_n"]) == (6, 20, 1, 40)
    assert e["binomial_p_vs_control"] == pytest.approx(stats.binomtest(6, 20, 1 / 40, alternative="greater").pvalue)
    assert e["fisher_p"] == pytest.approx(stats.fisher_exact([[6, 14], [1, 39]], alternative="greater").pvalue)
    # paired table over the run: 6 fail->pass, 2 pass->fail
    assert e["mcnemar_pairs"] == {"changed_as_tested": 6, "changed_the_other_way": 2}
    assert e["mcnemar_p"] == pytest.approx(stats.binomtest(6, 8, 0.5).pvalue)
    assert e["wilson"][0] < 0.3 < e["wilson"][1]


def test_selective_keeps_unflagged_baselines():
    run = [outcome(1, False, True), outcome(2, False, True), outcome(3, True, False), outcome(4, True, True)]
    out = selective(run, flagged={1, 4})
    assert out["selective"]["correction"] == 0.5 and out["selective"]["corruption"] == 0.0
    assert out["constant"]["correction"] == 1.0 and out["constant"]["corruption"] == 0.5
    assert rates(run) == {"n_incorrect": 2, "corrected": 2, "correction": 1.0, "n_correct": 2, "broken": 1,
                          "corruption": 0.5}


def test_batched_steered_generation(tiny_loaded):
    """alpha = 0 under generate is identical to no hook; a large alpha changes the batch's outputs."""
    from pva_sae.model.generation import Generator
    from pva_sae.model.hooks import SteeringHook, assert_fired_once

    gen = Generator(tiny_loaded, GenerationConfig(max_new_tokens=6, stop_strings=()))
    batch = [(1, 0, "def add(a, b):"), (2, 0, "x = 1\nwhile"), (3, 0, "import os\n# list files in a dir")]
    plain = [s.raw_completion for s in gen.generate_batch(batch, 0)]
    d = torch.randn(tiny_loaded.d_model)
    with SteeringHook(tiny_loaded.model, 1, d, 0.0) as hook:
        zero = [s.raw_completion for s in gen.generate_batch(batch, 0)]
    assert zero == plain and hook.applications == 0 and hook.calls[1] > 0
    with SteeringHook(tiny_loaded.model, 1, d / d.norm(), 500.0) as hook:
        steered = [s.raw_completion for s in gen.generate_batch(batch, 0)]
    assert steered != plain
    assert hook.applications == hook.calls[1]                 # positions='all': every forward call
    with SteeringHook(tiny_loaded.model, 1, d, 1.0) as hook:
        tiny_loaded.model(**tiny_loaded.tokenizer(["a b c"], return_tensors="pt"))
    assert_fired_once(hook, 1)


@pytest.fixture(scope="module")
def steered(analysed, tmp_path_factory):
    from test_validate import copy_run

    from pva_sae.stages.validate import validate

    dest = tmp_path_factory.mktemp("steer") / "run"
    cfg = copy_run(analysed, dest)
    validate(cfg, progress=False)
    data = cfg.to_dict()
    cfg = resolve_config(base=data, overrides=[
        "steering.alpha_grid=[0.5, 4.0]", "steering.refine_steps=1", "steering.n_controls=2",
        "steering.control_max_separation=1.0", "steering.max_tasks=8", "steering.control_max_tasks=4"])
    return cfg, RunDir.at(dest), steer(cfg, progress=False)


def test_steering_end_to_end(steered):
    cfg, run, res = steered
    paths = SteeringPaths.of(run)
    assert run.is_done("steer") and paths.tasks.is_file()
    assert json.loads(paths.results.read_text())["experiments"] == res["experiments"]
    for direction in ("correct", "incorrect"):
        tuned = res["tuning"][direction]
        assert [r["alpha"] for r in tuned["table"]][:1] == [0.5] and len(tuned["table"]) == 3   # 2 + 1 refined
        assert res["targets"][direction]["alpha_abs"] == pytest.approx(
            res["targets"][direction]["alpha"] * res["targets"][direction]["mean_residual_norm"])
        assert len(res["controls"][direction]) == 2
        assert res["targets"][direction]["latent"] not in [c["latent"] for c in res["controls"][direction]]
    corr = res["experiments"]["correction"]
    n_val = len(set(json.loads(run.splits.read_text())["splits"]["validation"])
                & {r["task_id"] for r in json.loads(run.dataset_json.read_text())["records"]})
    assert corr["n"] + res["experiments"]["preservation_failure"]["n"] == res["tasks"]["validation"] == min(8, n_val)
    assert all(c["n"] <= 4 for c in corr["per_control"])
    assert res["noise_floor"]["n"] == res["tasks"]["validation"]
    for name in ("rates_vs_alpha.png", "target_vs_controls.png", "selective.png"):
        assert (paths.plots / name).stat().st_size > 1000
    import pyarrow.parquet as pq

    rows = pq.read_table(paths.tasks).to_pylist()
    assert {"baseline_program", "program", "baseline_passed", "steered_passed", "similarity"} <= set(rows[0])
    assert {r["role"] for r in rows} == {"target", "control", "rerun"}


def test_steering_resumes_from_cached_conditions(steered):
    cfg, run, res = steered
    again = steer(cfg, progress=False)
    assert again["tasks"]["generated"] == 0
    assert again["experiments"] == res["experiments"]


def test_report_steering_section(steered):
    from pva_sae.stages.report import write_report

    cfg, run, res = steered
    html_path, md_path = write_report(run.root)
    md = md_path.read_text()
    assert "## Steering" in md and "The steering stage has not run" not in md
    e = res["experiments"]["corruption"]
    assert f"| corruption | incorrect | {e['successes']}/{e['n']} |" in md


def test_missing_stages_are_named_and_nothing_is_written(tmp_path):
    cfg = resolve_config(overrides=[f"output.run_dir={tmp_path / 'nothing'}"])
    with pytest.raises(FileNotFoundError, match="no finished build stage"):
        steer(cfg, progress=False)
    assert not (tmp_path / "nothing").exists()
