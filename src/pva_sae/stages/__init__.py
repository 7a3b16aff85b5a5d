"""Orchestration, the top layer: one module per pipeline stage, and this package, the one place that calls them.

A stage reads its inputs from the run directory, calls library code and writes its outputs; it never imports
another stage. This package runs them: `pva-sae run` (:func:`run_pipeline`), the work of each stage's command
(``*_lines``: run the stage, return the lines the command prints) and :func:`run_stage`, through which the
Python API (:mod:`pva_sae.pipeline`) calls a stage. No library module imports a stage or this package.
"""

from __future__ import annotations

import time
from pathlib import Path

from pva_sae.config import DIRECTIONS, Config
from pva_sae.execution.dataset import announce
from pva_sae.model.registry import load_once
from pva_sae.rundir.paths import AblationPaths, AnalysisPaths, AttentionPaths, RunDir, SteeringPaths, ValidationPaths
from pva_sae.stages.ablate import ablate as _ablate
from pva_sae.stages.analyze import analyze as _analyze
from pva_sae.stages.attention import attention as _attention
from pva_sae.stages.build import build_dataset as _build
from pva_sae.stages.merge import merge as _merge
from pva_sae.stages.report import write_report
from pva_sae.stages.steer import steer as _steer
from pva_sae.stages.validate import validate as _validate
from pva_sae.summary import steering_summary, validation_summary

# --------------------------------------------------------------------------- the commands' work

def build_lines(cfg: Config, progress: bool = True) -> list[str]:
    records = _build(cfg, progress=progress)
    n_pass = sum(r["passed"] for r in records)
    return [f"built {len(records)} samples ({n_pass} passed, {n_pass / max(len(records), 1):.1%}) "
            f"in {cfg.output.run_dir}/datasets"]


def merge_lines(run_dir: str | Path) -> list[str]:
    merged = _merge(run_dir)
    lines = [f"merged {n} samples from the shards into {root}/datasets" for root, n in merged.items()]
    return lines or [f"{run_dir}: every sharded build is merged already"]


def analyze_lines(cfg: Config, progress: bool = True) -> list[str]:
    summary = _analyze(cfg, progress=progress)
    paths = AnalysisPaths.of(RunDir.at(cfg.output.run_dir))
    return [f"analysed {summary['n_tasks']} tasks ({summary['n_correct']} correct) with {summary['release']}; "
            f"ranked latents in {paths.ranked_parquet}"]


def validate_lines(cfg: Config, progress: bool = True) -> list[str]:
    results = _validate(cfg, progress=progress)
    html_path, _ = write_report(cfg.output.run_dir)
    return validation_summary(results) + [
        f"results in {ValidationPaths.of(RunDir.at(cfg.output.run_dir)).results}; report {html_path}"]


def steer_lines(cfg: Config, progress: bool = True) -> list[str]:
    results = _steer(cfg, progress=progress)
    html_path, _ = write_report(cfg.output.run_dir)
    return steering_summary(results) + [
        f"results in {SteeringPaths.of(RunDir.at(cfg.output.run_dir)).results}; report {html_path}"]


def ablate_lines(cfg: Config, progress: bool = True) -> list[str]:
    results = _ablate(cfg, progress=progress)
    lines = []
    for name, e in results["experiments"].items():
        rate, control = e["rate"], e["controls_summary"]["mean_rate"]
        lines.append(f"{name}: target {rate['successes']}/{rate['n']}, controls' mean "
                     f"{'n/a' if control is None else f'{control:.1%}'}, rank p {e['rank_p']['p']}")
    return lines + [f"results in {AblationPaths.of(RunDir.at(cfg.output.run_dir)).results}"]


def attention_lines(cfg: Config, progress: bool = True) -> list[str]:
    results = _attention(cfg, progress=progress)
    lines = [f"steering {direction}: " + ", ".join(
        f"{section} {d['estimate']:+.2%} [{d['ci'][0]:+.2%}, {d['ci'][1]:+.2%}]"
        for section, d in diff["overall"].items()) for direction, diff in results["differences"].items()]
    return lines + [f"results in {AttentionPaths.of(RunDir.at(cfg.output.run_dir)).results}"]


def report_lines(cfg: Config) -> list[str]:
    html_path, md_path = write_report(cfg.output.run_dir)
    return [f"report: {html_path} (Markdown: {md_path})"]


# --------------------------------------------------------------------------- `pva-sae run` and one stage


def run_pipeline(cfg: Config, progress: bool = True, *, loaded=None) -> list[str]:
    """Run the stages; return human-readable summary lines (where the results are). ``loaded`` (a LoadedModel,
    or a callable returning one) is the model every stage uses; by default it is loaded once, when first needed."""
    run = RunDir.at(cfg.output.run_dir)
    model = load_once(cfg.model) if loaded is None else loaded
    lines = []
    started = time.perf_counter()
    records = _build(cfg, progress=progress, loaded=model)
    n_pass = sum(r["passed"] for r in records)
    lines.append(f"build:   {len(records)} samples, {n_pass} passed ({n_pass / max(len(records), 1):.1%}) "
                 f"-> {run.datasets}")
    t0 = time.perf_counter()
    summary = _analyze(cfg, progress=progress, loaded=model)
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
    results = _validate(cfg, progress=progress, loaded=model)
    lines += ["validate: " + line for line in validation_summary(results)]
    lines.append(f"         temperatures {', '.join(results['temperature'])}; {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    steering = _steer(cfg, progress=progress, loaded=model)
    lines += [("steer:   " if line.startswith(tuple(steering["experiments"])) else "         ") + line
              for line in steering_summary(steering)]
    lines.append(f"         noise floor {steering['noise_floor']['flips']}/{steering['noise_floor']['n']} flips; "
                 f"{time.perf_counter() - t0:.0f} s")
    announce("report", f"writing {run.report_html}", progress)
    html_path, _ = write_report(run.root)
    lines.append(f"report:  {html_path}")
    lines.append(f"finished in {time.perf_counter() - started:.0f} s; results in {run.root}")
    return lines


STAGES = {"build": _build, "analyze": _analyze, "validate": _validate, "steer": _steer, "ablate": _ablate,
          "attention": _attention, "merge": _merge}


def run_stage(name: str, cfg: Config, **kwargs):
    """Stage ``name`` (a key of :data:`STAGES`) on ``cfg``, with the stage function's keyword arguments."""
    return STAGES[name](cfg, **kwargs)
