"""`pva-sae run` end to end on the embedded default (a small task range): every stage, then the report."""

import contextlib
import io
import json

import pytest

from pva_sae.cli import main
from pva_sae.rundir.artifacts import load_records
from pva_sae.rundir.paths import RunDir

SMALL = ["data.end_idx=79", "analysis.general_n_docs=200", "validation.temperatures=[0.0, 1.0]",
         "validation.robustness_max_tasks=6", "validation.bootstrap_resamples=200", "validation.probe_cs=3",
         "steering.alpha_grid=[0.1, 1.0]", "steering.refine_steps=0", "steering.tuning_max_tasks=6",
         "steering.max_tasks=8", "steering.n_controls=4", "steering.tuning_controls=2",
         "steering.n_permutations=200", "steering.bootstrap_resamples=200",
         "steering.control_max_separation=0.2",
         # shorter runaway completions and endless loops: the checks here are of the stages, not of the labels
         "generation.max_new_tokens=160", "sandbox.timeout_s=3"]
STAGES = ("build", "analyze", "validate", "steer")


def run_counting_loads(run_dir, cache, monkeypatch, *extra):
    """`pva-sae run` with ``extra`` arguments; returns the models loaded (model.name each time)."""
    import pva_sae.model.registry as registry

    loads = []
    real = registry.load_model

    def counting(cfg):
        loads.append(cfg.name)
        return real(cfg)

    monkeypatch.setattr(registry, "load_model", counting)
    args = ["run", "--run-dir", str(run_dir), "--set", f"analysis.cache_dir={cache}", *extra]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) == 0
    monkeypatch.setattr(registry, "load_model", real)
    return loads


@pytest.fixture(scope="module")
def default_study(tmp_path_factory):
    """`pva-sae run --quiet` on the embedded default (small task range), labelling after generation (overlap off);
    returns (run dir, analysis cache, models loaded, stdout, stderr). Shared: the study takes minutes on 2 cores."""
    root = tmp_path_factory.mktemp("default_study")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        loads = run_counting_loads(root / "run", root / "cache", mp, "--quiet", "--set", "generation.overlap=off")
    return root / "run", root / "cache", loads, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_run_every_stage_on_the_default(default_study):
    run_dir, _, loads, out, err = default_study
    assert loads == ["pva-tiny"]          # one load, handed to every stage and the temperature sub-build
    for stage in ("build:", "analyze:", "validate:", "steer:", "report:"):
        assert stage in out
    assert "[build]" not in err and "conditions" not in err        # --quiet
    run = RunDir.at(run_dir)
    assert all(run.is_done(s) for s in STAGES)
    saved = json.loads(run.config.read_text())
    assert saved["validation"]["samples_per_temperature"] == 1            # the model's registered default
    assert saved["validation"]["robustness_max_tasks"] == 6                # --set wins over it
    md = (run_dir / "report.md").read_text()
    assert "has not run" not in md
    html = (run_dir / "report.html").read_text()
    steering = json.loads((run_dir / "steering" / "results.json").read_text())
    validation = json.loads((run_dir / "validation" / "results.json").read_text())
    assert validation["temperature"]["1"]["source"].startswith("regenerated")
    # analysis: selection landscape, frequency scatter, top-latent histograms
    assert html.count("data:image/png;base64,") == 3 + len(validation["plots"]) + len(steering["plots"])
    # one latent identity: every steered latent is named in the validation results as a predictor
    for direction, d in steering["directions"].items():
        assert d["target"]["validation"] is not None and d["target"]["label"] in out


def _without(d, keys=("seconds",)):
    return {k: v for k, v in d.items() if k not in keys}


@pytest.mark.slow
def test_overlap_changes_no_output_of_the_default_study(default_study, tmp_path, capsys, monkeypatch):
    """The same study with labelling overlapped with generation (and progress shown) writes the same outputs."""
    off, cache = default_study[:2]
    assert run_counting_loads(tmp_path / "on", cache, monkeypatch, "--set", "generation.overlap=on") == ["pva-tiny"]
    err = capsys.readouterr().err
    for step in ("[build] ", "[analyze] ", "[validate] ", "[build t=1] ", "[steer] ", "[report] "):
        assert step in err
    timing = {"gen_time_s", "exec_time_s"}
    first, second = off, tmp_path / "on"
    assert ([_without(r, timing) for r in load_records(str(first))]
            == [_without(r, timing) for r in load_records(str(second))])
    for name in ("validation/results.json", "steering/results.json"):
        assert _without(json.loads((first / name).read_text())) == _without(json.loads((second / name).read_text()))
    import pyarrow.parquet as pq

    for name in ("analysis/ranked_latents.parquet", "steering/steered_tasks.parquet"):
        assert pq.read_table(first / name).to_pylist() == pq.read_table(second / name).to_pylist(), name


def _pipeline_on_copy(analysed, dest, monkeypatch, progress, *extra):
    """run_pipeline on a copy of the analysed fixture (build done, labels planted): analyze, validate with its
    temperature sub-build, steer and the report all run; returns (config, models loaded)."""
    from test_steer import SMALL_STEER
    from test_validate import copy_run

    import pva_sae.model.registry as registry
    from pva_sae.config import resolve_config
    from pva_sae.pipeline import run_pipeline

    # speculation pinned: under 'auto' it follows the overlap, and would add the refinement's candidates to one run
    cfg = resolve_config(base=copy_run(analysed, dest).to_dict(),
                         overrides=["data.end_idx=29", *SMALL_STEER, "steering.speculate=on", *extra])
    loads = []
    real = registry.load_model
    monkeypatch.setattr(registry, "load_model", lambda c: loads.append(c.name) or real(c))
    run_pipeline(cfg, progress=progress)
    monkeypatch.setattr(registry, "load_model", real)
    return cfg, loads


@pytest.mark.slow
def test_the_model_loads_once_and_overlap_changes_no_output(analysed, tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq

    _, plain = _pipeline_on_copy(analysed, tmp_path / "plain", monkeypatch, False, "generation.overlap=off")
    assert len(plain) == 1                    # analyze, the t=1 sub-build and steer share one load
    assert "[analyze]" not in capsys.readouterr().err
    _, overlapped = _pipeline_on_copy(analysed, tmp_path / "overlap", monkeypatch, True, "generation.overlap=on")
    assert len(overlapped) == 1
    err = capsys.readouterr().err
    for step in ("[build] already complete", "[analyze] ", "[validate] ", "[build t=1] ", "[steer] ", "[report] "):
        assert step in err
    assert "sample/s" in err and " conditions" in err
    first, second = RunDir.at(tmp_path / "plain").root, RunDir.at(tmp_path / "overlap").root
    for name in ("validation/results.json", "steering/results.json"):
        assert _without(json.loads((first / name).read_text())) == _without(json.loads((second / name).read_text()))
    for name in ("analysis/ranked_latents.parquet", "steering/steered_tasks.parquet"):
        assert pq.read_table(first / name).to_pylist() == pq.read_table(second / name).to_pylist(), name
    subs = [list((root / "validation" / "temperature").glob("t1_*"))[0] for root in (first, second)]
    timing = {"gen_time_s", "exec_time_s"}
    assert ([_without(r, timing) for r in load_records(str(subs[0]))]
            == [_without(r, timing) for r in load_records(str(subs[1]))])
