"""Stage 1, build the labelled dataset: prompt -> generate -> extract -> run the tests -> label.

Orchestration only: :func:`pva_sae.execution.dataset.build_labelled_dataset` does the work (the same
function makes the temperature sub-builds of the validation stage). Writes into the run directory
(paths in :mod:`pva_sae.rundir.paths`): config and manifest first, then splits, checkpoints/autosaves
while working, and finally the dataset (JSON and/or Parquet), its metadata and the ``build`` marker.
Interrupting with Ctrl+C or SIGTERM writes an emergency save; rerunning resumes from the latest save
and produces exactly the records of an uninterrupted run.
"""

from __future__ import annotations

from typing import Any

from pva_sae.config import Config
from pva_sae.execution.dataset import build_labelled_dataset

STAGE = "build"


def build_dataset(cfg: Config, *, interactive: bool | None = None, progress: bool = True,
                  loaded=None) -> list[dict[str, Any]]:
    """Run the whole stage and return the records (sorted by task id, then sample index). ``loaded`` reuses
    a model already in memory (a LoadedModel, or a callable returning one)."""
    return build_labelled_dataset(cfg, interactive=interactive, progress=progress, loaded=loaded)
