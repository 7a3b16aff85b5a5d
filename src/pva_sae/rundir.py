"""The run directory: every path of a run defined once, atomic writes, stage markers, manifest.

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

Resume decisions key off the ``.done`` markers and the saved config, never off file times.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``.

    A crash (even SIGKILL) leaves either the old file or the new one, never half of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_parquet(path: Path, rows: list[dict[str, Any]] | dict[str, list[Any]]) -> None:
    """A Parquet file from a list of row dicts or a dict of columns, written atomically."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(rows) if isinstance(rows, dict) else pa.Table.from_pylist(rows), buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def timestamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")


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
