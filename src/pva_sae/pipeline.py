"""`pva-sae run`: every stage that exists, in order, on one config (by default the embedded model).

Stages: build (labelled dataset) -> analyze (SAE latents) -> validate (held-out metrics, robustness) ->
steer (causal tests), then the report. A stage whose ``.done`` marker is present
is not redone when its inputs are unchanged, so rerunning an interrupted pipeline continues where it
stopped. The model is loaded once, by the first stage that generates or reads residuals, and handed to
every later stage and to the validation stage's temperature sub-builds.
"""

from __future__ import annotations

import time

from pva_sae.config import DIRECTIONS, Config
from pva_sae.execution.dataset import announce
from pva_sae.model.registry import load_once
from pva_sae.rundir.paths import AnalysisPaths, RunDir
from pva_sae.stages.ablate import ablate
from pva_sae.stages.analyze import analyze
from pva_sae.stages.attention import attention
from pva_sae.stages.build import build_dataset
from pva_sae.stages.merge import merge
from pva_sae.stages.report import steering_summary, validation_summary, write_report
from pva_sae.stages.steer import steer
from pva_sae.stages.validate import validate

# The stage entry points: the CLI and the Python API reach the stages through the pipeline only.
__all__ = ["ablate", "analyze", "attention", "build_dataset", "merge", "run_pipeline", "steer", "steering_summary",
           "validate", "validation_summary", "write_report"]


def run_pipeline(cfg: Config, progress: bool = True, *, loaded=None) -> list[str]:
    """Run the stages; return human-readable summary lines (where the results are). ``loaded`` (a LoadedModel,
    or a callable returning one) is the model every stage uses; by default it is loaded once, when first needed."""

    run = RunDir.at(cfg.output.run_dir)
    model = load_once(cfg.model) if loaded is None else loaded
    lines = []
    started = time.perf_counter()
    records = build_dataset(cfg, progress=progress, loaded=model)
    n_pass = sum(r["passed"] for r in records)
    lines.append(f"build:   {len(records)} samples, {n_pass} passed ({n_pass / max(len(records), 1):.1%}) "
                 f"-> {run.datasets}")
    t0 = time.perf_counter()
    summary = analyze(cfg, progress=progress, loaded=model)
    paths = AnalysisPaths.of(run)
    lines.append(f"analyze: {summary['n_tasks']} SAE-split tasks ({summary['n_correct']} correct), "
                 f"{len(summary['layers'])} layers, release {summary['release']} ({time.perf_counter() - t0:.0f} s)")
    for direction in DIRECTIONS:
        top = summary["top"][direction][:1]
        if top:
            r = top[0]
            lines.append(f"         top {direction}-predicting latent: layer {r['layer']} latent {r['latent']} "
                         f"(separation {r['sep_' + direction]:.3f}, t {r['t_' + direction]:.2f})")
    lines.append(f"         ranked latents: {paths.ranked_parquet}; plots: {paths.plots}")
    t0 = time.perf_counter()
    results = validate(cfg, progress=progress, loaded=model)
    lines += ["validate: " + line for line in validation_summary(results)]
    lines.append(f"         temperatures {', '.join(results['temperature'])}; {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    steering = steer(cfg, progress=progress, loaded=model)
    lines += [("steer:   " if line.startswith(tuple(steering["experiments"])) else "         ") + line
              for line in steering_summary(steering)]
    lines.append(f"         noise floor {steering['noise_floor']['flips']}/{steering['noise_floor']['n']} flips; "
                 f"{time.perf_counter() - t0:.0f} s")
    announce("report", f"writing {run.report_html}", progress)
    html_path, _ = write_report(run.root)
    lines.append(f"report:  {html_path}")
    lines.append(f"finished in {time.perf_counter() - started:.0f} s; results in {run.root}")
    return lines

