"""The report: the summary box built from results files (null results stated, the test-bed caveat only on
the embedded default), degenerate predictors and selective steering named, empty plots not drawn,
p-values formatted, sections as a list, output files readable by all (0644 under umask 022)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pva_sae.plots import (
    experiment_event,
    fmt_p,
    plot_difficulty,
    plot_net_effects,
    plot_selective,
    plot_steering,
    plot_steering_experiments,
    plot_steering_tuning,
    plot_temperature,
)
from pva_sae.rundir.atomic import atomic_write_json, atomic_write_text, current_umask
from pva_sae.rundir.paths import RunDir, SteeringPaths, ValidationPaths
from pva_sae.stages.report import (
    SECTIONS,
    Block,
    Finding,
    Section,
    build_blocks,
    degenerate,
    degenerate_tag,
    render_html,
    render_markdown,
    steering_findings,
    validation_findings,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- synthetic results

def iv(estimate, low=None, high=None):
    low = estimate if low is None else low
    return {"estimate": estimate, "low": low, "high": estimate if high is None else high, "n_valid": 200,
            "n_resamples": 200}


def row(name, label, direction, auroc, recall=0.7, balanced=0.6, paired=(), layer=None, latent=None):
    metrics = {"auroc": auroc, "f1": iv(0.6, 0.5, 0.7), "precision": iv(0.55, 0.45, 0.65), "recall": iv(recall),
               "average_precision": iv(0.6, 0.5, 0.7), "mcc": iv(0.2, 0.1, 0.3), "balanced_accuracy": iv(balanced)}
    return {"name": name, "label": label, "direction": direction, "layer": layer, "latent": latent, "threshold": 0.0,
            "n": 100, "n_positive": 48, "metrics": metrics, "paired": list(paired)}


def vs(name, against, delta_auroc, verdict, zero_f1=False):
    delta = iv(0.0) if zero_f1 else iv(0.05, 0.01, 0.09)
    return {"name": name, "against": against, "delta_auroc": delta_auroc, "delta_f1": delta, "delta_mcc": delta,
            "verdict": verdict}


def validation_results(significant: bool) -> dict:
    out = {}
    for direction, (layer, latent) in (("correct", (3, 169)), ("incorrect", (2, 959))):
        probe = row("probe", f"logistic probe L{layer}", direction, iv(0.6, 0.55, 0.65))
        if significant:
            lat = row("latent", f"latent L{layer}:{latent}", direction, iv(0.8, 0.75, 0.85), layer=layer, latent=latent,
                      paired=[vs("probe", probe["label"], iv(0.2, 0.15, 0.25), "better")])
        else:   # chance AUROC, and a threshold that answers the positive class for every task
            lat = row("latent", f"latent L{layer}:{latent}", direction, iv(0.49, 0.44, 0.53), recall=1.0, balanced=0.5,
                      layer=layer, latent=latent,
                      paired=[vs("probe", probe["label"], iv(-0.04, -0.11, 0.03), "no different"),
                              vs("always_positive", f"always '{direction}'", iv(-0.01, -0.06, 0.03), "no different",
                                 zero_f1=True)])
        out[direction] = [lat, probe]
    return {"validation": out}


def steering_results(significant: bool, flags_every_task: bool) -> dict:
    p = 0.004 if significant else 1.0
    directions, experiments = {}, {}
    for direction, label, name in (("correct", "L5:910", "correction"), ("incorrect", "L2:959", "corruption")):
        est = 0.25 if significant else 0.0
        directions[direction] = {
            "target": {"label": label, "alpha": 0.1, "alpha_units": "residual_norm"},
            "net_effect": {"target": {"estimate": est, "ci": [est - 0.1 * significant, est + 0.1 * significant],
                                      "n": 40, "corrections": 10 if significant else 0, "corruptions": 0},
                           "controls": [{"label": "L5:1", "kind": "latent", "estimate": 0.0, "ci": [0.0, 0.0]}],
                           "controls_mean": 0.0},
            "tuning": {"table": []}}
        experiments[name] = {"direction": direction, "target": label, "n": 20,
                             "rate": {"estimate": est, "ci": [0.0, 0.5], "successes": 5 if significant else 0, "n": 20},
                             "controls_summary": {"mean_rate": 0.0}, "controls": [],
                             "paired_difference": {"estimate": est, "ci": [est / 2, est * 1.5]},
                             "rank_p": {"p": p}, "permutation_p": {"p": p}, "holm_p": {"rank_p": p, "permutation_p": p}}
    n_flagged = 40 if flags_every_task else 12
    return {"design": {"n_controls": 39}, "directions": directions, "experiments": experiments,
            "selective": {"n_flagged": n_flagged, "n_tasks": 40, "flags_every_task": flags_every_task,
                          "selective": {"correction": 0.1, "corruption": 0.0},
                          "constant": {"correction": 0.2, "corruption": 0.1},
                          "selective_minus_constant": {"estimate": 0.0, "ci": [-0.05, 0.05]}}}


def make_run(tmp_path, model: str, significant: bool, flags_every_task: bool = False) -> RunDir:
    run = RunDir.at(tmp_path / "run")
    atomic_write_json(run.config, {"model": {"name": model}})
    atomic_write_json(ValidationPaths.of(run).results, validation_results(significant))
    atomic_write_json(SteeringPaths.of(run).results, steering_results(significant, flags_every_task))
    return run


SUMMARY_ONLY = [Section("validation", lambda run: [], validation_findings),
                Section("steering", lambda run: [], steering_findings)]


def summary_of(run: RunDir) -> Block:
    return next(b for b in build_blocks(run, SUMMARY_ONLY) if b.kind == "summary")


# --------------------------------------------------------------------------- summary box

def test_summary_states_null_results_and_the_test_bed_on_the_embedded_default(tmp_path):
    run = make_run(tmp_path, "pva-tiny", significant=False)
    box = summary_of(run)
    assert len(box.caveats) == 1 and "pva-tiny" in box.caveats[0] and "not findings about" in box.caveats[0]
    latents = [f for f in box.findings if "as a predictor of" in f.headline]
    steering = [f for f in box.findings if f.headline.startswith("Steering along")]
    assert len(latents) == 2 and len(steering) == 2
    for f in latents + steering:
        assert f.tag == "null result" and f.meaning.startswith("Null result:")
    # the numbers come from the results file: AUROC with interval, the probe's, and the paired difference
    assert "AUROC 0.490 [0.440, 0.530]; logistic probe 0.600 [0.550, 0.650]; latent - probe -0.040 [-0.110, 0.030]" \
        in latents[0].headline
    assert "rank p 1, permutation p 1" in steering[0].headline
    assert "the rank p cannot go below" not in steering[0].meaning          # 39 controls reach p = 0.025
    md = render_markdown(build_blocks(run, SUMMARY_ONLY), run.root)
    html = render_html(build_blocks(run, SUMMARY_ONLY))
    for text in (md, html):
        assert "Test bed: pva-tiny" in text and "null result" in text
    assert md.index("Summary: what this run found") < md.index("Test bed")


def test_summary_on_a_real_model_has_no_test_bed_caveat_and_states_the_findings(tmp_path):
    run = make_run(tmp_path, "gemma-2-2b", significant=True)
    box = summary_of(run)
    assert box.caveats == []
    assert "Test bed" not in render_markdown(build_blocks(run, SUMMARY_ONLY), run.root)
    latent = next(f for f in box.findings if "as a predictor of 'correct'" in f.headline)
    assert latent.tag == "" and "above chance" in latent.meaning and "better than a linear probe" in latent.meaning
    steer = next(f for f in box.findings if "correct direction" in f.headline)
    assert steer.tag == "" and "Holm-adjusted p < 0.05" in steer.meaning
    assert "permutation p 0.004" in steer.headline and "Corrections: 5/20" in steer.headline


def test_few_controls_are_named_as_the_floor_of_the_rank_p(tmp_path):
    run = make_run(tmp_path, "gemma-2-2b", significant=False)
    results = steering_results(significant=False, flags_every_task=False)
    results["design"]["n_controls"] = 4
    atomic_write_json(SteeringPaths.of(run).results, results)
    steer = next(f for f in summary_of(run).findings if f.headline.startswith("Steering along"))
    assert "with 4 controls the rank p cannot go below 0.2" in steer.meaning


def test_no_finished_stage_is_said_so(tmp_path):
    run = RunDir.at(tmp_path / "empty")
    atomic_write_json(run.config, {"model": {"name": "pva-tiny"}})
    md = write_report(run.root)[1].read_text()
    assert "No stage has finished yet" in md and "Test bed: pva-tiny" in md
    assert md.index("No stage has finished yet") < md.index("## Dataset")


# --------------------------------------------------------------------------- degenerate cases

def test_a_latent_answering_one_class_for_every_task_is_named_degenerate():
    always = validation_results(significant=False)["validation"]["correct"][0]
    assert degenerate_tag(always) == "always 'correct'"
    assert "predicts every task 'correct'" in degenerate(always) and "the same as always 'correct'" in degenerate(always)
    never = row("latent", "latent L1:2", "incorrect", iv(0.5), recall=0.0, balanced=0.5)
    assert degenerate_tag(never) == "never 'incorrect'"
    like_majority = row("latent", "latent L1:3", "correct", iv(0.55), paired=[
        vs("majority", "majority class", iv(0.05), "no different", zero_f1=True)])
    assert degenerate_tag(like_majority) == "same as majority class"
    assert degenerate(validation_results(significant=True)["validation"]["correct"][0]) is None
    assert degenerate(row("always_positive", "always 'correct'", "correct", iv(0.5), recall=1.0, balanced=0.5)) is None


def test_selective_steering_that_flags_every_task_or_none_is_named_and_not_plotted(tmp_path):
    run = make_run(tmp_path, "gemma-2-2b", significant=False, flags_every_task=True)
    sel = next(f for f in summary_of(run).findings if f.headline.startswith("Selective"))
    assert sel.tag == "degenerate" and "constant steering" in sel.meaning
    results = steering_results(significant=False, flags_every_task=True)
    assert plot_selective(tmp_path / "selective.png", results) is None
    assert not (tmp_path / "selective.png").exists()
    results["selective"].update(flags_every_task=False, n_flagged=0)                # flags no task: no steering
    assert plot_selective(tmp_path / "selective.png", results) is None
    atomic_write_json(SteeringPaths.of(run).results, results)
    sel = next(f for f in summary_of(run).findings if f.headline.startswith("Selective"))
    assert sel.tag == "degenerate" and "no steering" in sel.meaning
    results["selective"]["n_flagged"] = 12
    assert plot_selective(tmp_path / "selective.png", results).stat().st_size > 1000


# --------------------------------------------------------------------------- plots, words, p-values

def test_plots_with_nothing_to_show_are_not_drawn(tmp_path):
    results = steering_results(significant=True, flags_every_task=True)
    assert plot_steering_tuning(tmp_path / "tuning.png", results) is None          # no direction was tuned
    for e in results["experiments"].values():
        e["n"] = 0
    assert plot_steering_experiments(tmp_path / "exp.png", results) is None        # no relevant task anywhere
    for d in results["directions"].values():
        d["net_effect"]["target"]["estimate"] = None
    assert plot_net_effects(tmp_path / "net.png", results) is None
    assert plot_steering(tmp_path / "plots", results) == []
    assert plot_difficulty(tmp_path / "diff.png", {"difficulty": {"easy": {"n": 0}}}) is None
    assert plot_temperature(tmp_path / "temp.png", {"temperature": {}}) is None
    assert list(tmp_path.rglob("*.png")) == []


def test_one_word_for_one_event():
    assert experiment_event("correction") == "correction"
    assert experiment_event("preservation_failure") == experiment_event("corruption") == "corruption"


def test_p_values_are_formatted():
    assert fmt_p(None) == "n/a"
    assert fmt_p(0.0004) == "< 0.001"
    assert fmt_p(0.012345) == "0.0123"
    assert fmt_p(1.0) == "1"


# --------------------------------------------------------------------------- sections and files

def test_sections_are_a_list_and_an_absent_optional_artifact_omits_its_section(tmp_path):
    run = make_run(tmp_path, "gemma-2-2b", significant=True)
    absent = Section("ablation", lambda r: [], lambda r: [])
    present = Section("ablation", lambda r: [Block("h2", "Ablation"), Block("p", "ablated")],
                      lambda r: [Finding("Ablating L3:169 changes pass@1 by 0.1.", "It matters.")])
    without = build_blocks(run, SUMMARY_ONLY + [absent])
    assert not any(b.text == "Ablation" for b in without)
    with_it = build_blocks(run, SUMMARY_ONLY + [present])
    assert [b.text for b in with_it if b.kind == "h2"] == ["Ablation"]
    box = next(b for b in with_it if b.kind == "summary")
    assert box.findings[-1].headline.startswith("Ablating")
    assert [s.name for s in SECTIONS] == ["dataset", "analysis", "validation", "steering", "ablation", "attention",
                                          "transfer", "reproducibility"]


def test_written_files_take_the_umask_like_any_other_file(tmp_path):
    previous = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        atomic_write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
        os.umask(0o027)
        assert current_umask() == 0o027
        atomic_write_text(tmp_path / "b.txt", "x")
        assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640
        os.umask(0o022)
        run = RunDir.at(tmp_path / "run")
        atomic_write_json(run.config, {"model": {"name": "pva-tiny"}})
        assert stat.S_IMODE(run.config.stat().st_mode) == 0o644
        for path in write_report(run.root):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(previous)
    assert not list(tmp_path.glob(".*.tmp"))


BROWSER = next((b for b in ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome")
                if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="needs a headless Chromium (apt-get install chromium)")
def test_the_render_check_fails_on_a_broken_image_and_an_empty_section(tmp_path):
    run = RunDir.at(tmp_path / "run")
    atomic_write_json(run.config, {"model": {"name": "pva-tiny"}})
    write_report(run.root)
    script = [sys.executable, str(ROOT / "scripts" / "render_report.py"), str(run.root)]
    ok = subprocess.run(script, check=False, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (run.root / "report_screenshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = run.report_html.read_text()
    broken = page.replace("<h2>Reproducibility</h2>", "<h2>Empty</h2><h2>Reproducibility</h2>").replace(
        "</body>", "<img alt='broken' src='data:image/png;base64,AAAA'></body>")
    run.report_html.write_text(broken)
    bad = subprocess.run(script, check=False, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert "image 1 (broken) did not load" in bad.stderr and "section 'Empty' is empty" in bad.stderr
