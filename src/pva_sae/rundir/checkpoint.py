"""Checkpoints, autosaves and emergency saves for long dataset builds, and resume.

Records are appended to a journal (``checkpoints/journal_<session>.jsonl``, one record a line, flushed
and fsynced before any save refers to them); a checkpoint is a small JSON file naming its journal, how
many of its lines it covers, the indices of the finished generation batches and the config. So a save
costs the new records only (not every record again), and a build killed at any moment (SIGKILL
included) leaves complete checkpoints: a journal line past a checkpoint's count is never read for it.
A resumed build starts a new journal holding the resumed records, so a checkpoint's lines never change.
Because the batch plan is a pure function of the config (see ``generation.plan_batches``), resuming skips
the finished batches and regenerates the rest exactly as an uninterrupted run would: nothing lost, nothing
duplicated.

Which checkpoint is the latest is decided by the sequence number stored inside each file (and the
record count), never by file modification times.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pva_sae.config import CheckpointConfig, record_fields_differing
from pva_sae.errors import InputError, PvaSaeError
from pva_sae.rundir.atomic import atomic_write_json, read_json, timestamp
from pva_sae.rundir.paths import RunDir

log = logging.getLogger(__name__)

FORMAT_VERSION = 2   # 1 held the records inline; still read
JOURNAL_PREFIX = "journal_"
KINDS = ("checkpoint", "autosave", "emergency")


class CheckpointError(PvaSaeError, RuntimeError):
    """A checkpoint cannot be used; the message names the file and what to do."""


@dataclass
class BuildState:
    """Everything needed to continue a build."""

    records: list[dict[str, Any]] = field(default_factory=list)
    done_batches: set[int] = field(default_factory=set)
    sequence: int = 0
    source: Path | None = None

    @property
    def n_records(self) -> int:
        return len(self.records)


def checkpoint_name(kind: str, start: int, end: int, sequence: int) -> str:
    return f"{kind}_{start}_{end}_{timestamp()}_{sequence:05d}.json"


def write_state(path: Path, state: BuildState, config: dict[str, Any], kind: str,
                journal: Path | None = None) -> None:
    """A save of ``state``: with ``journal``, a reference to its first ``n_records`` lines; without, the
    records inline (format 1, for small hand-made states)."""
    body: dict[str, Any] = {
        "format_version": FORMAT_VERSION if journal is not None else 1,
        "kind": kind,
        "sequence": state.sequence,
        "written": timestamp(),
        "n_records": state.n_records,
        "done_batches": sorted(state.done_batches),
        "config": config,
    }
    if journal is None:
        body["records"] = state.records
    else:
        body["journal"] = journal.name
    atomic_write_json(path, body)


def read_state(path: Path) -> tuple[BuildState, dict[str, Any]]:
    """Load a checkpoint; CheckpointError names the file and the fix when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; list checkpoints with "
                              "`pva-sae checkpoints --run-dir ...`")
    try:
        raw = read_json(path)
    except InputError as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupted ({exc}); delete it or pass another one with "
            "--resume-from, or start over with --no-resume") from None
    needed = ("format_version", "sequence", "done_batches", "config")
    missing = [k for k in needed if k not in raw] if isinstance(raw, dict) else list(needed)
    if not missing and "records" not in raw and "journal" not in raw:
        missing = ["records or journal"]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a pva-sae checkpoint "
                              "or corrupted; delete it or start over with --no-resume")
    if raw["format_version"] not in (1, FORMAT_VERSION):
        raise CheckpointError(f"checkpoint {path} has format {raw['format_version']}, this version reads "
                              f"{FORMAT_VERSION}; start over with --no-resume")
    records = list(raw["records"]) if "records" in raw else _journal_records(path, raw)
    state = BuildState(records=records, done_batches=set(raw["done_batches"]),
                       sequence=int(raw["sequence"]), source=path)
    return state, raw["config"]


def _journal_records(path: Path, raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The first ``n_records`` lines of the checkpoint's journal (it lives in the checkpoints folder)."""
    journal = path.parent.parent / "checkpoints" / raw["journal"]
    n = int(raw["n_records"])
    records = []
    try:
        with open(journal, encoding="utf-8") as fh:
            for line in fh:
                if len(records) == n:
                    break
                records.append(json.loads(line))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: its journal {journal} is missing or damaged ({exc}); pass "
                              "another checkpoint with --resume-from, or start over with --no-resume") from None
    if len(records) < n:
        raise CheckpointError(f"checkpoint {path}: its journal {journal} holds {len(records)} of its {n} records; "
                              "pass another checkpoint with --resume-from, or start over with --no-resume")
    return records


class Checkpointer:
    """Writes checkpoints every N records, autosaves every T seconds and emergency saves on demand."""

    def __init__(self, run: RunDir, cfg: CheckpointConfig, config: dict[str, Any], start: int, end: int,
                 clock: Callable[[], float] | None = None):
        import time

        self.run, self.cfg, self.config = run, cfg, config
        self.start, self.end = start, end
        self.clock = clock or time.monotonic
        self.last_checkpoint_records = 0
        self.last_save_time = self.clock()
        self.sequence = max((_sequence_in_name(p) for p in self.candidates()), default=0)
        self.journal: Path | None = None   # this session's journal, made at the first save
        self.journaled = 0                 # records of the current state already in it

    # --- discovery
    def candidates(self) -> list[Path]:
        paths: list[Path] = []
        for folder in (self.run.checkpoints, self.run.autosaves):
            if folder.is_dir():
                paths.extend(p for p in folder.glob("*.json") if p.name.split("_")[0] in KINDS)
        return paths

    def find_latest(self) -> Path | None:
        """The readable save with the highest (sequence, record count); unreadable ones are reported.

        A save of 0 records (a build interrupted before its first batch finished) is never the latest: it
        holds nothing to resume, so it is not offered."""
        best: tuple[int, int] | None = None
        best_path = None
        for path in self.candidates():
            try:
                with open(path, encoding="utf-8") as fh:
                    head = json.load(fh)
                key = (int(head["sequence"]), int(head["n_records"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable save %s (%s)", path, exc)
                continue
            if key[1] == 0:
                continue
            if best is None or key > best:
                best, best_path = key, path
        return best_path

    # --- resume
    def load_for_resume(self, path: Path) -> BuildState:
        state, saved_config = read_state(path)
        differing = record_fields_differing(saved_config, self.config)
        if differing:
            raise CheckpointError(
                f"checkpoint {path} was made with a different config; differing fields: {', '.join(differing)}. "
                "Rerun with the same config, or start over with --no-resume.")
        self.last_checkpoint_records = state.n_records
        self.journal, self.journaled = None, 0    # the next save starts a new journal with these records
        return state

    # --- writing
    def maybe_save(self, state: BuildState) -> Path | None:
        """Checkpoint when N new records accumulated; else autosave when T seconds passed."""
        if state.n_records - self.last_checkpoint_records >= self.cfg.every_n_records:
            self.last_checkpoint_records = state.n_records
            return self.save(state, "checkpoint")
        if self.clock() - self.last_save_time >= self.cfg.autosave_interval_s:
            return self.save(state, "autosave")
        return None

    def save(self, state: BuildState, kind: str) -> Path:
        # The checkpointer owns the counter so that two saves never share a name or a sequence.
        self.sequence = max(self.sequence, state.sequence) + 1
        state.sequence = self.sequence
        folder = self.run.autosaves if kind == "autosave" else self.run.checkpoints
        path = folder / checkpoint_name(kind, self.start, self.end, state.sequence)
        self._append(state)
        write_state(path, state, self.config, kind, journal=self.journal)
        self.last_save_time = self.clock()
        if kind == "autosave":
            self._prune(folder, "autosave", self.cfg.keep_autosaves)
        elif kind == "checkpoint":
            self._prune(folder, "checkpoint", self.cfg.keep_checkpoints)
        log.info("%s written: %s (%d records)", kind, path, state.n_records)
        return path

    def _append(self, state: BuildState) -> None:
        """Add the records not yet journaled (``state.records`` only grows during a build), then fsync."""
        if self.journal is None:
            self.run.checkpoints.mkdir(parents=True, exist_ok=True)
            self.journal = self.run.checkpoints / f"{JOURNAL_PREFIX}{self.sequence:05d}_{timestamp()}.jsonl"
            self.journaled = 0
        if state.n_records < self.journaled:
            raise CheckpointError("internal: a build's records may only grow between saves")
        with open(self.journal, "a", encoding="utf-8") as fh:
            for record in state.records[self.journaled:]:
                fh.write(json.dumps(record, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.journaled = state.n_records

    def _prune(self, folder: Path, kind: str, keep: int) -> None:
        saves = sorted(folder.glob(f"{kind}_*.json"), key=lambda p: p.stem.rsplit("_", 1)[-1])
        for old in saves[:-keep] if keep > 0 else saves:
            old.unlink(missing_ok=True)
        self._drop_unreferenced_journals()

    def _drop_unreferenced_journals(self) -> None:
        """Journals no save refers to any more (their saves were pruned), except the one in use."""
        referenced = {self.journal.name} if self.journal else set()
        for path in self.candidates():
            try:
                referenced.add(read_json(path).get("journal"))
            except InputError:
                continue
        for journal in self.run.checkpoints.glob(f"{JOURNAL_PREFIX}*.jsonl"):
            if journal.name not in referenced:
                journal.unlink(missing_ok=True)

    def supersede(self) -> Path | None:
        """Move existing saves aside (start-over runs keep old work instead of deleting it)."""
        existing = self.candidates()
        if self.run.checkpoints.is_dir():
            existing += list(self.run.checkpoints.glob(f"{JOURNAL_PREFIX}*.jsonl"))
        if not existing:
            return None
        target = self.run.datasets / f"superseded_{timestamp()}"
        target.mkdir(parents=True, exist_ok=True)
        for path in existing:
            path.rename(target / path.name)
        return target


def _sequence_in_name(path: Path) -> int:
    try:
        return int(path.stem.rsplit("_", 1)[-1])
    except ValueError:
        return 0


def ask_resume(n_records: int, path: Path, input_fn: Callable[[str], str] = input) -> bool:
    """Ask until the answer is y/yes (resume) or n/no (start over); any other answer asks again, so a stray
    key never discards saved work. End of input (no one to answer) resumes, as a non-interactive run does."""
    question = f"Found checkpoint with {n_records} processed records ({path.name}). Resume? (y/n) "
    while True:
        try:
            answer = input_fn(question).strip().lower()
        except EOFError:
            return True
        if answer in ("y", "yes"):
            return True
        if answer in ("n", "no"):
            return False
        question = "Please answer y (resume) or n (start over; earlier saves are moved aside). Resume? (y/n) "


def decide_resume(cp: Checkpointer, cfg: CheckpointConfig, interactive: bool | None = None,
                  input_fn: Callable[[str], str] = input) -> BuildState:
    """Apply checkpoint.resume / resume_from and return the state to continue from (maybe empty)."""
    if cfg.resume_from:
        return cp.load_for_resume(Path(cfg.resume_from))
    if cfg.resume == "never":
        moved = cp.supersede()
        if moved:
            log.warning("starting over; earlier saves moved to %s", moved)
        return BuildState()
    latest = cp.find_latest()
    if latest is None:
        return BuildState()
    interactive = sys.stdin.isatty() if interactive is None else interactive
    if cfg.resume == "ask" and interactive:
        state, _ = read_state(latest)
        if not ask_resume(state.n_records, latest, input_fn):
            moved = cp.supersede()
            log.warning("starting over; earlier saves moved to %s", moved)
            return BuildState()
    state = cp.load_for_resume(latest)
    log.warning("resuming from %s (%d records, %d batches done)", latest, state.n_records, len(state.done_batches))
    return state
