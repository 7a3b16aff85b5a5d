"""The run directory: every path of a run, defined once, and the stage markers.

Readers and writers of the artifacts are in :mod:`pva_sae.rundir.artifacts`; atomic writes in
:mod:`pva_sae.rundir.atomic`.

Layout (``<run>`` is ``output.run_dir``)::

    <run>/config.json                 resolved config of the first stage that created the run
    <run>/manifest.json               versions, git commit, device, model revision, data hash, seeds
    <run>/splits.json                 task ids of the sae / tuning / validation splits
    <run>/logs/<stage>_<timestamp>.log
    <run>/datasets/dataset.json       labelled samples (and dataset.parquet)
    <run>/datasets/dataset_metadata.json
    <run>/datasets/batch_plan.json     resolved batch size (generation.batch_size=0 picks it from free memory)
    <run>/datasets/checkpoints/checkpoint_<start>_<end>_<timestamp>.json
    <run>/datasets/autosaves/autosave_<start>_<end>_<timestamp>.json
    <run>/stages/<stage>.done          written last by a stage that completed
    <run>/shards/build/shard_<I>_of_<N>/  a sharded build's shard: its own datasets/checkpoints/ and autosaves/,
                                      and part.json once done (pva_sae.rundir.shards)
    <run>/cache/labels.sqlite         sandbox labels by content hash, shared by every stage and sub-run
    <run>/analysis/                   AnalysisPaths: config.json, activations.safetensors, scores.safetensors,
                                      ranked_latents.{parquet,json}, summary.json, neuronpedia.json (the top
                                      latents as a Neuronpedia list), plots/
    <run>/validation/                 ValidationPaths: config.json, choices.json (frozen before validation labels
                                      are read), predictor_weights.json (frozen with it), results.json, validation_scores.parquet, temperature/t<T>_<key>/
                                      (sub-runs with this same layout), plots/
    <run>/steering/                   SteeringPaths: config.json, conditions/<key>.json (one per generation
                                      condition), results.json, steered_tasks.parquet, plots/
    <run>/ablation/                   AblationPaths: config.json, conditions/<key>.json, results.json,
                                      ablated_tasks.parquet, plots/
    <run>/attention/                  AttentionPaths: config.json, masses.safetensors (per task, condition,
                                      layer, head and prompt section), results.json, plots/
    <run>/report.html, <run>/report.md

Resume decisions key off the ``.done`` markers and the saved config, never off file times.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pva_sae.rundir.atomic import atomic_write_json, timestamp


@dataclass(frozen=True)
class RunDir:
    """All paths of one run directory."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> "RunDir":
        return cls(Path(path).resolve())

    # --- top level
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    # --- dataset building
    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def dataset_json(self) -> Path:
        return self.datasets / "dataset.json"

    @property
    def dataset_parquet(self) -> Path:
        return self.datasets / "dataset.parquet"

    @property
    def dataset_metadata(self) -> Path:
        return self.datasets / "dataset_metadata.json"

    @property
    def batch_plan(self) -> Path:
        """The resolved generation batch size (so a resumed build rebuilds the same batch plan)."""
        return self.datasets / "batch_plan.json"

    @property
    def checkpoints(self) -> Path:
        return self.datasets / "checkpoints"

    @property
    def autosaves(self) -> Path:
        return self.datasets / "autosaves"

    # --- caches
    @property
    def label_cache(self) -> Path:
        """The sandbox's label cache (pva_sae.execution.label_cache), one per run: a temperature sub-run
        (ValidationPaths.temperature_run, <run>/validation/temperature/<name>) uses its run's."""
        top = self.root
        if top.parent.name == "temperature" and top.parent.parent.name == "validation":
            top = top.parent.parent.parent
        return top / "cache" / "labels.sqlite"

    # --- stage markers
    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.done"

    def is_done(self, stage: str) -> bool:
        return self.marker(stage).is_file()

    def mark_done(self, stage: str, info: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.marker(stage), {"stage": stage, "finished": timestamp(), **(info or {})})

    def clear_done(self, stage: str) -> None:
        if self.marker(stage).exists():
            self.marker(stage).unlink()

    def log_file(self, stage: str) -> Path:
        return self.logs / f"{stage}_{timestamp()}.log"

    def ensure(self) -> "RunDir":
        for d in (self.root, self.logs, self.stages):
            d.mkdir(parents=True, exist_ok=True)
        return self


@dataclass(frozen=True)
class AnalysisPaths:
    root: Path

    @classmethod
    def of(cls, run: RunDir) -> "AnalysisPaths":
        return cls(run.root / "analysis")

    @property
    def config(self) -> Path:
        """The resolved config this stage ran with."""
        return self.root / "config.json"

    @property
    def activations(self) -> Path:
        return self.root / "activations.safetensors"

    @property
    def scores(self) -> Path:
        return self.root / "scores.safetensors"

    @property
    def ranked_parquet(self) -> Path:
        return self.root / "ranked_latents.parquet"

    @property
    def ranked_json(self) -> Path:
        return self.root / "ranked_latents.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def neuronpedia(self) -> Path:
        """The top latents as a Neuronpedia list body (``pva_sae.sae.neuronpedia.neuronpedia_list``)."""
        return self.root / "neuronpedia.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


@dataclass(frozen=True)
class ValidationPaths:
    root: Path

    @classmethod
    def of(cls, run: RunDir) -> "ValidationPaths":
        return cls(run.root / "validation")

    @property
    def config(self) -> Path:
        """The resolved config this stage ran with."""
        return self.root / "config.json"

    @property
    def choices(self) -> Path:
        return self.root / "choices.json"

    @property
    def weights(self) -> Path:
        """Weights of the probe and difference-of-means baselines, frozen with ``choices.json`` (for transfer)."""
        return self.root / "predictor_weights.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def predictions(self) -> Path:
        return self.root / "validation_scores.parquet"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def temperature_run(self, temperature: float, key: str) -> Path:
        """Sub-run directory of one temperature; ``key`` hashes its task set and settings, so a changed
        robustness config gets a fresh directory instead of clashing with the saved one."""
        return self.root / "temperature" / f"t{temperature:g}_{key}"


@dataclass(frozen=True)
class SteeringPaths:
    root: Path

    @classmethod
    def of(cls, run: RunDir) -> "SteeringPaths":
        return cls(run.root / "steering")

    @property
    def config(self) -> Path:
        """The resolved config this stage ran with."""
        return self.root / "config.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def tasks(self) -> Path:
        return self.root / "steered_tasks.parquet"

    @property
    def calls(self) -> Path:
        """Where the stage's time went, call by call (generation, the wait for the last labels); timing only."""
        return self.root / "calls.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def condition(self, key: str) -> Path:
        return self.root / "conditions" / f"{key}.json"


@dataclass(frozen=True)
class AblationPaths:
    root: Path

    @classmethod
    def of(cls, run: RunDir) -> "AblationPaths":
        return cls(run.root / "ablation")

    @property
    def config(self) -> Path:
        """The resolved config this stage ran with."""
        return self.root / "config.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def tasks(self) -> Path:
        return self.root / "ablated_tasks.parquet"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def condition(self, key: str) -> Path:
        return self.root / "conditions" / f"{key}.json"


@dataclass(frozen=True)
class AttentionPaths:
    root: Path

    @classmethod
    def of(cls, run: RunDir) -> "AttentionPaths":
        return cls(run.root / "attention")

    @property
    def config(self) -> Path:
        """The resolved config this stage ran with."""
        return self.root / "config.json"

    @property
    def masses(self) -> Path:
        return self.root / "masses.safetensors"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"
