"""The one module that calls the stages: `pva-sae run` (:func:`run_pipeline`), the work of each stage's command
(``*_lines``: run the stage, return the lines the command prints) and the Python API's stage calls (exported by
the package: ``pva_sae.build_dataset``, ``analyze``, ``validate``, ``steer``, ``report``, ``run``).

The CLI parses arguments and prints; the stages orchestrate the library; no library module imports this one.
:mod:`pva_sae.api` holds what this module shares with the command line (configs) and the reading of a run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pva_sae.api import Run, config_items, load_run, resolve_stage
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


# --------------------------------------------------------------------------- `pva-sae run` and the Python API


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


def build_dataset(model: str | None = None, start_idx: int | None = None, end_idx: int | None = None,
                  save_format: str | None = None, *, config: Config | None = None,
                  run_dir: str | Path | None = None, resume: str | None = None, resume_from: str | None = None,
                  config_file: str | None = None, overrides: dict[str, Any] | None = None, progress: bool = True,
                  loaded=None) -> list[dict[str, Any]]:
    """Stage 1: build the labelled dataset for tasks ``start_idx..end_idx`` (inclusive); returns its records.

    ``resume`` None keeps the config's ('ask', which resumes here: there is no prompt to answer).
    """
    items = config_items(model=model, start_idx=start_idx, end_idx=end_idx, save_format=save_format,
                         run_dir=run_dir, resume=resume, resume_from=resume_from, overrides=overrides)
    cfg = resolve_stage("build", config, config_file, items)
    return _build(cfg, interactive=False, progress=progress, loaded=loaded)


def analyze(config: Config | None = None, *, run_dir: str | Path | None = None, config_file: str | None = None,
            overrides: dict[str, Any] | None = None, progress: bool = True, loaded=None) -> dict[str, Any]:
    """Stage 2: SAE latents separating correct from incorrect; returns ``analysis/summary.json``'s content
    (the ranked latents are ``load_run(run_dir).ranked``)."""
    cfg = resolve_stage("analyze", config, config_file, config_items(run_dir=run_dir, overrides=overrides))
    return _analyze(cfg, progress=progress, loaded=loaded)


def validate(config: Config | None = None, *, run_dir: str | Path | None = None, config_file: str | None = None,
             overrides: dict[str, Any] | None = None, progress: bool = True, loaded=None) -> dict[str, Any]:
    """Stage 3: the chosen latents as predictors on held-out tasks against baselines; returns
    ``validation/results.json``'s content."""
    cfg = resolve_stage("validate", config, config_file, config_items(run_dir=run_dir, overrides=overrides))
    return _validate(cfg, progress=progress, loaded=loaded)


def steer(config: Config | None = None, *, run_dir: str | Path | None = None, config_file: str | None = None,
          overrides: dict[str, Any] | None = None, progress: bool = True, loaded=None) -> dict[str, Any]:
    """Stage 4: steering along the chosen latents against control directions; returns
    ``steering/results.json``'s content."""
    cfg = resolve_stage("steer", config, config_file, config_items(run_dir=run_dir, overrides=overrides))
    return _steer(cfg, progress=progress, loaded=loaded)


def report(run_dir: str | Path | Config | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` of a run directory (or of ``Config.output.run_dir``)."""
    if isinstance(run_dir, Config):
        run_dir = run_dir.output.run_dir
    return write_report(run_dir if run_dir is not None else Config().output.run_dir)


def run(config: Config | None = None, *, model: str | None = None, start_idx: int | None = None,
        end_idx: int | None = None, run_dir: str | Path | None = None, resume: str | None = None,
        config_file: str | None = None, overrides: dict[str, Any] | None = None, progress: bool = True,
        loaded=None) -> Run:
    """Every stage in order, then the report (as `pva-sae run`); returns :func:`load_run` of the run directory.
    Finished stages whose inputs did not change are not redone."""
    items = config_items(model=model, start_idx=start_idx, end_idx=end_idx, run_dir=run_dir, resume=resume,
                         overrides=overrides)
    cfg = resolve_stage("run", config, config_file, items)
    lines = run_pipeline(cfg, progress=progress, loaded=loaded)
    result = load_run(cfg.output.run_dir)
    result.summary_lines = lines
    return result
