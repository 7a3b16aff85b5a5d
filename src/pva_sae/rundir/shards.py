"""Shards of a generating stage: which process does which unit of work, each shard's part, and the merge.

A unit is what a stage generates in one go and can name by a stable key: a batch of the build's saved
batch plan (keyed by its first ``(task_id, sample_index)``, so its global batch index, and hence its
seed, is the one a single-process run uses), or a steering condition (keyed by its condition key). The
shard of a unit is a function of the set of keys alone: keys sorted, the i-th to shard ``i mod N``. It
never depends on plan order, on which rank started first or on how far an earlier attempt got, so a
restarted shard owns exactly the units it owned before.

Layout, under the run (or sub-run) directory of the stage::

    <run>/shards/<stage>/shard_<I>_of_<N>/datasets/checkpoints/...   the shard's own checkpoints and journal
    <run>/shards/<stage>/shard_<I>_of_<N>/datasets/autosaves/...
    <run>/shards/<stage>/shard_<I>_of_<N>/part.json                  written last and atomically: the shard is done

The merge reads every ``part.json``, refuses unless every unit of the plan is in exactly one part (naming
a missing or duplicated key and the shard that owns it) and every record key is present once, and
returns the records sorted by key: the order a single-process run writes.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pva_sae.errors import InputError, PvaSaeError
from pva_sae.rundir.atomic import atomic_write_json, current_umask, read_json
from pva_sae.rundir.paths import RunDir

SHARD_DIR = re.compile(r"^shard_(\d+)_of_(\d+)$")


class ShardMergeError(InputError):
    """The shards' parts do not cover the plan exactly once; the message names the key and the fix."""


class ShardsPending(PvaSaeError):
    """This independent shard finished its part, other shards of the stage have not: the stage's outputs
    do not exist yet, so a command stops here (exit status 0) instead of going on with part of the data."""

    exit_status = 0


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based). ``group`` is true when the shards run as one
    torch.distributed process group (torchrun), false for independent processes (Slurm array tasks)."""

    index: int
    count: int
    group: bool = False

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        return f"shard_{self.index}_of_{self.count}"

    @property
    def primary(self) -> bool:
        """Shard 0 writes the artifacts every shard shares (the merged outputs of a process group)."""
        return self.index == 0


def parse_shard(text: str) -> Shard:
    """``"I/N"`` (0 <= I < N) as a Shard; InputError names the bad value."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise InputError(f"shard {text!r} is not I/N with 0 <= I < N (e.g. --shard 0/4 for the first of four "
                         "shards; in a Slurm array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return Shard(int(match.group(1)), int(match.group(2)))


# --------------------------------------------------------------------------- assignment by key

def assign(keys: Iterable[Hashable], count: int) -> dict[Any, int]:
    """{key: shard index}: keys sorted, the i-th to shard ``i mod count`` (balanced, and a function of the
    set of keys alone). Duplicated keys are refused: a key names one unit."""
    ordered = sorted(keys)
    for a, b in itertools.pairwise(ordered):
        if a == b:
            raise InputError(f"unit key {format_key(a)} appears twice; keys must name one unit each")
    return {key: i % count for i, key in enumerate(ordered)}


def batch_key(batch: Sequence[Sequence[Any]]) -> tuple[int, int]:
    """The stable key of a batch of the saved plan: its smallest ``(task_id, sample_index)``."""
    return min((int(item[0]), int(item[1])) for item in batch)


def format_key(key: Any) -> str:
    if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int) for k in key):
        return f"task {key[0]} sample {key[1]}"
    return str(key)


# --------------------------------------------------------------------------- paths and parts

def shards_root(run: RunDir, stage: str) -> Path:
    return run.root / "shards" / stage


def shard_run(run: RunDir, stage: str, shard: Shard) -> RunDir:
    """The shard's own directory, laid out as a run directory so the checkpointer works in it unchanged."""
    return RunDir(shards_root(run, stage) / shard.name)


def part_path(run: RunDir, stage: str, shard: Shard) -> Path:
    return shard_run(run, stage, shard).root / "part.json"


def part_done(run: RunDir, stage: str, shard: Shard) -> bool:
    return part_path(run, stage, shard).is_file()


def write_part(run: RunDir, stage: str, shard: Shard, units: Sequence[Any], records: list[dict[str, Any]],
               info: dict[str, Any]) -> Path:
    """The finished shard: its unit keys, its records and ``info`` (device, timing, counters), atomically."""
    path = part_path(run, stage, shard)
    atomic_write_json(path, {"stage": stage, "shard": shard.index, "count": shard.count,
                             "units": [list(u) if isinstance(u, tuple) else u for u in units],
                             "records": records, "info": info})
    return path


def read_parts(run: RunDir, stage: str) -> list[dict[str, Any]]:
    """Every finished part of ``stage`` (any shard count), each with ``path``; sorted by (count, index)."""
    root = shards_root(run, stage)
    parts = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if SHARD_DIR.match(folder.name) and (folder / "part.json").is_file():
            part = read_json(folder / "part.json")
            part["path"] = str(folder / "part.json")
            part["units"] = [tuple(u) if isinstance(u, list) else u for u in part["units"]]
            parts.append(part)
    return sorted(parts, key=lambda p: (p["count"], p["shard"]))


def missing_shards(parts: list[dict[str, Any]], count: int) -> list[int]:
    done = {p["shard"] for p in parts if p["count"] == count}
    return [i for i in range(count) if i not in done]


def merge_parts(parts: list[dict[str, Any]], units: Sequence[Any], count: int,
                record_key: Callable[[dict[str, Any]], Any], fix: str) -> list[dict[str, Any]]:
    """The records of every part, sorted by ``record_key``, after checking that each unit of the plan is
    in exactly one part (and no part holds a unit outside it) and each record key occurs once. ``fix`` is
    the command that produces a missing shard (``{shard}`` is replaced by ``I/N``)."""
    owner = assign(units, count)
    seen: dict[Any, str] = {}
    for part in parts:
        for unit in part["units"]:
            if unit not in owner:
                raise ShardMergeError(f"{part['path']} holds {format_key(unit)}, which is not in the saved plan: "
                                      "it belongs to another run; delete that shard directory and rerun it")
            if unit in seen:
                raise ShardMergeError(f"{format_key(unit)} is duplicated: in {seen[unit]} and in {part['path']}; "
                                      "delete the part of the wrong shard count and merge again")
            seen[unit] = part["path"]
    missing = [u for u in sorted(owner) if u not in seen]
    if missing:
        shard = owner[missing[0]]
        raise ShardMergeError(f"{format_key(missing[0])} is missing ({len(missing)} unit(s) in all): shard "
                              f"{shard}/{count} has not finished; run " + fix.replace("{shard}", f"{shard}/{count}")
                              + " and merge again")
    records = [r for part in parts for r in part["records"]]
    records.sort(key=record_key)
    for a, b in itertools.pairwise(records):
        if record_key(a) == record_key(b):
            raise ShardMergeError(f"record {format_key(record_key(a))} is duplicated across the shards' parts; "
                                  "delete the parts and rerun the shards")
    return records


# --------------------------------------------------------------------------- shared files, first writer wins

def publish_once(path: Path, body: Any) -> Any:
    """Write ``body`` as JSON at ``path`` unless a file is already there; return what is there afterwards.

    The file is complete before it appears (written beside it, then hard-linked into place, which fails
    when the name exists), so shards starting together agree on the first one published, on a local
    filesystem and on NFS alike."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                os.fchmod(fh.fileno(), 0o666 & ~current_umask())
                fh.write(json.dumps(body, indent=2) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    return read_json(path)
