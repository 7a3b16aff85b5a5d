"""The Python API's stage calls (exported by the package: ``pva_sae.build_dataset``, ``analyze``, ``validate``,
``steer``, ``report``, ``run``) and, for the CLI, the commands' work; the stages run through the stages package
(:mod:`pva_sae.stages`), the one place that calls them.

The CLI parses arguments and prints; no library module imports this one. :mod:`pva_sae.api` holds what this
module shares with the command line (configs) and the reading of a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pva_sae.api import Run, config_items, load_run, resolve_stage
from pva_sae.config import Config
from pva_sae.stages import (
    ablate_lines,
    analyze_lines,
    attention_lines,
    build_lines,
    merge_lines,
    report_lines,
    run_pipeline,
    run_stage,
    steer_lines,
    validate_lines,
    write_report,
)

__all__ = ["ablate_lines", "analyze_lines", "attention_lines", "build_lines", "merge_lines", "report_lines",
           "run_pipeline", "steer_lines", "validate_lines", "build_dataset", "analyze", "validate", "steer", "report",
           "run"]


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
    return run_stage("build", cfg, interactive=False, progress=progress, loaded=loaded)


def analyze(config: Config | None = None, *, run_dir: str | Path | None = None, config_file: str | None = None,
            overrides: dict[str, Any] | None = None, progress: bool = True, loaded=None) -> dict[str, Any]:
    """Stage 2: SAE latents separating correct from incorrect; returns ``analysis/summary.json``'s content
    (the ranked latents are ``load_run(run_dir).ranked``)."""
    cfg = resolve_stage("analyze", config, config_file, config_items(run_dir=run_dir, overrides=overrides))
    return run_stage("analyze", cfg, progress=progress, loaded=loaded)


def validate(config: Config | None = None, *, run_dir: str | Path | None = None, config_file: str | None = None,
             overrides: dict[str, Any] | None = None, progress: bool = True, loaded=None) -> dict[str, Any]:
    """Stage 3: the chosen latents as predictors on held-out tasks against baselines; returns
    ``validation/results.json``'s content."""
    cfg = resolve_stage("validate", config, config_file, config_items(run_dir=run_dir, overrides=overrides))
    return run_stage("validate", cfg, progress=progress, loaded=loaded)


def steer(config: Config | None = None, *, run_dir: str | Path | None = None, config_file: str | None = None,
          overrides: dict[str, Any] | None = None, progress: bool = True, loaded=None) -> dict[str, Any]:
    """Stage 4: steering along the chosen latents against control directions; returns
    ``steering/results.json``'s content."""
    cfg = resolve_stage("steer", config, config_file, config_items(run_dir=run_dir, overrides=overrides))
    return run_stage("steer", cfg, progress=progress, loaded=loaded)


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
