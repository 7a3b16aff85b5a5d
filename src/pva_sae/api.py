"""Python API for notebooks: configs, the config each stage runs with, and a run directory's results as pandas
tables. The stage calls (``pva_sae.build_dataset``, ``analyze``, ``validate``, ``steer``, ``report``, ``run``) are
in :mod:`pva_sae.pipeline` (which runs them through :mod:`pva_sae.stages`); the package exports both.

    >>> import pva_sae
    >>> pva_sae.build_dataset(run_dir="runs/demo", end_idx=79)       # stage 1 on the embedded default
    >>> pva_sae.analyze(run_dir="runs/demo")                         # stages 2-4 read the run's own config
    >>> pva_sae.validate(run_dir="runs/demo"); pva_sae.steer(run_dir="runs/demo"); pva_sae.report("runs/demo")
    >>> run = pva_sae.load_run("runs/demo")
    >>> run.ranked.head(); run.validation_scores.describe()

Each stage takes a :class:`~pva_sae.config.Config` or keyword overrides: the named keywords map to one config
field each, anything else goes through ``overrides`` (``{"generation.temperature": 0.5}``) or a config file.
After the build, the run directory is the source of truth (as on the command line): a stage's keywords start
from the config the run was made with, and a change to an upstream setting is refused with the field named.
``loaded`` (a model from :func:`pva_sae.model.registry.load_model`) lets a notebook load the model once for
every stage. A notebook has no prompt to answer, so an interrupted build resumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pva_sae.config import Config, config_from_dict, resolve_config
from pva_sae.errors import InputError, MissingInputError
from pva_sae.model.registry import resolve_for_model
from pva_sae.rundir.artifacts import (
    load_ranked,
    load_records,
    read_analysis_summary,
    read_steered_tasks,
    read_steering_results,
    read_validation_results,
    read_validation_scores,
)
from pva_sae.rundir.atomic import read_json
from pva_sae.rundir.paths import AblationPaths, AnalysisPaths, AttentionPaths, RunDir, SteeringPaths, ValidationPaths
from pva_sae.summary import steering_summary, validation_summary

STAGES = ("build", "analyze", "validate", "steer")


def make_config(model: str | None = None, *, start_idx: int | None = None, end_idx: int | None = None,
                save_format: str | None = None, run_dir: str | Path | None = None, resume: str | None = None,
                resume_from: str | None = None, config_file: str | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """A validated Config from keyword arguments (None keeps the default or file value), with the model's
    registered defaults under the file and the keywords."""
    return resolve_for_model(config_file, config_items(model=model, start_idx=start_idx, end_idx=end_idx,
                                                       save_format=save_format, run_dir=run_dir, resume=resume,
                                                       resume_from=resume_from, overrides=overrides))


def stage_config(stage: str, config_file: str | None = None, items: list[str] | None = None) -> Config:
    """The config a stage after the build runs with: the config its run directory was made with (the stage's
    own earlier one, else that of the stage before it, back to the build's), then ``config_file``, then ``items``
    (``key=value``). Without a saved config (a new run directory) it is the defaults with the model's registered
    ones. A stage refuses an override of a setting its inputs were made with, naming the field."""
    before = {"build": [], "analyze": [AnalysisPaths], "validate": [ValidationPaths, AnalysisPaths],
              "steer": [SteeringPaths, ValidationPaths, AnalysisPaths]}
    before |= {"ablate": [AblationPaths, *before["steer"]], "attention": [AttentionPaths, *before["steer"]]}
    if stage not in before:
        raise InputError(f"unknown stage {stage!r}: use one of {', '.join(before)}")
    cfg = resolve_for_model(config_file, items or [])
    run = RunDir.at(cfg.output.run_dir)
    chain = [paths.of(run).config for paths in before[stage]] + [run.config]
    base = next((path for path in chain if path.is_file()), None)
    return cfg if base is None else resolve_config(config_file, items or [], base=read_json(base))


def config_items(*, model=None, start_idx=None, end_idx=None, save_format=None, run_dir=None, resume=None,
                 resume_from=None, overrides=None) -> list[str]:
    """The named keywords and ``overrides`` as ``key=value`` items (None: not set)."""
    pairs = {"model.name": model, "data.start_idx": start_idx, "data.end_idx": end_idx,
             "output.save_format": save_format, "output.run_dir": run_dir, "checkpoint.resume": resume,
             "checkpoint.resume_from": resume_from, **(overrides or {})}
    return [f"{k}={_text(v)}" for k, v in pairs.items() if v is not None]


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def resolve_stage(stage: str, config: Config | None, config_file: str | None, items: list[str]) -> Config:
    """``config`` with ``items`` on top, or (no config) the stage's config from its run directory."""
    if config is None:
        return resolve_for_model(config_file, items) if stage in ("build", "run") \
            else stage_config(stage, config_file, items)
    if not isinstance(config, Config):
        raise InputError(f"config must be a pva_sae.config.Config (e.g. from pva_sae.make_config), not "
                         f"{type(config).__name__}; pass a run directory as run_dir=")
    if config_file is not None:
        raise InputError("pass either a Config or config_file, not both")
    return resolve_config(overrides=items, base=config.to_dict()) if items else config


# --------------------------------------------------------------------------- reading a run

@dataclass(repr=False)
class Run:
    """A run directory's results. A stage that has not run leaves its fields None."""

    root: Path
    config: Config                                    # the config of the latest stage that ran
    stages_done: tuple[str, ...]
    records: pd.DataFrame                             # one row per (task, sample): program, label, timings
    analysis: dict[str, Any] | None = None            # analysis/summary.json
    ranked: pd.DataFrame | None = None                # ranked latents (scope, direction, metric, layer, latent)
    validation: dict[str, Any] | None = None          # validation/results.json
    validation_scores: pd.DataFrame | None = None     # per validation task: label, difficulty, every score
    steering: dict[str, Any] | None = None            # steering/results.json
    steered_tasks: pd.DataFrame | None = None         # per task and condition: steered outcome
    summary_lines: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """The headline lines of validation and steering (as printed by the CLI); empty before validation."""
        lines = validation_summary(self.validation) if self.validation is not None else []
        return lines + (steering_summary(self.steering) if self.steering is not None else [])

    def __repr__(self) -> str:
        tables = ", ".join(f"{name} {df.shape[0]}x{df.shape[1]}" for name, df in
                           (("records", self.records), ("ranked", self.ranked),
                            ("validation_scores", self.validation_scores), ("steered_tasks", self.steered_tasks))
                           if df is not None)
        return f"Run({str(self.root)!r}, stages done: {', '.join(self.stages_done) or 'none'}; {tables})"


def load_run(run_dir: str | Path) -> Run:
    """The results of a run directory as pandas DataFrames and dicts, read through :mod:`pva_sae.rundir.artifacts`.

    The build must have finished; each later stage is optional (None until it has run). A stage marked done
    whose artifact is missing raises MissingInputError naming the stage to rerun.
    """
    run = RunDir.at(run_dir)
    if not run.config.is_file():
        raise MissingInputError(f"{run.root} is not a run directory (no config.json); run "
                                f"`pva-sae build --run-dir {run.root}` or pva_sae.build_dataset(run_dir=...) first")
    done = tuple(s for s in STAGES if run.is_done(s))
    records = pd.DataFrame(load_records(run.root))
    analysis, validation, steering = AnalysisPaths.of(run), ValidationPaths.of(run), SteeringPaths.of(run)
    out = Run(root=run.root, config=_latest_config(run, done), stages_done=done, records=records)
    if "analyze" in done:
        _need(run, "analyze", analysis.summary, analysis.ranked_json)
        out.analysis, out.ranked = read_analysis_summary(analysis), pd.DataFrame(load_ranked(analysis))
    if "validate" in done:
        _need(run, "validate", validation.results, validation.predictions)
        out.validation = read_validation_results(validation)
        out.validation_scores = pd.DataFrame(read_validation_scores(validation))
    if "steer" in done:
        _need(run, "steer", steering.results, steering.tasks)
        out.steering, out.steered_tasks = read_steering_results(steering), pd.DataFrame(read_steered_tasks(steering))
    return out


def _need(run: RunDir, stage: str, *paths: Path) -> None:
    missing = [str(p.relative_to(run.root)) for p in paths if not p.is_file()]
    if missing:
        raise MissingInputError(f"{run.root}: the {stage} stage is marked done but {', '.join(missing)} is missing; "
                                f"rerun `pva-sae {stage} --run-dir {run.root}`")


def _latest_config(run: RunDir, done: tuple[str, ...]) -> Config:
    saved = {"build": run.config, "analyze": AnalysisPaths.of(run).config,
             "validate": ValidationPaths.of(run).config, "steer": SteeringPaths.of(run).config}
    path = next((saved[s] for s in reversed(done) if saved[s].is_file()), run.config)
    return config_from_dict(read_json(path))
