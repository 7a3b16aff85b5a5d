"""Planted labels for a run of a random-weight model.

Random weights solve no task, so a build labels every sample incorrect and the analysis, which needs
both classes, stops. For timing and exercising the later stages on such a model, :func:`plant_labels`
marks the samples of every ``every``-th task correct (``task_id % every == 0``) in the saved dataset and
records the new dataset digest in the build marker, exactly as a build that produced those labels
would; the run's results then describe the planted labels, not the model.
"""

from __future__ import annotations

from pathlib import Path

from pva_sae.rundir.artifacts import load_records, save_dataset
from pva_sae.rundir.atomic import atomic_write_json, read_json
from pva_sae.rundir.fingerprints import records_digest
from pva_sae.rundir.paths import RunDir


def plant_labels(run_dir: str | Path, every: int = 3) -> tuple[int, int]:
    """Relabel the finished build of ``run_dir``; returns (samples, samples now correct)."""
    run = RunDir.at(run_dir)
    records = load_records(run.root)
    for record in records:
        record["passed"] = record["task_id"] % every == 0
    metadata = read_json(run.dataset_metadata)
    fmt = "both" if run.dataset_json.is_file() and run.dataset_parquet.is_file() else (
        "json" if run.dataset_json.is_file() else "parquet")
    save_dataset(run, records, metadata, fmt)
    marker = read_json(run.marker("build"))
    marker["outputs"]["records"] = records_digest(run)
    atomic_write_json(run.marker("build"), marker)
    return len(records), sum(r["passed"] for r in records)
