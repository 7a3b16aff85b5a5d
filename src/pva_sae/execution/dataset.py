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

from pva_sae.config import BUILD_SECTIONS, Config, record_fields_differing
from pva_sae.data import mbpp as data
from pva_sae.data import prompts
from pva_sae.errors import PvaSaeError
from pva_sae.execution.label import label_samples
from pva_sae.execution.sandbox import BatchStats, check_sandbox_config, probe
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
from pva_sae.rundir.checkpoint import BuildState, Checkpointer, CheckpointError, decide_resume
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


def check_run_config(cfg: Config) -> RunDir:
    """The run directory, after checking (without writing anything) that its saved config does not
    conflict with ``cfg`` in a field that changes the records."""
    run = RunDir.at(cfg.output.run_dir)
    if run.config.is_file() and cfg.checkpoint.resume != "never":
        differing = record_fields_differing(read_json(run.config), cfg.to_dict())
        if differing:
            raise ConfigMismatch(
                f"run directory {run.root} was created with another config; differing fields: "
                f"{', '.join(differing)}. Use the same config, another --run-dir, or --no-resume to start over.")
    return run


def prepare_run(cfg: Config, stage: str = STAGE) -> RunDir:
    """Check the run directory's config against ``cfg``, then create the directory and write the config."""
    run = check_run_config(cfg).ensure()
    atomic_write_json(run.config, cfg.to_dict())
    return run


def build_labelled_dataset(cfg: Config, *, interactive: bool | None = None, progress: bool = True,
                           loaded=None) -> list[dict[str, Any]]:
    """Generate and label every (task, sample) of ``cfg`` in ``cfg.output.run_dir``; return the records
    (sorted by task id, then sample index). The run directory gets the ``build`` marker when done.

    Everything that can refuse (the config against the run's, the sandbox settings, the data, the resume
    decision) is checked before anything is written or the model is loaded, so a refused command leaves
    the run directory as it was. ``loaded`` reuses a model already in memory.
    """
    run = check_run_config(cfg)
    check_sandbox_config(cfg.sandbox)
    tasks_all = data.load_tasks(cfg.data.source)
    tasks = data.select_range(tasks_all, cfg.data.start_idx, cfg.data.end_idx)
    if cfg.data.task_ids is not None:
        tasks = data.select_ids(tasks, cfg.data.task_ids)
    splits = data.make_splits(tasks_all, cfg.data.split_fractions, cfg.data.split_seed)
    split_of = {tid: name for name, ids in splits.items() for tid in ids}
    if run.is_done(STAGE) and cfg.checkpoint.resume != "never" and not cfg.checkpoint.resume_from:
        log.warning("build already complete in %s; returning the saved dataset", run.root)
        return read_saved_records(run)
    checkpointer = Checkpointer(run, cfg.checkpoint, cfg.to_dict(), cfg.data.start_idx,
                                cfg.data.end_idx if cfg.data.end_idx is not None else len(tasks_all) - 1)
    state = decide_resume(checkpointer, cfg.checkpoint, interactive)
    saved_plan = read_plan(run) if state.n_records else None
    if state.n_records and saved_plan is None:
        raise CheckpointError(f"{run.root} has a checkpoint but no saved batch plan ({run.batch_plan}): its batch "
                              "indices cannot be mapped to tasks; start over with --no-resume")

    run.ensure()
    atomic_write_json(run.config, cfg.to_dict())
    log_path = setup_logging(run.log_file(STAGE))
    log.info("build stage starting; log at %s", log_path)
    write_splits(run, cfg.data.split_seed, cfg.data.split_fractions, splits, data.split_summary(tasks_all, splits))
    loaded = loaded or load_model(cfg.model)
    manifest = base_manifest(STAGE, {"split_seed": cfg.data.split_seed, "generation_seed": cfg.generation.seed})
    manifest.update({
        "model": {"name": cfg.model.name, "source": loaded.source, "path_or_id": loaded.path_or_id,
                  "revision": loaded.revision, "dtype": str(loaded.dtype), "family": loaded.family,
                  "n_layers": loaded.n_layers, "d_model": loaded.d_model, "torch_threads": loaded.torch_threads},
        "device": device_info(loaded.device),
        "dataset": {"source": cfg.data.source, "sha256": data.dataset_sha256(cfg.data.source),
                    "n_tasks_total": len(tasks_all), "n_tasks_selected": len(tasks)},
        "sandbox": probe(cfg.sandbox),
    })
    atomic_write_json(run.manifest, manifest)

    by_id = {t.task_id: t for t in tasks}
    prompt_list = [(t.task_id, prompts.build_prompt(t, cfg.prompt.template, cfg.prompt.initiator)) for t in tasks]
    generator = Generator(loaded, cfg.generation)
    if saved_plan is not None:
        plan = plan_from_saved(saved_plan, dict(prompt_list), cfg.generation.n_samples, run)
    else:
        size = resolve_batch_size(generator, [p for _, p in prompt_list])
        plan = plan_batches(prompt_list, loaded.tokenizer, size, cfg.generation.n_samples,
                            cfg.generation.sort_by_length,
                            batch_token_budget(cfg.generation.max_batch_tokens, loaded.device),
                            cfg.generation.max_new_tokens)
        write_plan(run, plan, {"batch_size": size, "configured_batch_size": cfg.generation.batch_size,
                               "backend": generator.backend, "dtype": str(loaded.dtype),
                               "device": str(loaded.device)})
    previous = records_digest(run)
    run.clear_done(STAGE)

    started = time.perf_counter()
    stats = BatchStats()
    try:
        with _signals_raise():
            _generate_and_label(plan, state, generator, by_id, split_of, cfg, checkpointer, progress, stats)
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        path = checkpointer.save(state, "emergency")
        log.error("interrupted (%s): emergency save with %d records at %s; rerun the same command to resume",
                  signal.Signals(signum).name, state.n_records, path)
        raise BuildInterrupted(signum, path) from None
    elapsed = time.perf_counter() - started

    checkpointer.save(state, "checkpoint")          # the records in arrival order: the journal only appends
    records = sorted(state.records, key=lambda r: (r["task_id"], r["sample_index"]))
    metadata = dataset_metadata(records, splits, tasks, elapsed, manifest, cfg)
    metadata["sandbox"] = {"protections": manifest["sandbox"], "this_session": stats.as_dict()}
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


# --------------------------------------------------------------------------- the saved batch plan

def write_plan(run: RunDir, plan, info: dict[str, Any]) -> None:
    """The batch plan as (task_id, sample_index) keys per batch, with what produced it: a resumed build
    runs exactly these batches, whatever the device, token budget or backend of the resuming machine."""
    atomic_write_json(run.batch_plan, {**info, "batches": [[[t, s] for t, s, _ in batch] for batch in plan]})


def read_plan(run: RunDir) -> dict[str, Any] | None:
    if not run.batch_plan.is_file():
        return None
    saved = read_json(run.batch_plan)
    return saved if "batches" in saved else None


def plan_from_saved(saved: dict[str, Any], prompt_of: dict[int, str], n_samples: int, run: RunDir) -> list:
    """The saved plan's batches with their prompts; refuses when it does not cover exactly this build's items."""
    plan = [[(int(t), int(s), prompt_of.get(int(t))) for t, s in batch] for batch in saved["batches"]]
    saved_keys = sorted((t, s) for batch in plan for t, s, _ in batch)
    wanted = sorted((t, s) for t in prompt_of for s in range(n_samples))
    if saved_keys != wanted:
        raise CheckpointError(f"the saved batch plan {run.batch_plan} covers other (task, sample) items than this "
                              "build; resume with the config the build started with, or --no-resume")
    log.info("resuming with the saved batch plan (%d batches; made with backend %s, %s on %s)", len(plan),
             saved.get("backend"), saved.get("dtype"), saved.get("device"))
    return plan


def _generate_and_label(plan, state: BuildState, generator, by_id, split_of, cfg: Config,
                        checkpointer: Checkpointer, progress: bool, stats: BatchStats) -> None:

    total = sum(len(b) for b in plan)
    bar = tqdm(total=total, initial=state.n_records, desc="build", unit="sample", disable=not progress,
               dynamic_ncols=True)
    n_pass = sum(1 for r in state.records if r["passed"])
    try:
        for batch_index, batch in enumerate(plan):
            if batch_index in state.done_batches:
                continue
            new = label_samples(generator.generate_batch(batch, batch_index), by_id, split_of, cfg, stats)
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


