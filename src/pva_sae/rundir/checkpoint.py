"""Checkpoints, autosaves and emergency saves for long dataset builds, and resume.

A checkpoint is one JSON file holding every record produced so far plus the indices of the finished
generation batches and the config it was made under. Files are written atomically, so a build killed
at any moment (SIGKILL included) leaves only complete checkpoints. Because the batch plan is a pure
function of the config (see ``generation.plan_batches``), resuming skips the finished batches and
regenerates the rest exactly as an uninterrupted run would: nothing lost, nothing duplicated.

Which checkpoint is the latest is decided by the sequence number stored inside each file (and the
record count), never by file modification times.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pva_sae.config import CheckpointConfig, record_fields_differing
from pva_sae.errors import InputError, PvaSaeError
from pva_sae.rundir.atomic import atomic_write_json, read_json, timestamp
from pva_sae.rundir.paths import RunDir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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


def write_state(path: Path, state: BuildState, config: dict[str, Any], kind: str) -> None:
    atomic_write_json(path, {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "sequence": state.sequence,
        "written": timestamp(),
        "n_records": state.n_records,
        "done_batches": sorted(state.done_batches),
        "config": config,
        "records": state.records,
    })


def read_state(path: Path) -> tuple[BuildState, dict[str, Any]]:
    """Load a checkpoint; CheckpointError names the file and the fix when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; list checkpoints with `pva-sae checkpoints --run-dir ...`")
    try:
        raw = read_json(path)
    except InputError as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupted ({exc}); delete it or pass another one with "
            "--resume-from, or start over with --no-resume") from None
    needed = ("format_version", "sequence", "done_batches", "config", "records")
    missing = [k for k in needed if k not in raw] if isinstance(raw, dict) else list(needed)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a pva-sae checkpoint "
                              "or corrupted; delete it or start over with --no-resume")
    if raw["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {raw['format_version']}, this pva-sae reads "
                              f"{FORMAT_VERSION}; start over with --no-resume")
    state = BuildState(records=list(raw["records"]), done_batches=set(raw["done_batches"]),
                       sequence=int(raw["sequence"]), source=path)
    return state, raw["config"]


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

    # --- discovery
    def candidates(self) -> list[Path]:
        paths: list[Path] = []
        for folder in (self.run.checkpoints, self.run.autosaves):
            if folder.is_dir():
                paths.extend(p for p in folder.glob("*.json") if p.name.split("_")[0] in KINDS)
        return paths

    def find_latest(self) -> Path | None:
        """The readable save with the highest (sequence, record count); unreadable ones are reported."""
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
        write_state(path, state, self.config, kind)
        self.last_save_time = self.clock()
        if kind == "autosave":
            self._prune(folder, "autosave", self.cfg.keep_autosaves)
        log.info("%s written: %s (%d records)", kind, path, state.n_records)
        return path

    def _prune(self, folder: Path, kind: str, keep: int) -> None:
        saves = sorted(folder.glob(f"{kind}_*.json"), key=lambda p: p.stem.rsplit("_", 1)[-1])
        for old in saves[:-keep] if keep > 0 else saves:
            old.unlink(missing_ok=True)

    def supersede(self) -> Path | None:
        """Move existing saves aside (start-over runs keep old work instead of deleting it)."""
        existing = self.candidates()
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
    """The seed's interactive question. Anything but y/yes means start over."""
    try:
        answer = input_fn(f"Found checkpoint with {n_records} processed records ({path.name}). Resume? (y/n) ")
    except EOFError:
        return True
    return answer.strip().lower() in ("y", "yes")


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
