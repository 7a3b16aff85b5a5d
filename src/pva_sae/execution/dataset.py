"""A labelled dataset in a run directory: prompt -> generate -> extract -> run the tests -> label.

The build stage and the validation stage's temperature sub-builds both call
:func:`build_labelled_dataset`. Writes into the run directory (paths in :mod:`pva_sae.rundir.paths`):
config and manifest first, then splits, checkpoints/autosaves while working, and finally the dataset
(JSON and/or Parquet), its metadata and the stage marker. Interrupting with Ctrl+C or SIGTERM writes an
emergency save; rerunning resumes from the latest save and produces exactly the records of an uninterrupted run.

With ``generation.overlap`` the sandbox labels batch k on one background thread (:class:`BackgroundLabeller`,
alive for the whole build) while the model generates batch k+1. Batches are still committed to the records
and the checkpoint journal one at a time, whole (on the 'batches' schedule in plan order), so a save never
holds half a batch.

The plan runs on one of two schedules (``generation.schedule``, saved with the plan; a resumed build keeps the
saved one). 'batches': one static batch at a time (:meth:`Generator.generate_batch`). 'queue' (fast backend):
the items of the batches not yet done go, in plan order and in waves of about ``QUEUE_WAVE_BATCHES`` batches,
through continuous batching (:meth:`Generator.generate_queue`), so no decode step is spent on a row that has
ended; a planned batch is handed to the labeller as soon as its last item ends, and committed (records and done
mark together) once labelled, in the order batches end, so checkpoints and resume work per planned batch as on
the other schedule (a resumed build generates the batches not done), and ``batch_index`` stays the planned
batch. Greedy records are the same on both schedules; sampled ones differ
(the queue draws each sample from its (seed, task, sample) key, the batches from each batch's seed), which is
why a run never mixes them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

from tqdm.auto import tqdm

from pva_sae.config import BUILD_SECTIONS, Config, record_fields_differing
from pva_sae.data import benchmarks, prompts
from pva_sae.data import mbpp as data
from pva_sae.errors import PvaSaeError
from pva_sae.execution import distributed
from pva_sae.execution.label import label_samples, labelling_pool
from pva_sae.execution.sandbox import BatchStats, check_sandbox_config, probe
from pva_sae.model.fastgen import FastGenError
from pva_sae.model.generation import (
    Generator,
    batch_token_budget,
    plan_batches,
    resolve_batch_size,
)
from pva_sae.model.registry import use_model
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
SCHEDULES = ("batches", "queue")
QUEUE_WAVE_BATCHES = 8  # the queue schedule takes the plan in waves of >= this many batches' rows


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
                           loaded=None, label: str = STAGE) -> list[dict[str, Any]]:
    """Generate and label every (task, sample) of ``cfg`` in ``cfg.output.run_dir``; return the records
    (sorted by task id, then sample index). The run directory gets the ``build`` marker when done.

    Everything that can refuse (the config against the run's, the sandbox settings, the data, the resume
    decision) is checked before anything is written or the model is loaded, so a refused command leaves
    the run directory as it was. ``loaded`` reuses a model already in memory (a LoadedModel, or a callable
    returning one). ``label`` names this build on the console (``build``, ``build t=0.8``).
    """
    run = check_run_config(cfg)
    check_sandbox_config(cfg.sandbox)
    tasks_all = benchmarks.load_tasks(cfg.data.dataset, cfg.data.source)
    tasks = data.select_range(tasks_all, cfg.data.start_idx, cfg.data.end_idx)
    if cfg.data.task_ids is not None:
        tasks = data.select_ids(tasks, cfg.data.task_ids)
    splits = data.make_splits(tasks_all, cfg.data.split_fractions, cfg.data.split_seed)
    split_of = {tid: name for name, ids in splits.items() for tid in ids}
    if run.is_done(STAGE) and cfg.checkpoint.resume != "never" and not cfg.checkpoint.resume_from:
        log.warning("build already complete in %s; returning the saved dataset", run.root)
        records = read_saved_records(run)
        announce(label, f"already complete: {len(records)} records in {run.root}", progress)
        return records
    # --- shards (pva_sae.execution.distributed): this process's shard; a finished shard is never redone
    shard = distributed.shard_of(cfg)
    if shard is not None:
        label, interactive = f"{label} {shard}", False     # shards never prompt: a shard with a checkpoint resumes
        if distributed.part_done(run, shard):
            announce(label, "shard already done", progress)
            return distributed.finish_build_shard(run, shard, dataset_metadata)
    # ---
    checkpointer = Checkpointer(distributed.work_dir(run, shard), cfg.checkpoint, cfg.to_dict(), cfg.data.start_idx,
                                cfg.data.end_idx if cfg.data.end_idx is not None else len(tasks_all) - 1)
    state = decide_resume(checkpointer, cfg.checkpoint, interactive)
    saved_plan = read_plan(run) if state.n_records or shard is not None else None   # shards: the published plan
    if state.n_records and saved_plan is None:
        raise CheckpointError(f"{run.root} has a checkpoint but no saved batch plan ({run.batch_plan}): its batch "
                              "indices cannot be mapped to tasks; start over with --no-resume")
    if saved_plan is not None and cfg.generation.backend == "hf":     # refused before anything is written
        resolve_schedule(cfg.generation.schedule, "hf", saved_plan, run)

    run.ensure()
    atomic_write_json(run.config, cfg.to_dict())
    log_path = setup_logging(run.log_file(STAGE))
    log.info("build stage starting; log at %s", log_path)
    write_splits(run, cfg.data.split_seed, cfg.data.split_fractions, splits, data.split_summary(tasks_all, splits))
    loaded = use_model(loaded, cfg.model)
    manifest = base_manifest(STAGE, {"split_seed": cfg.data.split_seed, "generation_seed": cfg.generation.seed})
    manifest.update({
        "model": {"name": cfg.model.name, "source": loaded.source, "path_or_id": loaded.path_or_id,
                  "revision": loaded.revision, "dtype": str(loaded.dtype), "family": loaded.family,
                  "n_layers": loaded.n_layers, "d_model": loaded.d_model, "torch_threads": loaded.torch_threads},
        "device": device_info(loaded.device),
        "dataset": {"name": cfg.data.dataset, "source": cfg.data.source,
                    "sha256": benchmarks.dataset_sha256(cfg.data.dataset, cfg.data.source),
                    "n_tasks_total": len(tasks_all), "n_tasks_selected": len(tasks)},
        "sandbox": probe(cfg.sandbox),
    })
    atomic_write_json(run.manifest, manifest)

    by_id = {t.task_id: t for t in tasks}
    prompt_list = [(t.task_id, prompts.build_prompt(t, cfg.prompt.template, cfg.prompt.initiator,
                                                       cfg.prompt.style)) for t in tasks]
    generator = Generator(loaded, cfg.generation)
    work = with_sandbox_workers(cfg)
    overlap = overlap_labelling(cfg.generation.overlap, loaded.device)
    if saved_plan is not None:
        plan = plan_from_saved(saved_plan, dict(prompt_list), cfg.generation.n_samples, run)
        schedule = resolve_schedule(cfg.generation.schedule, generator.backend, saved_plan, run)
    else:
        schedule = resolve_schedule(cfg.generation.schedule, generator.backend)
        size = resolve_batch_size(generator, [p for _, p in prompt_list])
        plan = plan_batches(prompt_list, loaded.tokenizer, size, cfg.generation.n_samples,
                            cfg.generation.sort_by_length,
                            batch_token_budget(cfg.generation.max_batch_tokens, loaded.device),
                            cfg.generation.max_new_tokens)
        info = {"batch_size": size, "configured_batch_size": cfg.generation.batch_size,
                               "backend": generator.backend, "dtype": str(loaded.dtype),
                               "device": str(loaded.device), "sandbox_workers": work.sandbox.workers,
                               "overlap": overlap, "schedule": schedule}
        if shard is None:
            write_plan(run, plan, info)
        else:   # --- shards: the first plan published is every shard's plan (and schedule)
            plan = distributed.publish_plan(run, plan, info, dict(prompt_list))
            schedule = resolve_schedule(cfg.generation.schedule, generator.backend, read_plan(run), run)
    manifest["generation"] = {"backend": generator.backend, "schedule": schedule}
    atomic_write_json(run.manifest, manifest)
    previous = records_digest(run)
    run.clear_done(STAGE)
    n_items = distributed.skip_other_shards(plan, state, shard)   # shards: other shards' batches count as done
    announce(label, f"{n_items} samples ({len(tasks)} tasks x {cfg.generation.n_samples}) with {cfg.model.name} on "
                    f"{loaded.device}: {len(plan)} batches of up to {max(map(len, plan), default=0)}, "
                    f"{schedule_text(schedule)}, {work.sandbox.workers} sandbox workers, "
                    f"labelling {'overlapped' if overlap else 'in turn'}"
                    + (f"; resuming with {state.n_records} done" if state.n_records else ""), progress)

    started = time.perf_counter()
    stats = BatchStats()
    bar = tqdm(total=n_items, initial=state.n_records, desc=label, unit="sample", disable=not progress,
               dynamic_ncols=True)
    try:
        with _signals_raise(), BackgroundLabeller(by_id, split_of, work, stats, overlap) as labeller:
            if schedule == "queue":
                _queue_and_label(plan, state, generator, labeller, checkpointer, bar)
            else:
                _generate_and_label(plan, state, generator, labeller, checkpointer, bar)
    except KeyboardInterrupt as exc:
        bar.close()                                 # before the message, so the bar does not redraw under it
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        path = checkpointer.save(state, "emergency")
        log.error("interrupted (%s): emergency save with %d records at %s; rerun the same command to resume",
                  signal.Signals(signum).name, state.n_records, path)
        raise BuildInterrupted(signum, path) from None
    finally:
        bar.close()
    elapsed = time.perf_counter() - started

    checkpointer.save(state, "checkpoint")          # the records in arrival order: the journal only appends
    if shard is not None:   # --- shards: this shard's part; the merge writes the dataset once every part is there
        distributed.write_build_part(run, shard, plan, state.records, {
            "elapsed_s": elapsed, "device": str(loaded.device), "schedule": schedule, "sandbox": stats.as_dict()})
        return distributed.finish_build_shard(run, shard, dataset_metadata)
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
                          "outputs": {"records": digest}, "schedule": schedule})
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
    log.info("resuming with the saved batch plan (%d batches, schedule %s; made with backend %s, %s on %s)",
             len(plan), saved.get("schedule", "batches"), saved.get("backend"), saved.get("dtype"), saved.get("device"))
    return plan


def resolve_schedule(setting: str, backend: str, saved: dict[str, Any] | None = None,
                     run: RunDir | None = None) -> str:
    """The schedule the build runs its plan on. Resuming (``saved``, the saved batch plan): the plan's, whatever
    ``generation.schedule`` says now (a plan saved before schedules were recorded ran 'batches'), so one dataset
    never mixes the sampling of both. Else ``setting`` ('auto': 'queue' on the fast backend, else 'batches').
    Refuses 'queue' unless ``backend`` (generation.backend resolved) is 'fast'."""
    if saved is None:
        schedule = setting if setting != "auto" else ("queue" if backend == "fast" else "batches")
        if schedule == "queue" and backend != "fast":
            raise FastGenError("generation.schedule='queue' (continuous batching) runs on the fast decoder, but "
                               f"generation.backend resolved to {backend!r} (fast is Gemma-2 only; 'auto' picks it on "
                               "CUDA): set generation.backend=fast, or generation.schedule=batches or auto")
        return schedule
    where = run.batch_plan if run is not None else "the saved batch plan"
    schedule = saved.get("schedule", "batches")
    if schedule not in SCHEDULES:
        raise CheckpointError(f"{where} names schedule {schedule!r}, not one of {', '.join(SCHEDULES)}: it is "
                              "damaged or from a newer version; start over with --no-resume")
    if schedule == "queue" and backend != "fast":
        raise CheckpointError(f"{where} runs the 'queue' schedule (continuous batching, per-sample sampling keys), "
                              f"which needs the fast decoder, but generation.backend is {backend!r} here: resume with "
                              "generation.backend=fast on the same Gemma-2 model, or start over with --no-resume")
    if setting not in ("auto", schedule):
        log.warning("generation.schedule=%s, but the build being resumed runs the %r schedule of its saved plan; "
                    "it keeps that one (start over with --no-resume to change it)", setting, schedule)
    return schedule


def schedule_text(schedule: str) -> str:
    """The schedule as the announce line says it."""
    if schedule == "queue":
        return f"continuous batching (schedule 'queue', waves of {QUEUE_WAVE_BATCHES} batches)"
    return "batch by batch (schedule 'batches')"


# --------------------------------------------------------------------------- generate, then label

def announce(label: str, text: str, progress: bool = True) -> None:
    """One console line naming the step that starts (``[build] ...``); silent without progress."""
    if progress:
        tqdm.write(f"[{label}] {text}", file=sys.stderr)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), which is what a container or taskset grants."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def with_sandbox_workers(cfg: Config) -> Config:
    """``cfg`` with ``sandbox.workers`` resolved (0 = one per usable core), so the count is recorded."""
    if cfg.sandbox.workers > 0:
        return cfg
    return dataclasses.replace(cfg, sandbox=dataclasses.replace(cfg.sandbox, workers=usable_cores()))


def overlap_labelling(setting: str, device) -> bool:
    """generation.overlap resolved: 'auto' overlaps when the model is on an accelerator (the GPU generates
    while the CPU cores run the sandbox); on CPU both would compete for the same cores."""
    if setting == "auto":
        return getattr(device, "type", str(device)) != "cpu"
    return setting == "on"


LABEL_THREADS = 4  # batches a BackgroundLabeller has in the sandbox at once


class BackgroundLabeller:
    """Labels generated batches (extract, run the tests in the sandbox, make the records) on threads that live
    as long as the stage, so the caller can generate the next batch meanwhile. Up to ``threads`` batches are in
    the one sandbox pool at once, so a batch waiting on a slow program (a wall-clock timeout and its re-run)
    does not hold up the ones after it; callers take the results in submission order. Without ``overlap``
    each batch is labelled at once in the caller's thread.

    ``submit`` returns a Future of the records; a labelling error is raised by its ``result()``.
    ``defer_reruns`` (with overlap): the re-runs of wall-clock timeouts wait to share rounds alone with those
    of later batches (:meth:`Sandbox.map`); wait on a batch through :meth:`wait`, which starts the round its
    re-runs may be waiting for. A batch submitted while every thread is busy starts one too.
    """

    def __init__(self, by_id, split_of, cfg: Config, stats: BatchStats | None, overlap: bool,
                 threads: int = LABEL_THREADS, defer_reruns: bool = False):
        self.by_id, self.split_of, self.cfg, self.stats = by_id, split_of, cfg, stats
        self._thread = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="label") if overlap else None
        self._threads = threads
        self._defer = defer_reruns and overlap
        self._pool: ExitStack | None = None     # one sandbox pool (fork server, label cache) for the stage
        self._sandbox = None
        self._start = threading.Lock()
        self._futures: list[Future] = []

    def label(self, samples) -> list[dict[str, Any]]:
        with self._start:
            if self._sandbox is None:            # started on the first batch, so a refused stage starts none
                self._pool = ExitStack()
                self._sandbox = self._pool.enter_context(labelling_pool(self.cfg, self.stats))
        return label_samples(samples, self.by_id, self.split_of, self.cfg, sandbox=self._sandbox,
                             defer_reruns=self._defer)

    def flush(self) -> None:
        """Start a round for the deferred re-runs waiting now."""
        if self._sandbox is not None:
            self._sandbox.flush_reruns()

    def wait(self, future: Future) -> list[dict[str, Any]]:
        """The records of a submitted batch, its deferred re-runs' round started first if it is not done."""
        while self._defer and not future.done():
            self.flush()
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:
                continue
        return future.result()

    @property
    def overlapped(self) -> bool:
        """Whether batches are labelled on the background thread (else at once, in the caller's)."""
        return self._thread is not None

    def submit(self, samples) -> Future:
        if self._thread is not None:
            if self._defer:
                self._futures = [f for f in self._futures if not f.done()]
                if len(self._futures) >= self._threads:   # every thread busy, perhaps waiting on re-runs
                    self.flush()
            future = self._thread.submit(self.label, samples)
            if self._defer:
                self._futures.append(future)
            return future
        done: Future = Future()
        done.set_result(self.label(samples))
        return done

    def close(self) -> None:
        """Wait for the batch being labelled (its sandboxed processes end with it) and stop the thread."""
        with self._start:
            sandbox = self._sandbox
        if sandbox is not None:
            sandbox.drain_reruns()             # a batch waiting on deferred re-runs gets its round now
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)
        if self._pool is not None:
            self._pool.close()
            self._pool, self._sandbox = None, None

    def __enter__(self) -> "BackgroundLabeller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _generate_and_label(plan, state: BuildState, generator, labeller: BackgroundLabeller,
                        checkpointer: Checkpointer, bar) -> None:
    """Generate every batch not yet done, in plan order, each while the previous one is being labelled."""
    n_pass = sum(1 for r in state.records if r["passed"])
    pending: tuple[int, Future] | None = None     # the batch being labelled while the next one generates

    def commit(batch_index: int, new: list[dict[str, Any]]) -> None:
        nonlocal n_pass
        # The batch's records and its "done" mark change together, so a save never holds half a batch.
        state.records.extend(new)
        state.done_batches.add(batch_index)
        n_pass += sum(r["passed"] for r in new)
        bar.update(len(new))
        bar.set_postfix(pass_rate=f"{n_pass / max(state.n_records, 1):.3f}", batch=f"{batch_index + 1}/{len(plan)}",
                        schedule="batches")

    try:
        for batch_index, batch in enumerate(plan):
            if batch_index in state.done_batches:
                continue
            samples = generator.generate_batch(batch, batch_index)
            if pending is not None:
                commit(pending[0], pending[1].result())
                checkpointer.maybe_save(state)
            pending = (batch_index, labeller.submit(samples))
            if pending[1].done():                  # labelled in this thread (no overlap): commit at once
                commit(pending[0], pending[1].result())
                pending = None
                checkpointer.maybe_save(state)
        if pending is not None:
            index, future = pending
            pending = None
            commit(index, future.result())
            checkpointer.maybe_save(state)
    except KeyboardInterrupt:
        # A batch already labelled when the signal came goes into the emergency save (it is next in plan order).
        if pending is not None and pending[1].done() and not pending[1].cancelled() and pending[1].exception() is None:
            commit(pending[0], pending[1].result())
        raise


def queue_waves(plan, done: set[int], wave_batches: int) -> list[list[int]]:
    """The indices of the batches not in ``done``, in plan order, cut into waves of consecutive batches holding at
    least ``wave_batches`` batches' worth of rows (of the plan's largest batch; the last wave what is left)."""
    rows_per_wave = wave_batches * max(map(len, plan), default=1)
    waves: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for index, batch in enumerate(plan):
        if index in done:
            continue
        current.append(index)
        rows += len(batch)
        if rows >= rows_per_wave:
            waves.append(current)
            current, rows = [], 0
    if current:
        waves.append(current)
    return waves


class _QueueCommits:
    """The planned batches of the queue schedule: rows come back as they end, in any order; a batch goes to the
    labeller when its last row is back (labelling overlapped; else the wave's batches are labelled after the wave,
    so generation and the sandbox take turns and the rows' generation times hold no labelling), and is committed
    (records and done mark together) when labelled."""

    def __init__(self, plan, state: BuildState, labeller: BackgroundLabeller, checkpointer: Checkpointer, bar):
        self.plan, self.state, self.labeller, self.checkpointer, self.bar = plan, state, labeller, checkpointer, bar
        self.n_pass = sum(1 for r in state.records if r["passed"])
        self.rows: dict[int, list] = {}        # batch index -> its samples so far (None where still generating)
        self.missing: dict[int, int] = {}
        self.owner: list[tuple[int, int]] = []  # queue item -> (batch index, position in the batch)
        self.labelling: list[tuple[int, Future]] = []   # batches with the labeller, in submission order
        self.ended: list[int] = []             # batches whose rows all ended, to label after the wave

    def start_wave(self, wave: list[int]) -> list:
        """The queue items of ``wave`` (its batches' items in plan order)."""
        self.owner = [(i, pos) for i in wave for pos in range(len(self.plan[i]))]
        for i in wave:
            self.rows[i], self.missing[i] = [None] * len(self.plan[i]), len(self.plan[i])
        return [item for i in wave for item in self.plan[i]]

    def finished(self, rows) -> None:
        """``on_samples`` of the queue: (item index, Sample) of rows that ended."""
        for index, sample in rows:
            batch_index, pos = self.owner[index]
            self.rows[batch_index][pos] = dataclasses.replace(sample, batch_index=batch_index)
            self.missing[batch_index] -= 1
            if self.missing[batch_index] == 0:
                del self.missing[batch_index]
                if self.labeller.overlapped:
                    self.submit(batch_index)
                else:
                    self.ended.append(batch_index)
        self.collect(wait=False)

    def submit(self, batch_index: int) -> None:
        self.labelling.append((batch_index, self.labeller.submit(self.rows.pop(batch_index))))

    def end_wave(self) -> None:
        """After a wave's queue: label what waited for it, commit what is labelled (without waiting)."""
        while self.ended:
            self.submit(self.ended.pop(0))
            self.collect(wait=False)
        self.collect(wait=False)

    def collect(self, wait: bool) -> None:
        """Commit the labelled batches at the head of the labeller's line (all of them with ``wait``)."""
        while self.labelling and (wait or self.labelling[0][1].done()):
            batch_index, future = self.labelling[0]
            new = future.result()
            self.labelling.pop(0)
            self.commit(batch_index, new)
            self.checkpointer.maybe_save(self.state)

    def commit(self, batch_index: int, new: list[dict[str, Any]]) -> None:
        # The batch's records and its "done" mark change together, so a save never holds half a batch.
        self.state.records.extend(new)
        self.state.done_batches.add(batch_index)
        self.n_pass += sum(r["passed"] for r in new)
        self.bar.update(len(new))
        self.bar.set_postfix(pass_rate=f"{self.n_pass / max(self.state.n_records, 1):.3f}",
                             batches=f"{len(self.state.done_batches)}/{len(self.plan)}", schedule="queue")

    def commit_labelled(self) -> None:
        """On an interrupt: the batches already labelled go into the emergency save (in submission order)."""
        while self.labelling:
            batch_index, future = self.labelling[0]
            if not future.done() or future.cancelled() or future.exception() is not None:
                return
            self.labelling.pop(0)
            self.commit(batch_index, future.result())


def _queue_and_label(plan, state: BuildState, generator, labeller: BackgroundLabeller, checkpointer: Checkpointer,
                     bar) -> None:
    """The 'queue' schedule: every batch not yet done, in plan order, through continuous batching in waves (so an
    interruption loses at most about a wave, and a wave's labelling overlaps the next wave's generation); each
    planned batch is labelled as soon as its last row ends, and committed once labelled."""
    commits = _QueueCommits(plan, state, labeller, checkpointer, bar)
    try:
        for wave in queue_waves(plan, state.done_batches, QUEUE_WAVE_BATCHES):
            items = commits.start_wave(wave)
            # Slots: the wave's largest planned batch, which the plan sized for the device and token budget.
            generator.generate_queue(items, slots=max(len(plan[i]) for i in wave), on_samples=commits.finished)
            commits.end_wave()
        commits.collect(wait=True)
    except KeyboardInterrupt:
        commits.commit_labelled()
        raise


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
        "schedule": (manifest.get("generation") or {}).get("schedule"),
        "task_range": [cfg.data.start_idx, cfg.data.end_idx],
    }


