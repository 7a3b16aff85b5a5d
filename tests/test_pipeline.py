"""`pva-sae run` end to end on the embedded default (a small task range): every stage, then the report."""

import json

from pva_sae.cli import main
from pva_sae.rundir.paths import RunDir

SMALL = ["data.end_idx=79", "analysis.general_n_docs=200", "validation.temperatures=[0.0, 1.0]",
         "validation.robustness_max_tasks=6", "validation.bootstrap_resamples=200", "validation.probe_cs=3",
         "steering.alpha_grid=[0.1, 1.0]", "steering.refine_steps=0", "steering.tuning_max_tasks=6",
         "steering.max_tasks=8", "steering.n_controls=4", "steering.tuning_controls=2",
         "steering.n_permutations=200", "steering.bootstrap_resamples=200",
         "steering.control_max_separation=0.2"]


def test_run_every_stage_on_the_default(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["run", "--quiet", "--run-dir", str(run_dir), "--set", f"analysis.cache_dir={tmp_path / 'cache'}"]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    for stage in ("build:", "analyze:", "validate:", "steer:", "report:"):
        assert stage in out
    run = RunDir.at(run_dir)
    assert all(run.is_done(s) for s in ("build", "analyze", "validate", "steer"))
    saved = json.loads(run.config.read_text())
    assert saved["validation"]["samples_per_temperature"] == 1            # the model's registered default
    assert saved["validation"]["robustness_max_tasks"] == 6                # --set wins over it
    md = (run_dir / "report.md").read_text()
    assert "has not run" not in md
    html = (run_dir / "report.html").read_text()
    steering = json.loads((run_dir / "steering" / "results.json").read_text())
    validation = json.loads((run_dir / "validation" / "results.json").read_text())
    # analysis: selection landscape, frequency scatter, top-latent histograms
    assert html.count("data:image/png;base64,") == 3 + len(validation["plots"]) + len(steering["plots"])
    # one latent identity: every steered latent is named in the validation results as a predictor
    for direction, d in steering["directions"].items():
        assert d["target"]["validation"] is not None and d["target"]["label"] in out
