"""The label cache: a job's label, stored by a hash of everything it is a function of.

A label (status, error type, detail, output tails) is a pure function of the program, the setup
code, the test asserts, the sandbox settings that bound the program (:data:`LABEL_FIELDS`), the
protections active on the machine (:func:`pva_sae.execution.sandbox.probe`: a program that tries
the network or ``/tmp`` sees them), the interpreter that runs it and the sandbox's own code
(:func:`pva_sae.execution.sandbox.code_version`). :meth:`LabelCache.key` hashes exactly those, so
a steered program identical to its baseline, or the same program sampled at two temperatures, is
run once per run directory.

Where: ``<run>/cache/labels.sqlite`` (:attr:`pva_sae.rundir.paths.RunDir.label_cache`), shared by
the build, the validation stage's temperature sub-runs and the steering stage of that run; deleting
it only costs the time to label again. ``sandbox.label_cache = false`` turns it off.

What is never stored (see :func:`pva_sae.execution.sandbox.cacheable`): timeouts (load on the machine
can cause them; the next run tries again), failures of the sandbox itself and SIGKILLs. A program
whose result depends on chance (``random`` without a seed, the clock) gets the label of its first
run wherever it appears again, which makes identical programs agree.

SQLite in WAL mode: several processes may use one cache at once; a write is one transaction per
batch and is not fsynced (a crash can lose the last batches' entries, never corrupt a label).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sqlite3
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Self

from pva_sae.config import Config, SandboxConfig
from pva_sae.errors import InputError
from pva_sae.execution.sandbox import ExecJob, ExecResult, code_version, interpreter, probe
from pva_sae.hashing import sha256_json
from pva_sae.rundir.paths import RunDir

# The sandbox settings a label depends on (workers, the uid pool's place, the start method and the
# cache switch do not change a label).
LABEL_FIELDS = ("timeout_s", "cpu_time_s", "memory_limit_mb", "file_size_limit_mb", "max_open_files",
                "max_processes", "output_limit_kb", "sandbox_user")
# The protections probe() reports that a program can observe.
PROTECTIONS = ("drops_privileges", "private_tmp", "no_network", "private_ipc", "pid_namespace", "per_job_uid")
SCHEMA = 1
BUSY_TIMEOUT_S = 60.0
RESULT_FIELDS = ("status", "error_type", "detail", "duration_s", "stderr_tail", "stdout_tail", "attempts")


class LabelCache:
    """Labels by content hash in one SQLite file; safe to share between threads and processes.

    ``environment`` is what every key of this cache shares (settings, protections, interpreter,
    code version); :func:`label_environment` makes it.
    """

    def __init__(self, path: str | Path, environment: dict):
        self.path = Path(path)
        self._prefix = sha256_json(environment)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS labels (key TEXT PRIMARY KEY, result TEXT NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
            (schema,) = self._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"the label cache {self.path} cannot be used ({exc}); delete it (labels are "
                             "recomputed) or set sandbox.label_cache=false") from None
        if schema != str(SCHEMA):
            self._db.close()
            raise InputError(f"the label cache {self.path} has schema {schema}, this version writes {SCHEMA}; "
                             "delete it (labels are recomputed)")

    @classmethod
    def for_run(cls, cfg: Config) -> LabelCache | None:
        """The run directory's cache for ``cfg`` (None when ``sandbox.label_cache`` is off)."""
        if not cfg.sandbox.label_cache:
            return None
        return cls(RunDir.at(cfg.output.run_dir).label_cache, label_environment(cfg.sandbox))

    def key(self, job: ExecJob) -> str:
        return sha256_json([self._prefix, str(job.program), str(job.setup_code or ""), [str(t) for t in job.tests]])

    def get_many(self, keys: Iterable[str]) -> dict[str, ExecResult]:
        keys = list(keys)
        found: dict[str, ExecResult] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
                chunk = keys[start:start + 500]
                rows = self._db.execute(f"SELECT key, result FROM labels WHERE key IN ({','.join('?' * len(chunk))})",
                                        chunk).fetchall()
                found.update((key, _result(text)) for key, text in rows)
        return found

    def put_many(self, items: Sequence[tuple[str, ExecResult]]) -> None:
        if not items:
            return
        rows = [(key, json.dumps({f: getattr(r, f) for f in RESULT_FIELDS})) for key, r in items]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO labels VALUES (?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def label_environment(cfg: SandboxConfig) -> dict:
    """What a label depends on besides the job: settings, protections, interpreter, sandbox code."""
    settings = {name: getattr(cfg, name) for name in LABEL_FIELDS}
    return {"settings": settings, "protections": _protections(json.dumps(dataclasses.asdict(cfg), sort_keys=True)),
            "interpreter": interpreter(), "python": sys.version, "code": code_version()}


@functools.lru_cache(maxsize=8)
def _protections(cfg_json: str) -> dict[str, bool]:
    """probe()'s observable protections, once per process and config (a probe starts a job)."""
    found = probe(SandboxConfig(**json.loads(cfg_json)))
    return {name: found[name] for name in PROTECTIONS}


def _result(text: str) -> ExecResult:
    return ExecResult(**json.loads(text))
