"""Sharded execution: one run's generating work split over processes, then merged into the run directory.

Two ways to start the processes, one mechanism (:mod:`pva_sae.rundir.shards`):

- **torchrun** (``torchrun --nproc-per-node N -m pva_sae build ...``): every rank reads ``RANK``,
  ``WORLD_SIZE`` and ``LOCAL_RANK``, joins one ``torch.distributed`` process group (NCCL when CUDA is
  there, one GPU per local rank; gloo on CPU) and is shard ``RANK/WORLD_SIZE``. When every rank has
  written its part, rank 0 alone merges and writes the dataset; the others then read it.
- **independent shards** (``pva-sae build --shard I/N``, e.g. one Slurm array task each): no process
  group; whichever shard finds every part present when it finishes merges, and ``pva-sae merge RUN_DIR``
  merges afterwards.

The build's saved batch plan (``datasets/batch_plan.json``) is published once, by the first shard that
makes it; every shard then runs the batches the plan assigns it (whole, with their global batch index,
so each batch is generated exactly as in a single-process run), checkpointing into its own directory.
A finished shard (its ``part.json`` exists) is never redone; a killed one resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pva_sae.config import BUILD_SECTIONS, Config, config_from_dict
from pva_sae.rundir import shards
from pva_sae.rundir.artifacts import BUILD_STAGE, read_saved_records, read_splits, save_dataset
from pva_sae.rundir.atomic import read_json
from pva_sae.rundir.checkpoint import BuildState
from pva_sae.rundir.fingerprints import invalidate_downstream, records_digest, sections_digest
from pva_sae.rundir.paths import RunDir
from pva_sae.rundir.shards import (
    SHARD_DIR,
    Shard,
    ShardMergeError,
    ShardsPending,
    assign,
    batch_key,
    merge_parts,
    missing_shards,
    parse_shard,
    publish_once,
    read_parts,
    shard_run,
    shards_root,
    write_part,
)

log = logging.getLogger(__name__)

STAGE = BUILD_STAGE
MERGE_FIX = "`pva-sae build --shard {shard} --run-dir RUN_DIR` (the same config)"


# --------------------------------------------------------------------------- ranks and the process group

def shard_of(cfg: Config) -> Shard | None:
    """This process's shard: ``distributed.shard`` (``--shard I/N``) when set, else torchrun's ``RANK`` of
    ``WORLD_SIZE`` (joining the process group), else None (one process does everything)."""
    if cfg.distributed.shard:
        return parse_shard(cfg.distributed.shard)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        join_group(cfg.model.device, cfg.distributed.timeout_s)
        return Shard(dist.get_rank(), dist.get_world_size(), group=True)
    return None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def backend_for(device_spec: str) -> str:
    """NCCL when this process will use a CUDA device, else gloo."""
    return "nccl" if torch.cuda.is_available() and not device_spec.startswith(("cpu", "mps")) else "gloo"


def join_group(device_spec: str, timeout_s: float) -> None:
    """Join the torch.distributed process group torchrun describes (once per process). With NCCL the
    current CUDA device becomes ``cuda:LOCAL_RANK``, so ``model.device=auto`` (or ``cuda``) puts each
    rank's model replica on its own GPU."""
    if dist.is_initialized():
        return
    backend = backend_for(device_spec)
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    log.info("joined the process group: rank %d of %d (%s, local rank %d)", dist.get_rank(),
             dist.get_world_size(), backend, local_rank())


def barrier(shard: Shard | None) -> None:
    """Wait for every rank of the process group (a no-op for independent shards)."""
    if shard is not None and shard.group:
        dist.barrier()


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def from_rank0(value: Any, shard: Shard | None) -> Any:
    """``value`` as rank 0 has it, on every rank of a process group (unchanged otherwise)."""
    if shard is None or not shard.group:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def split_by_key(items: list, key_of: Callable[[Any], Any], all_keys: list, shard: Shard | None) -> tuple[list, list]:
    """(this rank's items, the other ranks' items): in a process group, units are assigned over
    ``all_keys`` (every unit of the call, finished ones included, so every rank computes the same owner
    whatever it already finds on disk); without one, every item is this process's."""
    if shard is None or not shard.group:
        return list(items), []
    owner = assign(set(all_keys), shard.count)
    mine = [item for item in items if owner[key_of(item)] == shard.index]
    if items:
        log.info("rank %d of %d generates %d of %d conditions", shard.index, shard.count, len(mine), len(items))
    return mine, [item for item in items if owner[key_of(item)] != shard.index]


# --------------------------------------------------------------------------- the build's hooks

def work_dir(run: RunDir, shard: Shard | None) -> RunDir:
    """Where a build keeps its checkpoints: the run itself, or the shard's own directory."""
    return run if shard is None else shard_run(run, STAGE, shard)


def part_done(run: RunDir, shard: Shard) -> bool:
    """The shard's part of the build is written: the shard is finished and is never redone."""
    return shards.part_done(run, STAGE, shard)


def publish_plan(run: RunDir, plan: list, info: dict[str, Any], prompt_of: dict[int, str]) -> list:
    """Publish ``plan`` as the run's batch plan unless another shard did first; return the published one
    (same format as ``execution.dataset.write_plan``) with its prompts."""
    body = {**info, "batches": [[[t, s] for t, s, _ in batch] for batch in plan]}
    saved = publish_once(run.batch_plan, body)
    return [[(int(t), int(s), prompt_of[int(t)]) for t, s in batch] for batch in saved["batches"]]


def skip_other_shards(plan: list, state: BuildState, shard: Shard | None) -> int:
    """Mark the batches other shards own as done in ``state`` (so the loop skips them while every batch
    keeps its global index and seed); return how many samples are this shard's."""
    if shard is None:
        return sum(len(b) for b in plan)
    owner = assign([batch_key(b) for b in plan], shard.count)
    state.done_batches |= {i for i, b in enumerate(plan) if owner[batch_key(b)] != shard.index}
    return sum(len(b) for b in plan if owner[batch_key(b)] == shard.index)


def write_build_part(run: RunDir, shard: Shard, plan: list, records: list[dict[str, Any]],
                     info: dict[str, Any]) -> None:
    """The finished shard's part: the keys of its batches and its records sorted by key."""
    owner = assign([batch_key(b) for b in plan], shard.count)
    units = sorted(k for k, s in owner.items() if s == shard.index)
    info = {**info, "backend": dist.get_backend() if shard.group else "independent"}
    write_part(run, STAGE, shard, units, sorted(records, key=record_key), info)


def finish_build_shard(run: RunDir, shard: Shard, metadata_fn: Callable[..., dict[str, Any]]) -> list[dict[str, Any]]:
    """After this shard's part is written: merge when every shard is done and return the whole dataset's
    records; in a process group, rank 0 merges while the others wait, then they read the merged dataset.
    An independent shard that is not the last raises ShardsPending (``pva-sae merge`` merges later)."""
    if shard.group:
        barrier(shard)
        error = [None]
        if shard.primary:
            try:
                merge_build(run, metadata_fn, shard.count)
            except ShardMergeError as exc:
                error = [str(exc)]
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise ShardMergeError(error[0])
        return read_saved_records(run)
    parts = read_parts(run, STAGE)
    waiting = missing_shards(parts, shard.count)
    if waiting:
        raise ShardsPending(f"shard {shard} of {run.root} is done; shard(s) {', '.join(map(str, waiting))} of "
                            f"{shard.count} are not: the last to finish merges, or run `pva-sae merge {run.root}` "
                            "once they have, then the next stage")
    return merge_build(run, metadata_fn, shard.count)


# --------------------------------------------------------------------------- the merge

def record_key(record: dict[str, Any]) -> tuple[int, int]:
    return int(record["task_id"]), int(record["sample_index"])


def shard_counts(run: RunDir, stage: str = STAGE) -> list[int]:
    """The shard counts of the shard directories of ``stage`` (finished or not)."""
    root = shards_root(run, stage)
    found = {int(m.group(2)) for d in (root.iterdir() if root.is_dir() else []) if (m := SHARD_DIR.match(d.name))}
    return sorted(found)


def merge_build(run: RunDir, metadata_fn: Callable[..., dict[str, Any]],
                count: int | None = None) -> list[dict[str, Any]]:
    """Merge the build shards' parts into the run's dataset, metadata and ``build`` marker, as the
    single-process build writes them (records sorted by task id, then sample index). ``metadata_fn`` is
    ``execution.dataset.dataset_metadata``. Refuses (naming the key) unless the parts cover the saved
    batch plan exactly once."""
    if not run.batch_plan.is_file() or not run.config.is_file():
        raise ShardMergeError(f"{run.root} has no saved batch plan or config: no sharded build started there; "
                              f"start one with {MERGE_FIX.replace('{shard}', '0/N')}")
    counts = shard_counts(run)
    if not counts:
        raise ShardMergeError(f"{run.root} has no shard directories ({shards_root(run, STAGE)}); build it with "
                              + MERGE_FIX.replace("{shard}", "I/N") + " for each I")
    count = count or counts[-1]
    cfg = config_from_dict(read_json(run.config))
    plan = read_json(run.batch_plan)["batches"]
    parts = read_parts(run, STAGE)
    records = merge_parts(parts, [batch_key(b) for b in plan], count, record_key, MERGE_FIX)
    manifest = read_json(run.manifest)
    previous = records_digest(run)
    elapsed = max((p["info"].get("elapsed_s", 0.0) for p in parts), default=0.0)   # the slowest shard
    metadata = metadata_fn(records, read_splits(run), None, elapsed, manifest, cfg)
    sandbox: Counter = Counter()
    for part in parts:
        sandbox.update(part["info"].get("sandbox", {}))
    metadata["sandbox"] = {"protections": manifest["sandbox"], "this_session": dict(sandbox)}
    save_dataset(run, records, metadata, cfg.output.save_format)
    digest = records_digest(run)
    if previous is not None and previous != digest:
        cleared = invalidate_downstream(run, STAGE)
        if cleared:
            log.warning("the dataset changed: cleared the markers of %s (they read the old one)", ", ".join(cleared))
    run.mark_done(STAGE, {"n_records": len(records), "pass_rate": metadata["pass_rate"]["overall"],
                          "inputs": {"config": sections_digest(cfg.to_dict(), BUILD_SECTIONS),
                                     "model_revision": manifest["model"]["revision"],
                                     "dataset_sha256": manifest["dataset"]["sha256"]},
                          "outputs": {"records": digest},
                          "shards": {"count": count,
                                     "devices": sorted({p["info"].get("device", "?") for p in parts}),
                                     "backend": sorted({p["info"].get("backend", "?") for p in parts})}})
    log.info("merged %d shard part(s) into %s (%d records)", len(parts), run.datasets, len(records))
    return records
