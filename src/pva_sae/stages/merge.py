"""``pva-sae merge RUN_DIR``: the shards' parts of a sharded build merged into the run directory.

Orchestration only: :func:`pva_sae.execution.distributed.merge_build` checks that every batch of the
saved plan is in exactly one shard's part (naming a missing or duplicated key and the command that
produces it) and writes the dataset, its metadata and the ``build`` marker as a single-process build
does. The run's build and every temperature sub-build of the validation stage that was sharded and not
yet merged are merged. A sharded build merges itself when its last shard finishes; this command is for
independent shards (Slurm array tasks) that finished in any order.
"""

from __future__ import annotations

from pathlib import Path

from pva_sae.execution.dataset import dataset_metadata
from pva_sae.execution.distributed import STAGE, merge_build, shard_counts
from pva_sae.rundir.paths import RunDir, ValidationPaths
from pva_sae.rundir.shards import ShardMergeError


def sharded_builds(run: RunDir) -> list[RunDir]:
    """The run and its temperature sub-runs that have build shards."""
    folder = ValidationPaths.of(run).root / "temperature"
    subs = [RunDir(p) for p in sorted(folder.iterdir())] if folder.is_dir() else []
    return [r for r in (run, *subs) if shard_counts(r, STAGE)]


def merge(run_dir: str | Path) -> dict[str, int]:
    """Merge every sharded, unmerged build under ``run_dir``; return {run directory: records merged}.
    A build already merged (its ``build`` marker present) is left as it is."""
    run = RunDir.at(run_dir)
    builds = sharded_builds(run)
    if not builds:
        raise ShardMergeError(f"{run.root} holds no sharded build (no shards/{STAGE}/shard_I_of_N directories); "
                              "start one with `pva-sae build --shard I/N` for each I, or torchrun")
    return {str(b.root): len(merge_build(b, dataset_metadata)) for b in builds if not b.is_done(STAGE)}
