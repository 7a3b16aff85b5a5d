"""Stage 4, causal validation: does adding a latent's decoder direction change whether code works?

The design (``docs/statistics.md`` has the protocol and the calibration of every test):

1. **One task set, one baseline.** Every arm (the target, every control) runs on the same tasks, at
   the same alpha, positions and generation schedule (below); the paired baseline is an alpha = 0 re-run
   of those tasks under the same schedule. The build record against that re-run is the noise floor.
   Steered runs cover all tasks of the split, so a flip is defined in both directions.
2. **Controls of two kinds**, ``steering.n_controls`` per direction: half zero-separation SAE latents
   of the target's layer (|separation| <= ``control_max_separation``, firing rate matched, passing the
   same general-text filter as the target), half seeded random directions at that layer with the norm
   of the target's vector.
3. **Alpha chosen for specificity** on the tuning split: a few controls of each kind run at every grid
   point, and the alpha maximising the target's effect minus the controls' is chosen (correct
   direction: subject to corruption <= ``max_corruption``). The whole curve is written and plotted.
4. **Tests under the null they are reported for** (:mod:`pva_sae.stats.causal`): the target's rank
   among its controls and a prediction interval ("is the target a typical direction?"), a paired
   difference, a permutation test and a sign test against the controls' mean ("does it do what the
   controls do on average on these tasks?"), McNemar of every arm against the alpha = 0 baseline,
   exact intervals, Holm across the run's experiments. Net effect (Delta pass@1) with a task-bootstrap
   interval for the target, every control and selective steering.

``steering.target`` replaces the chosen latent's direction by a random direction of the same norm
(an exact null against the random controls) or by a token's unembedding row (a positive control).
Each generation condition is cached under ``steering/conditions/`` when it finishes, so an interrupted
stage resumes at the next condition. Outputs under ``<run>/steering/`` (``SteeringPaths``).

**Calls.** The stage waits for its labels twice (with ``refine_steps`` = 1 and ``steering.speculate``, on by
default when labelling runs beside generation; three times without speculation), whatever the number of
directions: the baselines, every direction's alpha grid and (speculation) the first refinement's candidates at
every grid midpoint go in one call, each further refinement step of every direction in the next
(:class:`AlphaSearch`, :func:`search_alphas`; the first refinement reads its conditions from the cache), and
every direction's target and controls at its alpha in the last. Within a call generation and labelling are
pipelined; between calls the stage waits for the call's last labels (a timeout's second attempt included),
since what comes next depends on them. ``steering/calls.json`` says how long each call generated and then
waited, and on what.

**Schedules.** With the 'hf' backend every condition is planned into static batches of the stage's
batch size and generated batch by batch ('batches'). With the fast backend the conditions of one call
that steer at the same layer (the stage's site and positions are shared; the alpha = 0 baseline joins
any of them) run through continuous batching ('queue', :meth:`Generator.generate_queue`): (condition,
task) rows decode in ``batch_size`` slots, each with its own steering row, and a slot that ends takes the
next row, so no decode step is spent on finished rows or on a condition's short last batch. A row gets what
its per-batch generation gives it (float32: exactly; bfloat16 may round a near-tie differently, as static
batches of other shapes do); rows are labelled in chunks as they end, and a condition is written once its
last row is labelled. The conditions are queued in waves of at least ``QUEUE_WAVE_BATCHES`` batches'
worth of rows: the queue runs its prompt-length buckets one after the other, so in one queue of every
condition none would be complete before the last bucket; a wave bounds what an interruption loses. The
schedule is part of every condition's key: one schedule's cached conditions are never read by the other.
"""

from __future__ import annotations

import difflib
import functools
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pva_sae.config import Config
from pva_sae.data import benchmarks, prompts
from pva_sae.data.mbpp import seeded_subset
from pva_sae.errors import InputError, MissingInputError, StaleInputError
from pva_sae.execution import distributed
from pva_sae.execution.dataset import (
    LABEL_THREADS,
    BackgroundLabeller,
    announce,
    overlap_labelling,
    with_sandbox_workers,
)
from pva_sae.hashing import sha256_bytes, sha256_json
from pva_sae.model.fastgen import FastGenError, Steering
from pva_sae.model.generation import (
    Generator,
    batch_token_budget,
    plan_batches,
    resolve_batch_size,
)
from pva_sae.model.registry import use_model
from pva_sae.plots import plot_steering
from pva_sae.rundir.artifacts import (
    load_activations,
    load_ranked,
    load_records,
    load_scores,
    read_analysis_summary,
    read_choices,
    read_condition,
    read_splits,
    read_validation_results,
    read_validation_scores,
    split_of,
    write_condition,
    write_steered_tasks,
)
from pva_sae.rundir.atomic import atomic_write_json
from pva_sae.rundir.fingerprints import (
    SAE_FIELDS,
    check_chain,
    check_run_config,
    file_digest,
    sections_digest,
)
from pva_sae.rundir.logs import setup_logging
from pva_sae.rundir.paths import AnalysisPaths, RunDir, SteeringPaths, ValidationPaths
from pva_sae.rundir.transfer import transfer_base
from pva_sae.sae.registry import load_layer_sae
from pva_sae.stats.causal import (
    arm_experiment,
    holm,
    net_effect,
    net_effect_difference,
    outcome_flips,
)
from pva_sae.stats.latents import select_latents
from pva_sae.stats.transfer import compare_experiments

log = logging.getLogger(__name__)

STAGE = "steer"
UPSTREAM_FIELDS = ("model.name", "model.revision", "model.dtype", "data.dataset", "data.source",
                   "data.split_fractions", "data.split_seed", "prompt", "generation.max_new_tokens",
                   "generation.stop_strings", "generation.top_p",
                   "generation.seed")  # what labels and splits were made with: as the build
EXPERIMENTS = {  # name: (direction steered, baseline outcome of the relevant tasks); a flip changes that outcome
    "correction": ("correct", False),
    "preservation_failure": ("correct", True),
    "corruption": ("incorrect", True),
}
HOLM_TESTS = ("rank_p", "permutation_p", "prediction_p", "sign_test_p", "mcnemar_p")
NULL_UNCHANGED = "steering does not change outcomes (arm vs its alpha = 0 baseline, same tasks and plan)"


@dataclass(frozen=True)
class Arm:
    """One steering direction: the target, a control latent, a random control, or none (the baseline)."""

    kind: str                   # 'target', 'latent', 'random' or 'baseline'
    direction: str | None       # the steering direction it belongs to ('correct' / 'incorrect')
    layer: int | None
    latent: int | None          # SAE latent index (target latent or latent control)
    label: str                  # how tables name it: 'L5:910', 'random#3', 'unembed:<eos>', 'alpha=0'

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


BASELINE = Arm("baseline", None, None, None, "alpha=0")
PLAN_KEY = "generation_plan"  # steering/conditions/generation_plan.json: the batch size every condition used
SCHEDULES = ("batches", "queue")
QUEUE_WAVE_BATCHES = 8  # the queue schedule takes conditions in waves of >= this many batch_size rows


# --------------------------------------------------------------------------- generation

class Steerer:
    """Runs arms on one loaded model: batched steered generation, sandboxed labels, cached conditions.

    The conditions of one :meth:`run_many` call are pipelined: with ``generation.overlap`` the sandbox labels
    a batch (or a chunk of finished queue rows) on a background thread while generation goes on.
    ``schedule`` is 'batches' or 'queue' (see the module docstring); None: ``generation.schedule`` ('auto':
    'queue' on the fast backend, else 'batches').
    """

    def __init__(self, cfg: Config, run: RunDir, progress: bool, *, loaded=None, schedule: str | None = None):
        self.cfg, self.paths, self.progress = cfg, SteeringPaths.of(run), progress
        self.loaded = use_model(loaded, cfg.model)
        tasks = benchmarks.load_tasks(cfg.data.dataset, cfg.data.source)
        self.by_id = {t.task_id: t for t in tasks}
        self.prompts = {t.task_id: prompts.build_prompt(t, cfg.prompt.template, cfg.prompt.initiator, cfg.prompt.style)
                        for t in tasks}
        self.split_of = split_of(run)
        self.generator = Generator(self.loaded, cfg.generation)
        setting = schedule or cfg.generation.schedule
        self.schedule = setting if setting != "auto" else ("queue" if self.generator.backend == "fast" else "batches")
        if self.schedule not in SCHEDULES or (self.schedule == "queue" and self.generator.backend != "fast"):
            raise FastGenError(f"steering schedule {self.schedule!r} with generation.backend resolved to "
                               f"{self.generator.backend!r}: 'queue' (continuous batching) needs the fast backend; "
                               "set generation.schedule=batches or auto, or generation.backend=fast")
        self.shard = distributed.shard_of(cfg)      # under torchrun: conditions are spread over the ranks by key
        self.batch_size = distributed.from_rank0(self._batch_size(), self.shard)
        self.budget = batch_token_budget(cfg.generation.max_batch_tokens, self.loaded.device)
        self.site = cfg.steering.site or cfg.analysis.site
        self.n_generated = 0
        # Steering labels many batches beside generation and can wait: its timeouts' re-runs share rounds alone.
        # As many batches in the sandbox as it has workers: a batch holding an endless loop (up to its CPU limit,
        # 15 s beside others by default) then holds up only itself, not every batch queued behind it.
        sandboxed = with_sandbox_workers(cfg)
        self.labeller = BackgroundLabeller(self.by_id, self.split_of, sandboxed, None,
                                           overlap_labelling(cfg.generation.overlap, self.loaded.device),
                                           threads=max(LABEL_THREADS, sandboxed.sandbox.workers), defer_reruns=True)
        self.n_conditions = 0                    # conditions planned (see expect)
        self.calls: list[dict[str, Any]] = []    # per run_many call: where its time went (see _timed_collect)
        self.counted: set[str] = set()           # condition keys done in this stage (generated or read)
        self.bar = tqdm(total=0, desc="steer", unit="sample", disable=not progress, dynamic_ncols=True)

    @property
    def n_done(self) -> int:
        """Conditions finished in this stage, cached ones included, each once."""
        return len(self.counted)

    def _batch_size(self) -> int:
        """The batch size of every condition of this stage: the one an earlier run of the stage saved (same
        configured size and backend), so that a resumed stage keeps its cached conditions and their plans
        whatever the free memory now; else resolved now (generation.batch_size, 0 = automatic) and saved."""
        g = self.cfg.generation
        saved = read_condition(self.paths, PLAN_KEY)
        same = saved and (saved.get("configured_batch_size"), saved.get("backend")) == (g.batch_size,
                                                                                          self.generator.backend)
        if same:
            return int(saved["batch_size"])
        size = resolve_batch_size(self.generator, list(self.prompts.values()))
        write_condition(self.paths, PLAN_KEY, {"batch_size": size, "configured_batch_size": g.batch_size,
                                               "backend": self.generator.backend, "device": str(self.loaded.device)})
        return size

    def expect(self, n_conditions: int, n_samples: int) -> None:
        """What the progress bar counts down: conditions (cached ones included) and samples to generate."""
        self.n_conditions, self.bar.total = n_conditions, n_samples
        self._describe()

    def _describe(self) -> None:
        self.bar.set_description_str(f"steer {self.n_done}/{max(self.n_conditions, self.n_done)} conditions",
                                     refresh=False)
        self.bar.refresh()

    def condition_key(self, arm: Arm, vector: torch.Tensor | None, alpha: float, task_ids: tuple[int, ...]) -> str:
        """Everything a condition's outcomes depend on: the direction itself, the model, prompts, generation."""
        c = self.cfg.to_dict()
        parts = {"arm": arm.as_dict(), "alpha": alpha, "positions": self.cfg.steering.positions, "site": self.site,
                 "vector": sha256_bytes(vector.numpy().tobytes()) if vector is not None else None,
                 "task_ids": list(task_ids), "model": c["model"], "revision": self.loaded.revision,
                 "prompt": c["prompt"], "data": c["data"]["source"],
                 "generation": {k: v for k, v in c["generation"].items() if k != "overlap"},
                 "sandbox": {k: v for k, v in c["sandbox"].items() if k != "workers"},
                 "backend": self.generator.backend, "batch_size": self.batch_size, "schedule": self.schedule}
        return f"{arm.kind}_{arm.label.replace(':', '-').replace('#', '')}_{sha256_json(parts)[:16]}"

    def run(self, arm: Arm, vector: torch.Tensor | None, alpha: float, task_ids: list[int]) -> dict[int, dict]:
        """{task id: outcome} of ``arm`` at absolute coefficient ``alpha`` (cached per condition)."""
        return self.run_many([(arm, vector, alpha, task_ids)])[0]

    def run_many(self, conditions: list[tuple[Arm, torch.Tensor | None, float, list[int]]]) -> list[dict[int, dict]]:
        """{task id: outcome} of each (arm, vector, absolute alpha, task ids), in order; each condition is cached
        when its last batch is labelled, so an interrupted stage resumes at the next one."""
        out: list[dict[int, dict] | None] = [None] * len(conditions)
        todo = []
        for i, (arm, vector, alpha, task_ids) in enumerate(conditions):
            ids = tuple(sorted(task_ids))
            key = self.condition_key(arm, vector, alpha, ids)
            saved = read_condition(self.paths, key)
            if saved is None:
                todo.append((i, key, arm, alpha, ids, vector))
                continue
            out[i] = {o["task_id"]: o for o in saved["tasks"]}
            if key in self.counted:                  # read or generated before in this stage (speculation)
                continue
            self.counted.add(key)
            self.bar.total = max(self.bar.n, (self.bar.total or 0) - len(ids))    # nothing to generate for it
            self._describe()
        # --- shards (torchrun): this rank generates its share of the conditions, by condition key
        todo, theirs = distributed.split_by_key(todo, lambda item: item[1], [
            self.condition_key(a, v, alpha, tuple(sorted(ids))) for a, v, alpha, ids in conditions], self.shard)
        # ---
        if self.schedule == "queue":
            # Labelling runs on across waves: a wave's generation starts while the last one's rows are labelled.
            labelling: list[tuple[Any, list]] = []   # (future, condition of each row), in submission order
            records: dict[int, list[dict[str, Any]]] = {}
            try:
                started = time.perf_counter()
                for group in self._queue_groups(todo):
                    for wave in self._waves(group):
                        self._run_queue(wave, labelling, records, out)
                self._timed_collect(labelling, records, out, started, todo)
            except KeyboardInterrupt:
                self._collect(labelling, records, out, wait=False, interrupted=True)  # keep what is labelled
                raise
        else:
            self._run_batches(todo, out)
        distributed.barrier(self.shard)   # --- shards: every rank's conditions are written; read the others'
        for i, key, *_ in theirs:
            out[i] = {o["task_id"]: o for o in read_condition(self.paths, key)["tasks"]}
            self.counted.add(key)
        return out  # type: ignore[return-value]

    def _steering(self, arm: Arm, vector: torch.Tensor | None, alpha: float) -> Steering | None:
        return (Steering(arm.layer, vector, alpha, site=self.site, positions=self.cfg.steering.positions)
                if vector is not None and alpha != 0 else None)

    def _run_batches(self, todo, out) -> None:
        """Each condition planned into static batches, generated batch by batch, labelled while the next runs."""
        records: dict[int, list[dict[str, Any]]] = {}
        pending = None                  # (condition, labelling future, whether it is its last batch)
        for item in todo:
            i, _, arm, alpha, ids, vector = item
            plan = plan_batches([(t, self.prompts[t]) for t in ids], self.loaded.tokenizer, self.batch_size, 1, True,
                                self.budget, self.cfg.generation.max_new_tokens)
            steering = self._steering(arm, vector, alpha)
            records[i] = []
            for index, batch in enumerate(plan):
                self.bar.set_postfix_str(f"{arm.label} alpha={alpha:.3g}")
                samples = self.generator.generate_batch(batch, index, steering=steering)
                if pending is not None:
                    self._finish(*pending, records, out)
                pending = (item, self.labeller.submit(samples), index == len(plan) - 1)
                if pending[1].done():           # labelled in this thread (no overlap)
                    self._finish(*pending, records, out)
                    pending = None
        if pending is not None:
            self._finish(*pending, records, out)

    def _finish(self, item, future, last: bool, records, out) -> None:
        """Add one labelled batch to its condition; after its last batch write the condition."""
        i = item[0]
        new = self.labeller.wait(future)
        records[i] += new
        self._count(len(new))
        if last:
            self._write(item, records.pop(i), out)

    def _count(self, n: int) -> None:
        self.n_generated += n
        if self.bar.n + n > (self.bar.total or 0):
            self.bar.total = self.bar.n + n
        self.bar.update(n)

    def _write(self, item, records: list[dict[str, Any]], out) -> None:
        """Write a condition whose every task is labelled (outcomes in task order)."""
        i, key, arm, alpha, ids, _ = item
        outcomes = [_outcome(r) for r in sorted(records, key=lambda r: r["task_id"])]
        write_condition(self.paths, key, {"arm": arm.as_dict(), "alpha": alpha, "task_ids": list(ids),
                                          "tasks": outcomes})
        out[i] = {o["task_id"]: o for o in outcomes}
        self.counted.add(key)
        self._describe()

    def _queue_groups(self, todo) -> list[list]:
        """The conditions to generate, grouped by steering layer in call order (site and positions are the
        stage's); unsteered conditions (the baseline) join the first group."""
        groups: dict[int | None, list] = {}
        for item in todo:
            _, _, arm, alpha, _, vector = item
            steering = self._steering(arm, vector, alpha)
            groups.setdefault(None if steering is None else steering.layer, []).append(item)
        unsteered = groups.pop(None, [])
        if not groups:
            return [unsteered] if unsteered else []
        ordered = list(groups.values())
        ordered[0] = sorted(unsteered + ordered[0], key=lambda item: item[0])
        return ordered

    def _waves(self, group: list) -> list[list]:
        """Consecutive conditions of a group, each wave at least QUEUE_WAVE_BATCHES * batch_size rows (the last
        one what is left)."""
        waves, current, rows = [], [], 0
        for item in group:
            current.append(item)
            rows += len(item[4])
            if rows >= QUEUE_WAVE_BATCHES * self.batch_size:
                waves.append(current)
                current, rows = [], 0
        if current:
            waves.append(current)
        return waves

    def _run_queue(self, wave: list, labelling: list, records: dict, out) -> None:
        """One continuous-batching queue of every (condition, task) row of ``wave`` (tasks longest prompt
        first within a condition, conditions in call order); rows are labelled in chunks of ``batch_size`` as
        they end, and each condition is written when its last row is labelled. ``labelling`` (chunks with the
        labeller) and ``records`` (labelled rows by condition) carry over from wave to wave, so the labelling of
        a wave's last rows goes on while the next wave generates."""
        items, steerings, owner = [], [], []
        for item in wave:
            _, _, arm, alpha, ids, vector = item
            steering = self._steering(arm, vector, alpha)
            for t in sorted(ids, key=lambda t: (-len(self.generator.prompt_ids(self.prompts[t])), t)):
                items.append((t, 0, self.prompts[t]))
                steerings.append(steering)
                owner.append(item)
        ready: list[tuple[int, Any]] = []     # finished rows not yet submitted for labelling

        def submit() -> None:
            chunk = ready[:]
            ready.clear()
            labelling.append((self.labeller.submit([s for _, s in chunk]), [owner[index] for index, _ in chunk]))

        def finished(rows: list[tuple[int, Any]]) -> None:
            ready.extend(rows)
            if len(ready) >= self.batch_size:
                submit()
            self._collect(labelling, records, out, wait=False)

        labels = sorted({a.label for _, _, a, _, _, _ in wave})
        self.bar.set_postfix_str(f"queue of {len(wave)} conditions ({', '.join(labels[:3])}"
                                 f"{', ...' if len(labels) > 3 else ''})")
        self.generator.generate_queue(items, 0, steering=steerings, slots=self.batch_size, on_samples=finished)
        if ready:
            submit()
        self._collect(labelling, records, out, wait=False)

    def _collect(self, labelling: list, records: dict, out, wait: bool, interrupted: bool = False) -> None:
        """Take every labelled chunk of ``labelling`` (with ``wait``, all of them, waiting); write each condition
        whose every row is labelled (its outcomes in task order, whatever order its chunks came back in).
        ``interrupted``: take only the chunks labelled without error, so an interrupted stage writes what it can."""
        for entry in list(labelling):
            future, owners = entry
            if not (wait or future.done()) or (interrupted and (future.cancelled() or future.exception())):
                continue
            labelling.remove(entry)       # before its rows are used: an interrupt below never takes it twice
            new = self.labeller.wait(future)
            self._count(len(new))
            for item, record in zip(owners, new):
                rows = records.setdefault(item[0], [])
                rows.append(record)
                if len(rows) == len(item[4]):
                    self._write(item, records.pop(item[0]), out)

    def _timed_collect(self, labelling: list, records: dict, out, started: float, todo: list) -> None:
        """The call's final wait for its labels, timed into :attr:`calls`: how long generation took, how long
        the call then waited and on what (the chunks still being labelled: their rows by arm kind, their
        timeouts, when each came back; the last five)."""
        generated = time.perf_counter()
        if not todo:
            return
        tail = [(future, {"rows": len(owners), "kinds": dict(Counter(item[2].kind for item in owners))})
                for future, owners in labelling]
        for future, entry in tail:
            future.add_done_callback(lambda _, e=entry: e.setdefault("done_after_s", time.perf_counter() - generated))
        self._collect(labelling, records, out, wait=True)
        ended = time.perf_counter()
        for future, entry in tail:
            entry["done_after_s"] = round(entry.get("done_after_s", ended - generated), 3)
            entry["timeouts"] = sum(r["status"] == "timeout" for r in future.result())
        last = sorted((entry for _, entry in tail), key=lambda e: -e["done_after_s"])
        self.calls.append({"conditions": len(todo), "rows": sum(len(item[4]) for item in todo),
                           "generation_s": round(generated - started, 3), "label_wait_s": round(ended - generated, 3),
                           "chunks_pending": len(tail), "rows_pending": sum(e["rows"] for _, e in tail),
                           "timeouts_pending": sum(e["timeouts"] for _, e in tail), "last_chunks": last[:5]})

    def close(self) -> None:
        """Stop the labelling thread (after the batch it labels) and close the bar, trimmed to what ran."""
        self.labeller.close()
        if self.bar.total and self.bar.n < self.bar.total:
            self.bar.total = self.bar.n                # refinement can need fewer alphas than planned
        self.n_conditions = self.n_done
        self._describe()
        self.bar.close()


def _outcome(r: dict[str, Any]) -> dict[str, Any]:
    return {"task_id": r["task_id"], "passed": bool(r["passed"]), "program": r["program"], "status": r["status"],
            "error_type": r["error_type"], "n_new_tokens": r["n_new_tokens"], "finish_reason": r["finish_reason"]}


# --------------------------------------------------------------------------- directions

def steering_vector(sae, latent: int, normalize: str) -> torch.Tensor:
    """(d_model,) float32: the unit-normalised decoder row, or the raw row ('raw', the thesis's coefficients)."""
    if normalize == "unit":
        return sae.unit_direction(latent).float().cpu()
    return sae.W_dec[int(latent)].float().cpu()


def random_direction(d_model: int, norm: float, seed: int) -> torch.Tensor:
    """A seeded direction uniform on the sphere, scaled to ``norm``."""
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(d_model, generator=g, dtype=torch.float32)
    return v / v.norm() * norm


def unembedding_direction(loaded, token: str, norm: float) -> torch.Tensor:
    """The unembedding row of ``token`` (a vocabulary entry such as '<eos>'), scaled to ``norm``."""
    ids = loaded.tokenizer.convert_tokens_to_ids([token])
    unk = getattr(loaded.tokenizer, "unk_token_id", None)
    if not ids or ids[0] is None or (ids[0] == unk and token != loaded.tokenizer.unk_token):
        raise InputError(f"steering.target=unembed:{token}: {token!r} is not a token of the model's vocabulary "
                         f"(e.g. unembed:{loaded.tokenizer.eos_token})")
    row = loaded.model.get_output_embeddings().weight[ids[0]].detach().float().cpu()
    return row / row.norm() * norm


def pick_control_latents(scores: dict[str, Any], target: int, n_correct: int, n_incorrect: int, n: int,
                         max_separation: float, max_general: float, seed: int,
                         allow_fewer: bool = False) -> list[dict[str, Any]]:
    """``n`` latents of the target's layer with |separation| <= max_separation that pass the general-text
    filter (frequency < max_general, as the target did), firing on the SAE-analysis split at a rate
    closest to the target's (ties in seeded random order). With ``allow_fewer`` as many as qualify."""
    fc, fi = np.asarray(scores["f_correct"]), np.asarray(scores["f_incorrect"])
    rate = (n_correct * fc + n_incorrect * fi) / (n_correct + n_incorrect)     # (d_sae,)
    ok = (np.abs(fc - fi) <= max_separation) & (rate > 0)
    if "general_frequency" in scores:
        ok &= np.asarray(scores["general_frequency"]) < max_general
    ok[target] = False
    candidates = np.flatnonzero(ok)
    if len(candidates) < n and not (allow_fewer and len(candidates)):
        raise InputError(f"only {len(candidates)} control latents have |separation| <= {max_separation}, pass the "
                         f"general filter and fire at all; raise steering.control_max_separation or lower "
                         f"steering.n_controls")
    tie = np.random.default_rng(seed).random(len(candidates))
    order = np.lexsort((tie, np.abs(rate[candidates] - rate[target])))
    return [{"latent": int(j), "firing_rate": float(rate[j]), "separation": float(fc[j] - fi[j])}
            for j in candidates[order[:n]]]


def control_arms(direction: str, layer: int, latents: list[dict[str, Any]], n_random: int, sae, normalize: str,
                 norm: float, seed: int) -> list[tuple[Arm, torch.Tensor]]:
    """Latent controls (their own decoder rows) then random controls (the target vector's norm)."""
    arms = [(Arm("latent", direction, layer, c["latent"], f"L{layer}:{c['latent']}"),
             steering_vector(sae, c["latent"], normalize)) for c in latents]
    d_model = sae.W_dec.shape[1]
    arms += [(Arm("random", direction, layer, None, f"random#{i}"),
              random_direction(d_model, norm, seed * 1000 + i + (0 if direction == "correct" else 500)))
             for i in range(n_random)]
    return arms


def interleave_kinds(arms: list[tuple[Arm, torch.Tensor]], n: int) -> list[tuple[Arm, torch.Tensor]]:
    """The first ``n`` controls taking kinds in turn (for the tuning grid: a few of each kind)."""
    by_kind: dict[str, list] = {}
    for a in arms:
        by_kind.setdefault(a[0].kind, []).append(a)
    out = []
    for i in range(max((len(v) for v in by_kind.values()), default=0)):
        out += [v[i] for v in by_kind.values() if i < len(v)]
    return out[:n]


# --------------------------------------------------------------------------- effects and alpha

def flips(baseline: dict[int, dict], steered: dict[int, dict], ids: list[int], baseline_passed: bool) -> np.ndarray:
    """(n_relevant,) bool: on tasks whose baseline outcome is ``baseline_passed``, whether steering changed it."""
    return outcome_flips(baseline, steered, ids, baseline_passed)


def rates(baseline: dict[int, dict], steered: dict[int, dict], ids: list[int]) -> dict[str, float | None]:
    """Correction (baseline-incorrect tasks that now pass) and corruption (baseline-correct ones that now fail)."""
    fix, brk = flips(baseline, steered, ids, False), flips(baseline, steered, ids, True)
    return {"correction": float(fix.mean()) if fix.size else None, "corruption": float(brk.mean()) if brk.size else None,
            "n_incorrect": int(fix.size), "n_correct": int(brk.size)}


def objective(direction: str) -> str:
    return "correction" if direction == "correct" else "corruption"


def choose_alpha(rows: list[dict[str, Any]], direction: str, max_corruption: float) -> tuple[dict[str, Any], bool]:
    """The grid row whose target effect exceeds the controls' mean effect the most (ties: the smaller alpha);
    the correct direction only among rows whose target corruption <= max_corruption. (row, constraint met)."""
    feasible = [r for r in rows if direction != "correct" or (r["target"]["corruption"] or 0.0) <= max_corruption]
    if not feasible:
        return min(rows, key=lambda r: r["alpha"]), False
    return max(feasible, key=lambda r: (r["specificity"], -r["alpha"])), True


class AlphaSearch:
    """The alpha grid (then its refinement) on the tuning split for the target and a few controls, step by step:
    :meth:`conditions` names what the next step generates, :meth:`record` takes their outputs, so the searches
    of several directions (and the baselines) share one pipelined call per step."""

    def __init__(self, cfg: Config, target: Arm, vector: torch.Tensor, controls: list[tuple[Arm, torch.Tensor]],
                 unit: float, tuning_ids: list[int], speculate: bool = False):
        self.s, self.target, self.vector, self.controls = cfg.steering, target, vector, controls
        self.speculate = speculate         # steering.speculate resolved (see speculates)
        self.unit, self.tuning_ids = unit, tuning_ids
        self.key = objective(target.direction)
        self.rows: dict[float, dict[str, Any]] = {}
        self.refined = 0
        self.wanted = [float(a) for a in self.s.alpha_grid]
        self.new: list[float] = []
        self.speculated: list[float] = []      # midpoints generated ahead (see speculative)

    def conditions(self) -> list[tuple[Arm, torch.Tensor | None, float, list[int]]]:
        """The target and every control at each alpha of the next step not yet evaluated ([] once done)."""
        while True:
            self.new = [a for a in dict.fromkeys(self.wanted) if a not in self.rows]
            if self.new or not self._refine():
                break
        return [(arm, v, a * self.unit, self.tuning_ids) for a in self.new
                for arm, v in [(self.target, self.vector), *self.controls]]

    def speculative(self) -> list[tuple[Arm, torch.Tensor | None, float, list[int]]]:
        """With ``speculate`` (``steering.speculate`` resolved), before the grid is evaluated: the target and every
        control at the midpoint of each pair of neighbouring grid alphas, whichever turns out best. Generated in the
        grid's call, the first refinement step then finds its conditions cached (:meth:`Steerer.run_many`) instead
        of waiting for a call of its own; only the midpoints :meth:`_refine` asks for enter :attr:`rows` (the others
        never reach the choice)."""
        if not self.speculate or self.s.refine_steps < 1 or self.rows or self.refined:
            return []
        grid = sorted(set(self.wanted))
        self.speculated = [float(np.sqrt(grid[i] * grid[i + 1])) for i in range(len(grid) - 1)]
        return [(arm, v, a * self.unit, self.tuning_ids) for a in self.speculated
                for arm, v in [(self.target, self.vector), *self.controls]]

    def record(self, outs: list[dict[int, dict]], baseline: dict[int, dict]) -> None:
        """The outputs of :meth:`conditions`' conditions, in its order; then the next refinement is planned."""
        if len(outs) != len(self.new) * (1 + len(self.controls)):
            raise ValueError(f"AlphaSearch.record got {len(outs)} outputs for {len(self.new)} alphas x "
                             f"{1 + len(self.controls)} arms")
        outs_iter = iter(outs)
        for a in self.new:
            t = rates(baseline, next(outs_iter), self.tuning_ids)
            each = [{"label": arm.label, "kind": arm.kind, **rates(baseline, next(outs_iter), self.tuning_ids)}
                    for arm, _ in self.controls]
            mean = {k: _mean([c[k] for c in each]) for k in ("correction", "corruption")}
            self.rows[a] = {"alpha": a, "alpha_abs": a * self.unit, "target": t, "controls_mean": mean,
                            "controls": each, "specificity": (t[self.key] or 0.0) - (mean[self.key] or 0.0)}
        self.new = []
        if not self._refine():
            self.wanted = []

    def _refine(self) -> bool:
        """Plan the next refinement (geometric midpoints between the best alpha and its neighbours); False when
        every refinement step is spent."""
        if self.refined >= self.s.refine_steps or not self.rows:
            return False
        self.refined += 1
        grid = sorted(self.rows)
        best, _ = choose_alpha(list(self.rows.values()), self.target.direction, self.s.max_corruption)
        i = grid.index(best["alpha"])
        self.wanted = [float(np.sqrt(grid[i] * grid[j])) for j in (i - 1, i + 1) if 0 <= j < len(grid)]
        return True

    def result(self) -> dict[str, Any]:
        table = [self.rows[a] for a in sorted(self.rows)]
        best, met = choose_alpha(table, self.target.direction, self.s.max_corruption)
        text = f"maximise {self.key} of the target minus the controls' mean {self.key}"
        if self.target.direction == "correct":
            text += f", subject to target corruption <= {self.s.max_corruption:.0%}"
        return {"table": table, "chosen": best, "constraint_met": met, "objective": text,
                "n_tasks": len(self.tuning_ids), "n_controls": len(self.controls),
                "speculative": {"generated": self.speculated,
                                "unused": [a for a in self.speculated if a not in self.rows]}}


def search_alphas(steerer: Steerer, searches: dict[str, AlphaSearch], first: list) -> tuple[list, dict[str, Any]]:
    """Every direction's alpha search, step by step, all directions' conditions of a step in one pipelined call;
    ``first`` (the baselines) joins the first call, and its outputs are returned with the searches' results
    (the baseline of the tuning split being ``first``'s first condition). The speculative conditions of each
    search (:meth:`AlphaSearch.speculative`) join the first call too: the next step reads them from the cache."""
    conditions = {d: search.conditions() for d, search in searches.items()}
    ahead = [c for search in searches.values() for c in search.speculative()]
    outs = steerer.run_many(first + [c for cs in conditions.values() for c in cs] + ahead)
    head, outs = outs[:len(first)], outs[len(first):len(outs) - len(ahead)]
    baseline = head[0]
    while any(conditions.values()):
        for d, cs in conditions.items():
            searches[d].record(outs[:len(cs)], baseline)
            outs = outs[len(cs):]
        conditions = {d: search.conditions() for d, search in searches.items()}
        outs = steerer.run_many([c for cs in conditions.values() for c in cs]) if any(conditions.values()) else []
    return head, {d: search.result() for d, search in searches.items()}


def transferred_alpha(inputs: dict[str, Any], direction: str, row: dict[str, Any], unit: float,
                      cfg: Config) -> dict[str, Any]:
    """The base run's chosen coefficient (``validation.transfer_from``) in place of tuning: the same absolute
    coefficient on the same vector, expressed in this run's alpha units."""
    base = inputs["transfer"]
    if inputs["choices"].get("transfer", {}).get("base_run") != str(base.run.root):
        raise StaleInputError(f"this run's validation stage did not transfer from {base.run.root}; rerun `pva-sae "
                              f"validate` with --transfer-from {base.run.root} first")
    taken = base.alpha(direction)
    if (taken["layer"], taken["latent"]) != (int(row["layer"]), int(row["latent"])) or \
            taken["normalize"] != cfg.steering.normalize:
        raise InputError(f"cannot reuse the {direction} alpha of {base.run.root}: it steered L{taken['layer']}:"
                         f"{taken['latent']} with steering.normalize={taken['normalize']}; use its steering settings")
    return {"chosen": {"alpha": taken["alpha_abs"] / unit}, "table": [], "constraint_met": None, "transfer": taken,
            "objective": f"transferred from {base.run.root} (same absolute coefficient)"}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# --------------------------------------------------------------------------- statistics

def experiment(baseline: dict[int, dict], target: dict[int, dict], controls: list[tuple[Arm, dict[int, dict]]],
               ids: list[int], baseline_passed: bool, cfg: Config) -> dict[str, Any]:
    """Every statistic of one experiment: target vs its controls on the relevant tasks, and McNemar of
    each arm against the alpha = 0 baseline over all tasks."""
    s = cfg.steering
    res = arm_experiment(baseline, target, controls, ids, baseline_passed, n_permutations=s.n_permutations,
                         n_resamples=s.bootstrap_resamples, seed=s.seed, level=s.ci_level, null=NULL_UNCHANGED)
    rel = [i for i in ids if baseline[i]["passed"] == baseline_passed]
    res["mean_similarity"] = (float(np.mean([_similarity(baseline[i], target[i]) for i in rel])) if rel else None)
    return res


def _similarity(a: dict[str, Any], b: dict[str, Any]) -> float:
    return program_similarity(a["program"], b["program"])


@functools.lru_cache(maxsize=1 << 16)
def program_similarity(a: str, b: str) -> float:
    """difflib's ratio of two programs, remembered: most steered programs equal their baseline's, so a study's
    55,000 pairs hold a few thousand distinct ones (15 s of the steering stage on the GPU host before)."""
    return difflib.SequenceMatcher(None, a, b).ratio()


def add_holm(experiments: dict[str, dict[str, Any]]) -> None:
    """Holm adjustment of each test across the run's experiments, beside the raw p (``holm_p``)."""
    names = list(experiments)
    for test in HOLM_TESTS:
        adjusted = holm([experiments[n][test]["p"] for n in names])
        for n, p in zip(names, adjusted):
            experiments[n].setdefault("holm_p", {})[test] = None if p is None or np.isnan(p) else float(p)


def net_effects(baseline: dict[int, dict], target: dict[int, dict], controls: list[tuple[Arm, dict[int, dict]]],
                ids: list[int], cfg: Config) -> dict[str, Any]:
    """Delta pass@1 over all tasks (corrections minus corruptions, over n) for the target and every control."""
    s = cfg.steering
    before = [baseline[i]["passed"] for i in ids]

    def one(out):
        return net_effect(before, [out[i]["passed"] for i in ids], s.bootstrap_resamples, s.seed, s.ci_level)

    each = [{"label": arm.label, "kind": arm.kind, **one(out)} for arm, out in controls]
    estimates = [c["estimate"] for c in each if c["estimate"] is not None]
    return {"target": one(target), "controls": each,
            "controls_mean": float(np.mean(estimates)) if estimates else None}


def selective(baseline: dict[int, dict], steered: dict[int, dict], ids: list[int], flagged: set[int],
              cfg: Config) -> dict[str, Any]:
    """Selective steering: flagged tasks take the steered outcome, the others keep the baseline's; compared
    with constant steering by the paired difference of net effects."""
    s = cfg.steering
    before = [baseline[i]["passed"] for i in ids]
    constant = [steered[i]["passed"] for i in ids]
    chosen = [steered[i]["passed"] if i in flagged else baseline[i]["passed"] for i in ids]
    sel, const = ({k: v for k, v in rates(baseline, {i: {"passed": p} for i, p in zip(ids, after)}, ids).items()}
                  for after in (chosen, constant))
    n_flagged = len(flagged & set(ids))
    return {"n_flagged": n_flagged, "n_tasks": len(ids), "flags_every_task": n_flagged == len(ids),
            "selective": {**sel, "net_effect": net_effect(before, chosen, s.bootstrap_resamples, s.seed, s.ci_level)},
            "constant": {**const, "net_effect": net_effect(before, constant, s.bootstrap_resamples, s.seed,
                                                            s.ci_level)},
            "selective_minus_constant": net_effect_difference(before, chosen, constant, s.bootstrap_resamples, s.seed,
                                                              s.ci_level)}


# --------------------------------------------------------------------------- stage

def load_inputs(run: RunDir, cfg: Config) -> dict[str, Any]:
    if cfg.generation.temperature != 0:
        raise InputError("steering compares greedy generations with the greedy build: set generation.temperature=0")
    for stage in ("build", "analyze", "validate"):
        if not run.is_done(stage):
            raise MissingInputError(f"{run.root} has no finished {stage} stage; run `pva-sae {stage} --run-dir "
                                    f"{run.root}` first")
    apaths = AnalysisPaths.of(run)
    summary = read_analysis_summary(apaths)
    base = (transfer_base(cfg.validation.transfer_from, run, cfg.to_dict(), need_steering=True)
            if cfg.validation.transfer_from else None)  # transfer: the base run's latents and alphas, no tuning
    targets = (base.choices["steering_selection"] if base else
               select_latents(load_ranked(apaths), cfg.steering.selection_metric))
    acts, task_ids, layers, _, _ = load_activations(apaths.activations)
    saes = {int(t["layer"]): load_layer_sae(cfg, summary["release"], int(t["layer"]), acts.shape[-1])
            for t in targets.values()}
    sae_ids = set(read_splits(run)["sae"])
    sae_rows = [i for i, t in enumerate(task_ids) if t in sae_ids]
    norms = {layer: float(acts[sae_rows, layers.index(layer)].norm(dim=-1).mean()) for layer in saes}
    vpaths = ValidationPaths.of(run)
    return {"records": {r["task_id"]: r for r in load_records(run.root) if r["sample_index"] == 0},
            "summary": summary, "targets": targets, "saes": saes, "norms": norms, "choices": read_choices(vpaths),
            "validation": read_validation_results(vpaths), "predictions": read_validation_scores(vpaths),
            "scores": load_scores(apaths), "transfer": base}


def flagged_tasks(inputs: dict[str, Any], ids: list[int]) -> tuple[set[int], dict[str, Any]]:
    """Tasks where the frozen incorrect-predictor latent reaches its tuned threshold (selective steering)."""
    pred = next(p for p in inputs["choices"]["predictors"] if p["name"] == "latent" and p["direction"] == "incorrect")
    table = inputs["predictions"]
    scores = dict(zip(table["task_id"], table["incorrect/latent"]))
    return {t for t in ids if scores[t] >= pred["threshold"]}, pred


def target_arm(cfg: Config, steerer: Steerer, direction: str, latent_row: dict[str, Any], sae) -> tuple[Arm, torch.Tensor]:
    """The arm steered as 'the target': the chosen latent, or (``steering.target``) a random direction or a
    token's unembedding row at the latent vector's norm."""
    s = cfg.steering
    layer, latent = int(latent_row["layer"]), int(latent_row["latent"])
    vector = steering_vector(sae, latent, s.normalize)
    if s.target == "latent":
        return Arm("target", direction, layer, latent, f"L{layer}:{latent}"), vector
    norm = float(vector.norm())
    if s.target == "random":
        seed = s.seed * 7919 + (1 if direction == "correct" else 2)
        return Arm("target", direction, layer, None, "random-target"), random_direction(vector.numel(), norm, seed)
    token = s.target.split(":", 1)[1]
    return (Arm("target", direction, layer, None, f"unembed:{token}"),
            unembedding_direction(steerer.loaded, token, norm))


def speculates(cfg: Config, steerer: Steerer) -> bool:
    """steering.speculate resolved: 'auto' when the stage labels beside generation (its waits for labels then cost
    more than the extra generations; on CPU, where the two take turns, speculation would only add generations)."""
    setting = cfg.steering.speculate
    return steerer.labeller.overlapped if setting == "auto" else setting == "on"


def planned_work(cfg: Config, n_directions: int, n_tuning: int, n_validation: int,
                 speculate: bool = False) -> tuple[int, int]:
    """Conditions and generations the stage runs at most (refinement may need fewer alphas): the two baselines,
    then per direction the tuning grid (target + tuning controls at every alpha) and the validation arms."""
    s = cfg.steering
    # speculation generates every grid midpoint in the first call, of which the first refinement asks for two
    ahead = max(len(s.alpha_grid) - 3, 0) if speculate and s.refine_steps else 0
    n_alphas = 0 if s.alphas is not None else len(s.alpha_grid) + 2 * s.refine_steps + ahead
    tuning_arms = n_alphas * (1 + min(s.tuning_controls, s.n_controls))
    conditions = 2 + n_directions * (tuning_arms + 1 + s.n_controls)
    samples = n_tuning + n_validation + n_directions * (tuning_arms * n_tuning + (1 + s.n_controls) * n_validation)
    return conditions, samples


def steer(cfg: Config, progress: bool = True, *, loaded=None) -> dict[str, Any]:
    """Run the stage; returns the results written to ``steering/results.json``. ``loaded`` reuses a model
    already in memory (a LoadedModel, or a callable returning one)."""
    started = time.perf_counter()
    run = RunDir.at(cfg.output.run_dir)
    paths = SteeringPaths.of(run)
    inputs = load_inputs(run, cfg)
    check_run_config(run, STAGE, cfg.to_dict(), UPSTREAM_FIELDS)
    check_run_config(run, STAGE, cfg.to_dict(), SAE_FIELDS, against=AnalysisPaths.of(run).config)
    digests = check_chain(run, STAGE)
    paths.root.mkdir(parents=True, exist_ok=True)
    setup_logging(run.log_file(STAGE))
    atomic_write_json(paths.config, cfg.to_dict())
    s, records, summary = cfg.steering, inputs["records"], inputs["summary"]
    splits = read_splits(run)
    tuning_ids = seeded_subset([t for t in splits["tuning"] if t in records], s.tuning_max_tasks, s.seed)
    val_ids = seeded_subset([t for t in splits["validation"] if t in records], s.max_tasks, s.seed)
    steerer = Steerer(cfg, run, progress, loaded=loaded)
    speculate = speculates(cfg, steerer)
    n_conditions, n_samples = planned_work(cfg, len(inputs["targets"]), len(tuning_ids), len(val_ids), speculate)
    announce(STAGE, f"{len(inputs['targets'])} directions x (target + {s.n_controls} controls) on {len(val_ids)} "
                    f"validation tasks, alpha tuned on {len(tuning_ids)} tuning tasks: up to {n_conditions} "
                    f"conditions, {n_samples} generations (batches of up to {steerer.batch_size})", progress)
    steerer.expect(n_conditions, n_samples)
    try:
        results: dict[str, Any] = {"design": _design(cfg), "directions": {}, "experiments": {}}
        outcomes: dict[str, tuple[dict, list]] = {}
        plans: dict[str, dict[str, Any]] = {}
        for direction, row in inputs["targets"].items():
            layer = int(row["layer"])
            sae = inputs["saes"][layer]
            arm, vector = target_arm(cfg, steerer, direction, row, sae)
            latents = pick_control_latents(inputs["scores"][layer], int(row["latent"]), summary["n_correct"],
                                           summary["n_incorrect"], s.n_controls // 2, s.control_max_separation,
                                           cfg.analysis.general_max_frequency, s.seed, allow_fewer=True)
            shortfall = s.n_controls // 2 - len(latents)
            if shortfall:
                log.warning("%s direction: only %d latents of layer %d qualify as controls (|separation| <= %g, "
                            "general frequency < %g); the other %d controls are random directions",
                            direction, len(latents), layer, s.control_max_separation,
                            cfg.analysis.general_max_frequency, s.n_controls - len(latents))
            controls = control_arms(direction, layer, latents, s.n_controls - len(latents), sae, s.normalize,
                                    float(vector.norm()), s.seed)
            unit = inputs["norms"][layer] if s.alpha_units == "residual_norm" else 1.0
            plans[direction] = {"row": row, "layer": layer, "sae": sae, "arm": arm, "vector": vector,
                                "latents": latents, "shortfall": shortfall, "controls": controls, "unit": unit}
        # Alpha: transferred or fixed (known, or refused, before anything is generated), else tuned on the
        # tuning split (every direction's search step by step, the baselines in its first call, so each step's
        # generation and labelling run as one pipelined call).
        tuned: dict[str, dict[str, Any]] = {}
        if inputs["transfer"]:
            tuned = {d: transferred_alpha(inputs, d, p["row"], p["unit"], cfg) for d, p in plans.items()}
        elif s.alphas is not None:
            tuned = {d: {"chosen": {"alpha": s.alphas[0 if d == "correct" else 1]}, "table": [],
                         "objective": "fixed by steering.alphas", "constraint_met": None} for d in plans}
        searches = {} if tuned else {
            d: AlphaSearch(cfg, p["arm"], p["vector"], interleave_kinds(p["controls"], s.tuning_controls),
                           p["unit"], tuning_ids, speculate) for d, p in plans.items()}
        (base_tuning, base_val), searched = search_alphas(
            steerer, searches, [(BASELINE, None, 0.0, tuning_ids), (BASELINE, None, 0.0, val_ids)])
        tuned = tuned or searched
        # Validation: every direction's target and controls at its alpha, in one pipelined call.
        alphas = {d: tuned[d]["chosen"]["alpha"] * p["unit"] for d, p in plans.items()}
        outs = iter(steerer.run_many([(a, v, alphas[d], val_ids) for d, p in plans.items()
                                      for a, v in [(p["arm"], p["vector"]), *p["controls"]]]))
        for direction, p in plans.items():
            arm, controls, latents, layer, sae = p["arm"], p["controls"], p["latents"], p["layer"], p["sae"]
            alpha = alphas[direction]
            target_out = next(outs)
            control_out = [(a, next(outs)) for a, _ in controls]
            outcomes[direction] = (target_out, control_out)
            results["directions"][direction] = {
                "target": {**arm.as_dict(), "latent_row": p["row"], "alpha": tuned[direction]["chosen"]["alpha"],
                           "alpha_abs": alpha, "alpha_units": s.alpha_units, "mean_residual_norm": inputs["norms"][layer],
                           "vector_norm": float(p["vector"].norm()),
                           "decoder_norm": float(sae.W_dec[int(p["row"]["latent"])].norm()),
                           "normalize": s.normalize, "positions": s.positions,
                           "validation": _validated(inputs["validation"], p["row"])},
                "tuning": tuned[direction],
                "controls": [{**a.as_dict(), **next((c for c in latents if c["latent"] == a.latent), {})}
                             for a, _ in controls],
                "control_kinds": {"latent": len(latents), "random": len(controls) - len(latents),
                                  "latent_shortfall": p["shortfall"]},
                "net_effect": net_effects(base_val, target_out, control_out, val_ids, cfg),
            }
        for name, (direction, baseline_passed) in EXPERIMENTS.items():
            target_out, control_out = outcomes[direction]
            results["experiments"][name] = {"direction": direction,
                                            "target": results["directions"][direction]["target"]["label"],
                                            **experiment(base_val, target_out, control_out, val_ids, baseline_passed,
                                                         cfg)}
        add_holm(results["experiments"])
        if inputs["transfer"]:  # the steering rates against controls beside the base run's
            results["transfer"] = {**inputs["transfer"].describe(),
                                   "alphas": {d: r["tuning"]["transfer"] for d, r in results["directions"].items()},
                                   "experiments": compare_experiments(inputs["transfer"].steering["experiments"],
                                                                      results["experiments"])}
        flips_nf = sum(records[t]["passed"] != base_val[t]["passed"] for t in val_ids)
        results["noise_floor"] = {"n": len(val_ids), "flips": flips_nf, "rate": flips_nf / len(val_ids) if val_ids else None,
                                  "identical_programs": sum(records[t]["program"] == base_val[t]["program"]
                                                            for t in val_ids),
                                  "compared": "build record vs the alpha = 0 re-run"}
        flagged, predictor = flagged_tasks(inputs, val_ids)
        results["selective"] = {"predictor": {k: predictor[k] for k in ("label", "layer", "latent", "threshold")},
                                **selective(base_val, outcomes["correct"][0], val_ids, flagged, cfg)}
        results["tasks"] = {"validation": len(val_ids), "tuning": len(tuning_ids), "generated": steerer.n_generated}
    finally:
        steerer.close()
    _save_tasks(paths, results, base_val, outcomes, val_ids)
    # Timing apart from the results (which are the same from run to run): the queue schedule's calls.
    atomic_write_json(paths.calls, {"schedule": steerer.schedule, "calls": steerer.calls})
    if s.plots:
        results["plots"] = [str(p.relative_to(run.root)) for p in plot_steering(paths.plots, results)]
    results["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(paths.results, results)
    run.mark_done(STAGE, {"generated": steerer.n_generated,
                          "inputs": {**{k: digests.get(k) for k in ("records", "activations", "scores", "ranked",
                                                                    "choices")},
                                     "config": sections_digest(cfg.to_dict(), ("steering",))},
                          "outputs": {"results": file_digest(paths.results)}})
    return results


def _design(cfg: Config) -> dict[str, Any]:
    s = cfg.steering
    return {"target": s.target, "n_controls": s.n_controls, "control_kinds": {"latent": s.n_controls // 2,
                                                                            "random": s.n_controls - s.n_controls // 2},
            "tuning_controls": s.tuning_controls, "baseline": "alpha = 0 re-run, same tasks and batch plan",
            "positions": s.positions, "n_permutations": s.n_permutations, "bootstrap_resamples": s.bootstrap_resamples,
            "seed": s.seed, "level": s.ci_level}


def _validated(validation: dict[str, Any], row: dict[str, Any]) -> dict[str, Any] | None:
    """The validation stage's metrics of this very latent as a predictor (one latent identity in the report)."""
    for rows in validation.get("validation", {}).values():
        for r in rows:
            if r.get("layer") == row["layer"] and r.get("latent") == row["latent"]:
                return {"label": r["label"], "name": r["name"], "direction": r["direction"],
                        "auroc": r["metrics"]["auroc"], "f1": r["metrics"]["f1"]}
    return None


def _save_tasks(paths: SteeringPaths, results, base_val, outcomes, val_ids) -> None:
    rows = []
    for direction, (target_out, control_out) in outcomes.items():
        for arm_label, kind, out in [(results["directions"][direction]["target"]["label"], "target", target_out)] + \
                [(a.label, a.kind, o) for a, o in control_out]:
            rows += [{"direction": direction, "arm": arm_label, "kind": kind, "task_id": t,
                      "baseline_passed": base_val[t]["passed"], "steered_passed": out[t]["passed"],
                      "similarity": _similarity(base_val[t], out[t]), "status": out[t]["status"],
                      "error_type": out[t]["error_type"], "n_new_tokens": out[t]["n_new_tokens"],
                      "finish_reason": out[t]["finish_reason"], "baseline_program": base_val[t]["program"],
                      "program": out[t]["program"]} for t in val_ids]
    write_steered_tasks(paths, rows)
