"""Steering stage: control choice, alpha objective, statistics, batched steered generation, end to end."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from pva_sae.config import ConfigError, GenerationConfig, resolve_config
from pva_sae.rundir.paths import RunDir, SteeringPaths
from pva_sae.stages.steer import (
    AlphaSearch,
    Arm,
    add_holm,
    choose_alpha,
    experiment,
    flips,
    pick_control_latents,
    random_direction,
    rates,
    search_alphas,
    selective,
    steer,
)


def _b(passed):
    return {t: {"task_id": t, "passed": bool(v), "program": f"p{t}{v}"} for t, v in enumerate(passed)}


def test_control_latents_are_matched_near_zero_filtered_and_seeded():
    fc = np.array([0.50, 0.30, 0.31, 0.10, 0.30, 0.0, 0.32, 0.9, 0.30])
    fi = np.array([0.10, 0.30, 0.30, 0.10, 0.50, 0.0, 0.31, 0.1, 0.30])
    general = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5])   # latent 8 fails the general filter
    scores = {"f_correct": fc, "f_incorrect": fi, "general_frequency": general}
    got = pick_control_latents(scores, target=0, n_correct=50, n_incorrect=50, n=3, max_separation=0.02,
                               max_general=0.02, seed=0)
    # target fires on 30%: latents 1, 2, 6 fire on ~30% with |sep| <= 0.02; 4 and 7 separate, 5 never fires
    assert [c["latent"] for c in got] == [1, 2, 6]
    assert got == pick_control_latents(scores, 0, 50, 50, 3, 0.02, 0.02, seed=0)
    with pytest.raises(ValueError, match="control latents"):
        pick_control_latents(scores, 0, 50, 50, 5, 0.02, 0.02, seed=0)     # 1, 2, 3, 6 only
    assert len(pick_control_latents(scores, 0, 50, 50, 5, 0.02, 1.0, seed=0)) == 5   # 8 passes a looser filter


def test_random_directions_are_seeded_with_the_target_norm():
    a, b = random_direction(16, 3.0, seed=1), random_direction(16, 3.0, seed=1)
    assert torch.equal(a, b) and float(a.norm()) == pytest.approx(3.0)
    assert not torch.equal(a, random_direction(16, 3.0, seed=2))


def test_alpha_objective_is_specificity():
    def row(alpha, t_fix, t_break, c_fix):
        return {"alpha": alpha, "target": {"correction": t_fix, "corruption": t_break},
                "specificity": t_fix - c_fix}
    rows = [row(0.1, 0.05, 0.0, 0.0), row(0.3, 0.20, 0.05, 0.0), row(1.0, 0.60, 0.05, 0.55), row(2.0, 0.20, 0.05, 0.0)]
    best, met = choose_alpha(rows, "correct", max_corruption=0.1)
    assert best["alpha"] == 0.3 and met           # 1.0 fixes most but so do the controls; ties -> smaller alpha
    best, met = choose_alpha(rows, "correct", max_corruption=0.0)
    assert best["alpha"] == 0.1 and met
    best, met = choose_alpha([row(0.5, 0.1, 0.5, 0.0)], "correct", max_corruption=0.1)
    assert best["alpha"] == 0.5 and not met


def test_flips_rates_and_selective_steering():
    base, steered = _b([0, 0, 1, 1]), _b([1, 1, 0, 1])
    ids = [0, 1, 2, 3]
    assert flips(base, steered, ids, False).tolist() == [True, True]
    assert rates(base, steered, ids) == {"correction": 1.0, "corruption": 0.5, "n_incorrect": 2, "n_correct": 2}
    cfg = resolve_config(overrides=["steering.bootstrap_resamples=200"])
    out = selective(base, steered, ids, flagged={0, 3}, cfg=cfg)
    assert out["selective"]["correction"] == 0.5 and out["selective"]["corruption"] == 0.0
    assert out["constant"]["correction"] == 1.0 and out["constant"]["corruption"] == 0.5
    assert out["selective"]["net_effect"]["estimate"] == pytest.approx(0.25)
    assert out["constant"]["net_effect"]["estimate"] == pytest.approx(0.25)   # +2 -1 over 4
    assert not out["flags_every_task"]


def test_experiment_pairs_target_and_controls_on_the_same_tasks():
    cfg = resolve_config(overrides=["steering.n_permutations=200", "steering.bootstrap_resamples=200"])
    base = _b([0] * 10 + [1] * 10)
    target = _b([1] * 8 + [0] * 2 + [1] * 10)                # fixes 8 of 10 incorrect tasks, breaks none
    controls = [(Arm("latent" if k % 2 else "random", "correct", 0, None, f"c{k}"), _b([0] * 10 + [1] * 10))
                for k in range(19)]
    ids = list(range(20))
    e = experiment(base, target, controls, ids, baseline_passed=False, cfg=cfg)
    assert e["n"] == 10 and e["rate"]["successes"] == 8 and e["n_controls"] == 19
    assert e["rank_p"]["p"] == pytest.approx(1 / 20)         # beats all 19 controls
    assert set(e["rank_p"]["by_kind"]) == {"latent", "random"}
    assert e["permutation_p"]["p"] < 0.05 and e["paired_difference"]["estimate"] == pytest.approx(0.8)
    assert e["mcnemar_p"]["p"] == pytest.approx(stats.binomtest(8, 8, 0.5).pvalue)
    assert all(c["rate"] == 0.0 and c["mcnemar_p"] == 1.0 for c in e["controls"])
    experiments = {"a": e, "b": experiment(base, target, controls, ids, baseline_passed=True, cfg=cfg)}
    add_holm(experiments)
    assert experiments["a"]["holm_p"]["rank_p"] == pytest.approx(min(1.0, 2 * e["rank_p"]["p"]))


class _FakeSteerer:
    """run_many's calls recorded; an arm's outcome on a task is a fixed function of (arm, alpha, task)."""

    def __init__(self, cfg):
        self.cfg, self.calls = cfg, []

    def run_many(self, conditions):
        self.calls.append([(arm.label, round(alpha, 6)) for arm, _, alpha, _ in conditions])
        return [{t: {"task_id": t, "passed": (hash((arm.label, round(alpha, 6), t)) % 3 == 0) if arm.latent is not None
                     or arm.kind == "random" else t % 2 == 0} for t in ids} for arm, _, alpha, ids in conditions]


def test_alpha_searches_of_all_directions_share_each_step_and_equal_searching_alone():
    """The directions' alpha searches run step by step in shared calls (the baselines in the first): one call per
    step (the grid, then each refinement), and each direction's table and choice equal its search run alone."""
    cfg = resolve_config(None, ["steering.alpha_grid=[0.5, 1.0, 4.0]", "steering.refine_steps=2"])
    ids = list(range(12))
    base = (Arm("baseline", None, None, None, "alpha=0"), None, 0.0, ids)

    def searches():
        out = {}
        for d, layer in (("correct", 3), ("incorrect", 1)):
            target = Arm("target", d, layer, 7, f"L{layer}:7")
            controls = [(Arm("latent", d, layer, 9, f"L{layer}:9"), None), (Arm("random", d, layer, None, f"r{d}"), None)]
            out[d] = AlphaSearch(cfg, target, None, controls, 2.0, ids, speculate)
        return out

    speculate = False
    plain = _FakeSteerer(cfg)
    (head,), without_speculation = search_alphas(plain, searches(), [base])
    assert len(plain.calls) == 1 + cfg.steering.refine_steps and len(plain.calls[0]) == 1 + 2 * 3 * 3
    speculate = True

    shared = _FakeSteerer(cfg)
    (head,), results = search_alphas(shared, searches(), [base])
    assert len(shared.calls) == 1 + cfg.steering.refine_steps
    # the first call: the baseline, 2 directions x 3 grid alphas x 3 arms, then (speculation) 2 x 2 midpoints x 3
    midpoints = [float(np.sqrt(0.5 * 1.0)), float(np.sqrt(1.0 * 4.0))]
    assert shared.calls[0][0] == ("alpha=0", 0.0) and len(shared.calls[0]) == 1 + 2 * 3 * 3 + 2 * 2 * 3
    assert {a for _, a in shared.calls[0][19:]} == {round(2.0 * m, 6) for m in midpoints}
    assert head == {t: {"task_id": t, "passed": t % 2 == 0} for t in ids}
    for d, search in searches().items():
        alone = _FakeSteerer(cfg)
        while conditions := search.conditions():
            search.record(alone.run_many(conditions), head)
        without = search.result()
        spec = results[d].pop("speculative")
        assert without.pop("speculative") == {"generated": [], "unused": []}
        assert without == results[d]                                # speculation changes no choice and no row
        assert len(results[d]["table"]) > 3                        # the refinements added alphas
        # every first-refinement alpha was generated ahead; the unused midpoints are in no row of the table
        first_refinement = [r["alpha"] for r in results[d]["table"] if r["alpha"] not in (0.5, 1.0, 4.0)]
        assert spec["generated"] == midpoints and set(spec["unused"]).isdisjoint(first_refinement)
        assert set(spec["generated"]) - set(spec["unused"]) <= set(first_refinement)
        assert {k: v for k, v in without_speculation[d].items() if k != "speculative"} == results[d]
    cfg0 = resolve_config(None, ["steering.alpha_grid=[0.5, 1.0, 4.0]", "steering.refine_steps=0"])
    grid_only = _FakeSteerer(cfg0)
    target = Arm("target", "correct", 3, 7, "L3:7")
    _, results = search_alphas(grid_only, {"correct": AlphaSearch(cfg0, target, None, [], 2.0, ids)}, [base])
    assert len(grid_only.calls) == 1 and [r["alpha"] for r in results["correct"]["table"]] == [0.5, 1.0, 4.0]
    assert [r["alpha_abs"] for r in results["correct"]["table"]] == [1.0, 2.0, 8.0]


def test_speculation_is_resolved_from_the_setting_and_whether_labelling_runs_beside_generation():
    from types import SimpleNamespace

    from pva_sae.stages.steer import speculates

    for setting, overlapped, want in (("auto", True, True), ("auto", False, False), ("on", False, True),
                                      ("off", True, False)):
        cfg = resolve_config(None, [f"steering.speculate={setting}"])
        assert speculates(cfg, SimpleNamespace(labeller=SimpleNamespace(overlapped=overlapped))) is want
    with pytest.raises(ConfigError, match="steering.speculate must be one of auto, on, off"):
        resolve_config(None, ["steering.speculate=yes"])


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


SMALL_STEER = ["steering.alpha_grid=[0.5, 4.0]", "steering.refine_steps=1", "steering.n_controls=4",
               "steering.tuning_controls=2", "steering.control_max_separation=1.0", "steering.max_tasks=8",
               "steering.n_permutations=200", "steering.bootstrap_resamples=200"]


def _steer_copy(analysed, tmp_path_factory, name, extra=()):
    from test_validate import copy_run

    from pva_sae.stages.validate import validate

    dest = tmp_path_factory.mktemp(name) / "run"
    cfg = copy_run(analysed, dest)
    validate(cfg, progress=False)
    cfg = resolve_config(base=cfg.to_dict(), overrides=SMALL_STEER + list(extra))
    return cfg, RunDir.at(dest), steer(cfg, progress=False)


@pytest.fixture(scope="module")
def steered(analysed, tmp_path_factory):
    return _steer_copy(analysed, tmp_path_factory, "steer")


def test_steering_end_to_end(steered):
    cfg, run, res = steered
    paths = SteeringPaths.of(run)
    assert run.is_done("steer") and paths.tasks.is_file()
    assert json.loads(paths.results.read_text())["experiments"] == res["experiments"]
    n_val = res["tasks"]["validation"]
    for direction in ("correct", "incorrect"):
        d = res["directions"][direction]
        assert [r["alpha"] for r in d["tuning"]["table"]][:1] == [0.5] and len(d["tuning"]["table"]) == 3
        assert all(len(r["controls"]) == 2 for r in d["tuning"]["table"])
        assert {r["kind"] for r in d["tuning"]["table"][0]["controls"]} == {"latent", "random"}
        t = d["target"]
        assert t["alpha_abs"] == pytest.approx(t["alpha"] * t["mean_residual_norm"])
        assert t["label"] == f"L{t['layer']}:{t['latent']}"
        assert [c["kind"] for c in d["controls"]] == ["latent", "latent", "random", "random"]
        assert t["latent"] not in [c["latent"] for c in d["controls"]]
        assert d["net_effect"]["target"]["n"] == n_val and len(d["net_effect"]["controls"]) == 4
    for name, e in res["experiments"].items():
        assert e["n_controls"] == 4 and {c["kind"] for c in e["controls"]} == {"latent", "random"}
        assert all(len(c["ci"]) == 2 for c in e["controls"])
        for test in ("rank_p", "permutation_p", "prediction_p", "sign_test_p", "mcnemar_p"):
            assert "null" in e[test] and test in e["holm_p"]
    # every arm runs on every validation task, so the two experiments of one direction partition them
    assert res["experiments"]["correction"]["n"] + res["experiments"]["preservation_failure"]["n"] == n_val
    assert res["noise_floor"]["n"] == n_val
    for name in ("rates_vs_alpha.png", "target_vs_controls.png", "net_effects.png"):
        assert (paths.plots / name).stat().st_size > 1000
    import pyarrow.parquet as pq

    rows = pq.read_table(paths.tasks).to_pylist()
    assert {"baseline_program", "program", "baseline_passed", "steered_passed", "similarity"} <= set(rows[0])
    assert {r["kind"] for r in rows} == {"target", "latent", "random"}
    assert len(rows) == 2 * 5 * n_val


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
    assert f"| corruption | {e['target']} | {e['rate']['successes']}/{e['rate']['n']} |" in md


@pytest.mark.slow
def test_a_random_target_is_not_significant_against_random_controls(analysed, tmp_path_factory):
    """steering.target=random: the target is exchangeable with the random controls, so no Holm-adjusted p
    against them may reach 0.05 (with 2 random controls the smallest possible rank p is 1/3)."""
    cfg, run, res = _steer_copy(analysed, tmp_path_factory, "steer-random", ["steering.target=random"])
    for e in res["experiments"].values():
        assert e["target"] == "random-target"
        assert e["n"] == 0 or e["rank_p"]["by_kind"]["random"] >= 1 / 3
        assert all(p is None or p >= 0.05 for p in e["holm_p"].values())


@pytest.mark.slow
def test_an_unembedding_target_runs(analysed, tmp_path_factory, tiny_loaded):
    token = tiny_loaded.tokenizer.eos_token
    cfg, run, res = _steer_copy(analysed, tmp_path_factory, "steer-unembed", [f"steering.target=unembed:{token}"])
    assert res["directions"]["correct"]["target"]["label"] == f"unembed:{token}"
    with pytest.raises(ValueError, match="not a token"):
        _steer_copy(analysed, tmp_path_factory, "steer-unembed-bad", ["steering.target=unembed:no-such-token"])


def test_missing_stages_are_named_and_nothing_is_written(tmp_path):
    cfg = resolve_config(overrides=[f"output.run_dir={tmp_path / 'nothing'}"])
    with pytest.raises(FileNotFoundError, match="no finished build stage"):
        steer(cfg, progress=False)
    assert not (tmp_path / "nothing").exists()


def test_later_stages_take_the_run_directory_as_the_source_of_truth(steered, capsys):
    """No --model: the run's own config is used (nothing regenerated); an upstream setting is refused by name."""
    from pva_sae.cli import EXIT_USER_ERROR, main

    cfg, run, res = steered
    assert main(["steer", "--quiet", "--run-dir", str(run.root)]) == 0
    out = capsys.readouterr().out
    assert "correction (" in out and "net effect of" in out
    assert json.loads(SteeringPaths.of(run).results.read_text())["tasks"]["generated"] == 0
    assert main(["validate", "--quiet", "--run-dir", str(run.root), "--set", "generation.max_new_tokens=16"]) \
        == EXIT_USER_ERROR
    assert "generation.max_new_tokens" in capsys.readouterr().err
    assert main(["report", "--run-dir", str(run.root / "no-such-run")]) == EXIT_USER_ERROR
    assert not (run.root / "no-such-run").exists()


def test_steering_progress_counts_conditions(steered, capsys):
    """The stage names itself, then counts conditions done / planned (cached ones included) with an ETA."""
    cfg, run, res = steered
    steer(cfg, progress=True)
    err = capsys.readouterr().err
    assert f"[steer] 2 directions x (target + 4 controls) on {res['tasks']['validation']} validation tasks" in err
    n_alphas = len(res["directions"]["correct"]["tuning"]["table"])
    done = 2 + 2 * (n_alphas * (1 + 2) + 1 + 4)        # baselines, tuning grid, target and controls
    assert f"steer {done}/{done} conditions" in err
    steer(cfg, progress=False)
    assert "conditions" not in capsys.readouterr().err


@pytest.mark.slow
def test_overlapped_steering_gives_identical_results(steered, analysed, tmp_path_factory):
    """Labelling on the background thread while the next condition generates changes no outcome (it turns on
    speculation, which generates refinement candidates ahead and changes no row of the alpha search)."""
    _, run, res = steered
    _, other, again = _steer_copy(analysed, tmp_path_factory, "steer-overlap", ["generation.overlap=on"])

    def plain(directions):
        return {d: {**r, "tuning": {k: v for k, v in r["tuning"].items() if k != "speculative"}}
                for d, r in directions.items()}

    assert again["experiments"] == res["experiments"] and plain(again["directions"]) == plain(res["directions"])
    assert [r["tuning"]["speculative"]["generated"] for r in res["directions"].values()] == [[], []]
    assert all(r["tuning"]["speculative"]["generated"] for r in again["directions"].values())
    import pyarrow.parquet as pq

    assert (pq.read_table(SteeringPaths.of(other).tasks).to_pylist()
            == pq.read_table(SteeringPaths.of(run).tasks).to_pylist())


# --------------------------------------------------------------------------- continuous batching (fast backend)

# The embedded default model writes programs (the run's random model writes none), so outcomes compare code.
QUEUE_MODEL = ["model.name=pva-tiny", "generation.backend=fast", "generation.max_new_tokens=96"]


def _fast_copy(analysed, tmp_path_factory, name):
    from test_validate import copy_run

    dest = tmp_path_factory.mktemp(name) / "run"
    cfg = copy_run(analysed, dest)
    return resolve_config(base=cfg.to_dict(), overrides=SMALL_STEER + QUEUE_MODEL), RunDir.at(dest)


def _conditions(run, d_model, n_tasks=10):
    """The baseline, two steered arms and an alpha = 0 arm at layer 1, and an arm at layer 3 (its own queue)."""
    from pva_sae.rundir.artifacts import read_splits
    from pva_sae.stages.steer import BASELINE

    ids = sorted(t for ids in read_splits(run).values() for t in ids)[:n_tasks]
    v = [random_direction(d_model, 1.0, seed) for seed in range(3)]
    return [(BASELINE, None, 0.0, ids),
            (Arm("target", "correct", 1, None, "L1:target"), v[0], ALPHA, ids),
            (Arm("random", "correct", 1, None, "random#0"), v[1], -ALPHA, ids),
            (Arm("random", "correct", 1, None, "random#1"), v[2], 0.0, ids),
            (Arm("random", "correct", 3, None, "random#2"), v[2], ALPHA, ids)]


ALPHA = 8.0


def _run_many(cfg, run, schedule=None):
    """Outcomes of the :func:`_conditions` through a fresh Steerer (closed afterwards), and the Steerer."""
    from pva_sae.stages.steer import Steerer

    steerer = Steerer(cfg, run, False, schedule=schedule)
    try:
        return steerer.run_many(_conditions(run, steerer.loaded.d_model)), steerer
    finally:
        steerer.close()


@pytest.mark.slow
def test_queue_schedule_gives_the_batches_outcomes(analysed, tmp_path_factory):
    """The fast backend's queue (every condition's rows in one continuous batch, per-row steering) gives each
    condition the outcomes, programs included, of planning it into static batches; the two schedules never
    share a cached condition."""
    cfg, run = _fast_copy(analysed, tmp_path_factory, "steer-queue")
    batched, by_batch = _run_many(cfg, run, schedule="batches")
    queued, by_queue = _run_many(cfg, run)
    assert by_queue.schedule == "queue" and by_batch.schedule == "batches"
    assert by_queue.n_generated == by_batch.n_generated == 5 * 10       # nothing reused across schedules
    assert queued == batched
    baseline, target, _, zero, _ = queued
    assert zero == baseline                                               # alpha 0: the unsteered rows exactly
    assert sum(bool(o["program"]) for o in baseline.values()) >= 3 and any(o["passed"] for o in baseline.values())
    assert {o["finish_reason"] for o in baseline.values()} == {"eos", "length"}   # rows end at different steps
    assert any(target[t]["program"] != baseline[t]["program"] for t in baseline)
    again, steerer = _run_many(cfg, run)
    assert again == queued and steerer.n_generated == 0 and steerer.n_done == 5
    with pytest.raises(ValueError, match=r"'queue' \(continuous batching\) needs the fast backend"):
        _run_many(resolve_config(base=cfg.to_dict(), overrides=["generation.backend=hf"]), run, "queue")


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_an_interrupted_queue_resumes_at_the_conditions_not_written(analysed, tmp_path_factory, monkeypatch):
    """Waves of 3 conditions; interrupted when the second condition is written (inside the first wave): the resumed
    stage reads the one written condition, generates the others, and every outcome equals an uninterrupted run's."""
    import pva_sae.stages.steer as steer_module

    monkeypatch.setattr(steer_module, "QUEUE_WAVE_BATCHES", 3)
    cfg, run = _fast_copy(analysed, tmp_path_factory, "steer-queue-whole")
    whole, _ = _run_many(cfg, run)
    cfg, run = _fast_copy(analysed, tmp_path_factory, "steer-queue-resumed")
    written = []
    write = steer_module.write_condition

    def interrupt_at_the_second(paths, key, data):
        if key != steer_module.PLAN_KEY:
            if len(written) == 1:
                raise _Interrupted
            written.append(key)
        write(paths, key, data)

    monkeypatch.setattr(steer_module, "write_condition", interrupt_at_the_second)
    with pytest.raises(_Interrupted):
        _run_many(cfg, run)
    monkeypatch.setattr(steer_module, "write_condition", write)
    resumed, steerer = _run_many(cfg, run)
    assert resumed == whole
    assert steerer.n_generated == 4 * 10 and steerer.n_done == 5


@pytest.mark.slow
def test_the_stage_through_the_queue_equals_the_stage_through_batches(analysed, tmp_path_factory, monkeypatch,
                                                                       capsys):
    """The whole stage on the fast backend: the queue schedule (its default there) and the batches schedule give
    the same results and per-task rows; the progress bar counts every condition."""
    import functools

    import pyarrow.parquet as pq

    import pva_sae.stages.steer as steer_module

    fast = ["generation.backend=fast", "steering.speculate=on"]     # 'auto' speculates only beside labelling
    cfg_q, run_q, queued = _steer_copy(analysed, tmp_path_factory, "steer-stage-queue", fast)
    monkeypatch.setattr(steer_module, "Steerer", functools.partial(steer_module.Steerer, schedule="batches"))
    _, run_b, batched = _steer_copy(analysed, tmp_path_factory, "steer-stage-batches", fast)
    for part in ("experiments", "directions", "noise_floor", "selective"):
        assert queued[part] == batched[part], part
    assert (pq.read_table(SteeringPaths.of(run_q).tasks).to_pylist()
            == pq.read_table(SteeringPaths.of(run_b).tasks).to_pylist())
    assert queued["tasks"] == batched["tasks"]
    # where the queue's time went: one entry per call (grid with the baselines, refinement, validation)
    calls = json.loads(SteeringPaths.of(run_q).calls.read_text())
    # the refinement's one midpoint was generated ahead with the grid: its call generated nothing
    assert calls["schedule"] == "queue" and len(calls["calls"]) == 2
    assert sum(c["rows"] for c in calls["calls"]) == queued["tasks"]["generated"]
    for c in calls["calls"]:
        assert c["generation_s"] > 0 and c["label_wait_s"] >= 0 and c["rows_pending"] <= c["rows"]
        assert all(e["done_after_s"] <= c["label_wait_s"] + 1e-3 for e in c["last_chunks"])
    assert json.loads(SteeringPaths.of(run_b).calls.read_text()) == {"schedule": "batches", "calls": []}
    monkeypatch.undo()
    capsys.readouterr()
    again = steer(cfg_q, progress=True)
    assert again["tasks"]["generated"] == 0 and again["experiments"] == queued["experiments"]
    n_alphas = len(queued["directions"]["correct"]["tuning"]["table"])
    done = 2 + 2 * (n_alphas * (1 + 2) + 1 + 4)
    assert f"steer {done}/{done} conditions" in capsys.readouterr().err



def test_steering_follows_generation_schedule(analysed, tmp_path_factory):
    """generation.schedule picks the steering schedule too ('auto': queue on the fast backend); 'queue' on a
    backend other than fast is refused with the setting named."""
    from pva_sae.model.fastgen import FastGenError
    from pva_sae.stages.steer import Steerer

    fast, run = _fast_copy(analysed, tmp_path_factory, "steer-schedule")
    assert fast.generation.backend == "fast"
    for overrides, want in (([], "queue"), (["generation.schedule=batches"], "batches"),
                            (["generation.backend=hf"], "batches")):
        steerer = Steerer(resolve_config(base=fast.to_dict(), overrides=overrides), run, False)
        try:
            assert steerer.schedule == want
        finally:
            steerer.close()
    with pytest.raises(FastGenError, match="generation.schedule=batches"):
        Steerer(resolve_config(base=fast.to_dict(), overrides=["generation.backend=hf"]), run, False, schedule="queue")
