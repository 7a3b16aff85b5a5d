"""A labelled dataset in a run directory: prompt -> generate -> extract -> run the tests -> label.

The build stage and the validation stage's temperature sub-builds both call
:func:`build_labelled_dataset`. Writes into the run directory (paths in :mod:`pva_sae.rundir.paths`):
config and manifest first, then splits, checkpoints/autosaves while working, and finally the dataset
(JSON and/or Parquet), its metadata and the stage marker. Interrupting with Ctrl+C or SIGTERM writes an emergency save; rerunning
resumes from the latest save and produces exactly the records of an uninterrupted run.
"""

from __future__ import annotations

import logging
import signal
import statistics
import time
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

from tqdm.auto import tqdm

from pva_sae.config import BUILD_SECTIONS, Config, diff_configs
from pva_sae.data import mbpp as data
from pva_sae.data import prompts
from pva_sae.errors import PvaSaeError
from pva_sae.execution.label import label_samples
from pva_sae.model.generation import (
    Generator,
    batch_token_budget,
    plan_batches,
    resolve_batch_size,
)
from pva_sae.model.registry import load_model
from pva_sae.rundir.artifacts import (
    BUILD_STAGE,
    read_saved_records,
    save_dataset,
    write_splits,
)
from pva_sae.rundir.atomic import atomic_write_json, read_json
from pva_sae.rundir.checkpoint import BuildState, Checkpointer, decide_resume
from pva_sae.rundir.fingerprints import (
    invalidate_downstream,
    records_digest,
    sections_digest,
)
from pva_sae.rundir.logs import setup_logging
from pva_sae.rundir.manifest import base_manifest, device_info
from pva_sae.rundir.paths import RunDir

log = logging.getLogger(__name__)

STAGE = BUILD_STAGE  # a labelled dataset is what a finished "build" marker certifies
EXIT_INTERRUPTED = 130


class BuildInterrupted(Exception):
    """Raised inside the build loop when SIGINT/SIGTERM arrives, after the emergency save."""

    def __init__(self, signum: int, save_path: Any):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; emergency save at {save_path}")
        self.signum, self.save_path = signum, save_path


class ConfigMismatch(PvaSaeError, RuntimeError):
    """The run directory belongs to a run with another config."""


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into KeyboardInterrupt so the loop can save before exiting."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def prepare_run(cfg: Config, stage: str = STAGE) -> RunDir:
    """Create the run directory and write (or check) its config before any work."""
    run = RunDir.at(cfg.output.run_dir).ensure()
    current = cfg.to_dict()
    if run.config.is_file():
        saved = read_json(run.config)
        differing = [k for k in diff_configs(saved, current) if k.split(".")[0] in BUILD_SECTIONS]
        if differing and cfg.checkpoint.resume != "never":
            raise ConfigMismatch(
                f"run directory {run.root} was created with another config; differing fields: "
                f"{', '.join(differing)}. Use the same config, another --run-dir, or --no-resume to start over.")
    atomic_write_json(run.config, current)
    return run


def build_labelled_dataset(cfg: Config, *, interactive: bool | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Generate and label every (task, sample) of ``cfg`` in ``cfg.output.run_dir``; return the records
    (sorted by task id, then sample index). The run directory gets the ``build`` marker when done."""

    run = prepare_run(cfg)
    log_path = setup_logging(run.log_file(STAGE))
    log.info("build stage starting; log at %s", log_path)

    tasks_all = data.load_tasks(cfg.data.source)
    tasks = data.select_range(tasks_all, cfg.data.start_idx, cfg.data.end_idx)
    if cfg.data.task_ids is not None:
        tasks = data.select_ids(tasks, cfg.data.task_ids)
    splits = data.make_splits(tasks_all, cfg.data.split_fractions, cfg.data.split_seed)
    split_of = {tid: name for name, ids in splits.items() for tid in ids}
    write_splits(run, cfg.data.split_seed, cfg.data.split_fractions, splits, data.split_summary(tasks_all, splits))

    loaded = load_model(cfg.model)
    manifest = base_manifest(STAGE, {"split_seed": cfg.data.split_seed, "generation_seed": cfg.generation.seed})
    manifest.update({
        "model": {"name": cfg.model.name, "source": loaded.source, "path_or_id": loaded.path_or_id,
                  "revision": loaded.revision, "dtype": str(loaded.dtype), "family": loaded.family,
                  "n_layers": loaded.n_layers, "d_model": loaded.d_model},
        "device": device_info(loaded.device),
        "dataset": {"source": cfg.data.source, "sha256": data.dataset_sha256(cfg.data.source),
                    "n_tasks_total": len(tasks_all), "n_tasks_selected": len(tasks)},
    })
    atomic_write_json(run.manifest, manifest)

    by_id = {t.task_id: t for t in tasks}
    prompt_list = [(t.task_id, prompts.build_prompt(t, cfg.prompt.template, cfg.prompt.initiator)) for t in tasks]
    generator = Generator(loaded, cfg.generation)
    batch_size = _planned_batch_size(run, cfg, generator, [p for _, p in prompt_list])
    plan = plan_batches(prompt_list, loaded.tokenizer, batch_size, cfg.generation.n_samples,
                        cfg.generation.sort_by_length, batch_token_budget(cfg.generation.max_batch_tokens, loaded.device),
                        cfg.generation.max_new_tokens)
    checkpointer = Checkpointer(run, cfg.checkpoint, cfg.to_dict(), cfg.data.start_idx,
                                cfg.data.end_idx if cfg.data.end_idx is not None else len(tasks_all) - 1)
    if run.is_done(STAGE) and cfg.checkpoint.resume != "never" and not cfg.checkpoint.resume_from:
        log.warning("build already complete in %s; returning the saved dataset", run.root)
        return read_saved_records(run)
    previous = records_digest(run)
    run.clear_done(STAGE)
    state = decide_resume(checkpointer, cfg.checkpoint, interactive)

    started = time.perf_counter()
    try:
        with _signals_raise():
            _generate_and_label(plan, state, generator, by_id, split_of, cfg, checkpointer, progress)
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        path = checkpointer.save(state, "emergency")
        log.error("interrupted (%s): emergency save with %d records at %s; rerun the same command to resume",
                  signal.Signals(signum).name, state.n_records, path)
        raise BuildInterrupted(signum, path) from None
    elapsed = time.perf_counter() - started

    records = sorted(state.records, key=lambda r: (r["task_id"], r["sample_index"]))
    checkpointer.save(BuildState(records, state.done_batches, state.sequence), "checkpoint")
    metadata = dataset_metadata(records, splits, tasks, elapsed, manifest, cfg)
    save_dataset(run, records, metadata, cfg.output.save_format)
    digest = records_digest(run)
    if previous is not None and previous != digest:
        cleared = invalidate_downstream(run, STAGE)
        if cleared:
            log.warning("the dataset changed: cleared the markers of %s (they read the old one)", ", ".join(cleared))
    run.mark_done(STAGE, {"n_records": len(records), "pass_rate": metadata["pass_rate"]["overall"],
                          "inputs": {"config": sections_digest(cfg.to_dict(), BUILD_SECTIONS),
                                     "model_revision": loaded.revision,
                                     "dataset_sha256": manifest["dataset"]["sha256"]},
                          "outputs": {"records": digest}})
    log.info("dataset written to %s (%d records, pass rate %.3f)", run.datasets, len(records),
             metadata["pass_rate"]["overall"])
    return records


def _planned_batch_size(run: RunDir, cfg: Config, generator, prompts: list[str]) -> int:
    """generation.batch_size, resolved once per run: with 0 (from free memory) a resumed build reuses the
    size its first attempt chose, since the checkpointed batch indices refer to that plan."""

    if cfg.generation.batch_size == 0 and run.batch_plan.is_file() and cfg.checkpoint.resume != "never":
        size = int(read_json(run.batch_plan)["batch_size"])
    else:
        size = resolve_batch_size(generator, prompts)
    atomic_write_json(run.batch_plan, {"batch_size": size, "configured": cfg.generation.batch_size})
    return size


def _generate_and_label(plan, state: BuildState, generator, by_id, split_of, cfg: Config,
                        checkpointer: Checkpointer, progress: bool) -> None:

    total = sum(len(b) for b in plan)
    bar = tqdm(total=total, initial=state.n_records, desc="build", unit="sample", disable=not progress,
               dynamic_ncols=True)
    n_pass = sum(1 for r in state.records if r["passed"])
    try:
        for batch_index, batch in enumerate(plan):
            if batch_index in state.done_batches:
                continue
            new = label_samples(generator.generate_batch(batch, batch_index), by_id, split_of, cfg)
            # The batch's records and its "done" mark change together, so a save never holds half a batch.
            state.records.extend(new)
            state.done_batches.add(batch_index)
            n_pass += sum(r["passed"] for r in new)
            bar.update(len(new))
            bar.set_postfix(pass_rate=f"{n_pass / max(state.n_records, 1):.3f}")
            checkpointer.maybe_save(state)
    finally:
        bar.close()


def _rate(records: list[dict[str, Any]]) -> float | None:
    return sum(r["passed"] for r in records) / len(records) if records else None


def dataset_metadata(records, splits, tasks, elapsed_s: float, manifest: dict, cfg: Config) -> dict[str, Any]:
    """Statistics written beside the dataset."""
    by_split = {name: [r for r in records if r["split"] == name] for name in splits}
    by_diff = {d: [r for r in records if r["difficulty"] == d] for d in ("easy", "medium", "hard")}
    new_tokens = sum(r["n_new_tokens"] for r in records)
    gen_time = sum(r["gen_time_s"] for r in records)
    return {
        "n_records": len(records),
        "n_tasks": len({r["task_id"] for r in records}),
        "pass_rate": {
            "overall": _rate(records),
            "by_split": {k: _rate(v) for k, v in by_split.items()},
            "by_difficulty": {k: _rate(v) for k, v in by_diff.items()},
        },
        "counts": {
            "passed": sum(r["passed"] for r in records),
            "by_split": {k: len(v) for k, v in by_split.items()},
            "by_difficulty": {k: len(v) for k, v in by_diff.items()},
        },
        "status_counts": dict(Counter(r["status"] for r in records)),
        "error_type_counts": dict(Counter(r["error_type"] for r in records if r["error_type"])),
        "finish_reason_counts": dict(Counter(r["finish_reason"] for r in records)),
        "timing": {
            "elapsed_s": elapsed_s,
            "generation_s": gen_time,
            "new_tokens": new_tokens,
            "tokens_per_s": new_tokens / gen_time if gen_time > 0 else None,
            "mean_exec_s": statistics.fmean(r["exec_time_s"] for r in records) if records else None,
        },
        "model": manifest.get("model"),
        "device": manifest.get("device"),
        "generation": cfg.to_dict()["generation"],
        "task_range": [cfg.data.start_idx, cfg.data.end_idx],
    }


