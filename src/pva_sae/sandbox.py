"""Run generated programs against their tests: the ONE module of pva-sae that executes generated code.

Each program runs in a fresh interpreter (``python -I``) in its own session and process group, in a
temporary working directory, with stdin from /dev/null and a minimal environment. A small bootstrap
(``_BOOTSTRAP`` below), executed by the child before any untrusted code, sets the resource limits
(address space, CPU time, file size, open files, processes, no core dumps) and, when pva-sae runs as
root, drops to an unprivileged user: RLIMIT_NPROC does not bind root, and an unprivileged program
cannot signal or delete what belongs to root. The parent enforces a wall-clock timeout, then kills
the whole process group and any process that still carries the job's marker, and reaps them.

Success is reported through a pipe the program cannot fake by exiting early: the harness writes
``passed`` with a per-job nonce only after the last assert ran. ``sys.exit(0)``, ``os._exit(0)``
or a kill before that leave no such line and count as errors ('exit' / 'signal').

This is containment for buggy and mildly hostile code, not a security boundary: the program runs
in the same kernel and file system, can read world-readable files, can write in world-writable
directories (/tmp, /dev/shm: entries it leaves there are removed after the run), and, since the
nonce lives in the harness's memory, a program that inspects interpreter frames could forge a pass.
Run untrusted models' code in a container or VM if that matters.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from .config import SandboxConfig

log = logging.getLogger(__name__)

MARKER_ENV = "PVA_SAE_SANDBOX_JOB"
STDERR_TAIL_BYTES = 2048
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")
FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")

# Exception class -> error_type. Anything else raised is 'runtime'.
ERROR_TYPES = {
    "SyntaxError": "syntax", "IndentationError": "syntax", "TabError": "syntax",
    "NameError": "name", "UnboundLocalError": "name", "TypeError": "type", "ValueError": "value",
    "IndexError": "index", "KeyError": "key", "AttributeError": "attribute", "ImportError": "import",
    "ModuleNotFoundError": "import", "RecursionError": "recursion", "MemoryError": "memory",
    "ZeroDivisionError": "zero_division", "EOFError": "eof", "SystemExit": "exit", "AssertionError": "assertion",
    "TimeoutError": "timeout", "OSError": "os", "PermissionError": "os", "FileNotFoundError": "os",
}


class SandboxError(RuntimeError):
    """The sandbox itself cannot run (not a property of the program under test)."""


@dataclass(frozen=True)
class ExecJob:
    key: object
    program: str
    tests: tuple[str, ...]
    setup_code: str = ""


@dataclass(frozen=True)
class ExecResult:
    status: str  # 'passed' | 'failed' (a test assert failed) | 'error' | 'timeout'
    error_type: str | None
    detail: str
    duration_s: float
    stderr_tail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The child runs this before any untrusted code. argv[1] is a JSON object of settings.
_BOOTSTRAP = r'''
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
nonce = os.read(cfg["nonce_fd"], 64).decode(); os.close(cfg["nonce_fd"])
out = os.fdopen(cfg["result_fd"], "w", buffering=1)
def report(**kw):
    kw["nonce"] = nonce
    out.write(json.dumps(kw) + "\n"); out.flush()
def limit(name, value):
    if value is not None:
        resource.setrlimit(getattr(resource, name), (value, value))
try:
    limit("RLIMIT_CORE", 0)
    limit("RLIMIT_AS", cfg["as_bytes"]); limit("RLIMIT_CPU", cfg["cpu_s"])
    limit("RLIMIT_FSIZE", cfg["fsize_bytes"]); limit("RLIMIT_NOFILE", cfg["nofile"])
    limit("RLIMIT_NPROC", cfg["nproc"])
    if cfg["uid"] is not None and os.getuid() == 0:
        os.setgroups([]); os.setgid(cfg["gid"]); os.setuid(cfg["uid"])
    if os.getuid() == 0 and cfg["uid"] is not None:
        raise OSError("still root after setuid")
except Exception as exc:
    report(status="error", error_type="sandbox", detail="sandbox setup failed: %r" % (exc,)); os._exit(3)
def read(name):
    with open(name, encoding="utf-8") as fh:
        return fh.read()
setup, program, tests = read("setup.py"), read("program.py"), json.loads(read("tests.json"))
scope = {"__name__": "__sandbox__", "__builtins__": __builtins__}
phase = "program"
try:
    exec(compile(program, "program.py", "exec"), scope)
    phase = "setup"
    exec(compile(setup, "setup.py", "exec"), scope)
    for i, test in enumerate(tests):
        phase = "test %d" % i
        exec(compile(test, "test_%d.py" % i, "exec"), scope)
except BaseException as exc:
    report(status="raised", exc=type(exc).__name__, detail=str(exc)[:300], phase=phase)
    sys.stderr.write("%s in %s: %s\n" % (type(exc).__name__, phase, str(exc)[:300]))
    os._exit(0)
report(status="passed", n_tests=len(tests))
os._exit(0)
'''


# --------------------------------------------------------------------------- environment


@lru_cache(maxsize=None)
def _sandbox_ids(user: str) -> tuple[int | None, int | None]:
    """(uid, gid) to drop to: only when running as root and a user is configured."""
    if os.geteuid() != 0 or not user:
        return None, None
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SandboxError(f"sandbox user {user!r} does not exist; create it or set sandbox.sandbox_user "
                           "to an existing unprivileged user") from None
    return entry.pw_uid, entry.pw_gid


@lru_cache(maxsize=None)
def sandbox_python(user: str) -> str:
    """An interpreter the sandbox user can run: this one, else a system python3 (probed once)."""
    uid, _ = _sandbox_ids(user)
    candidates = [sys.executable] + ([p for p in FALLBACK_PYTHONS if os.path.exists(p)] if uid is not None else [])
    probe = ExecJob("probe", "import re, math, heapq, collections, itertools, json\nx = 1", ("assert x == 1",))
    cfg = SandboxConfig(sandbox_user=user)
    for python in candidates:
        result = _run_one(probe, cfg, python)
        if result.passed:
            if python != sys.executable:
                log.info("sandbox runs programs with %s (the sandbox user cannot read %s)", python, sys.executable)
            return python
    raise SandboxError(f"no Python interpreter the sandbox user {user!r} can run (tried {', '.join(candidates)}); "
                       "install a system python3, make the interpreter's directory readable, or run pva-sae as a "
                       "non-root user")


def _write_job_files(workdir: Path, job: ExecJob) -> None:
    (workdir / "setup.py").write_text(job.setup_code or "", encoding="utf-8")
    (workdir / "program.py").write_text(job.program, encoding="utf-8")
    (workdir / "tests.json").write_text(json.dumps(list(job.tests)), encoding="utf-8")


def _settings(cfg: SandboxConfig, uid, gid, result_fd: int, nonce_fd: int) -> str:
    return json.dumps({
        "as_bytes": cfg.memory_limit_mb * 2**20, "cpu_s": cfg.cpu_time_s,
        "fsize_bytes": cfg.file_size_limit_mb * 2**20, "nofile": cfg.max_open_files,
        "nproc": cfg.max_processes, "uid": uid, "gid": gid, "result_fd": result_fd, "nonce_fd": nonce_fd,
    })


# --------------------------------------------------------------------------- one job


class _TailReader(threading.Thread):
    """Drain a pipe, keeping at most ``cap`` bytes (the tail); a flood of output cannot fill memory."""

    def __init__(self, stream, cap: int):
        super().__init__(daemon=True)
        self.stream, self.cap, self.buf, self.total = stream, cap, bytearray(), 0

    def run(self) -> None:
        while chunk := self.stream.read(65536):
            self.total += len(chunk)
            self.buf += chunk
            if len(self.buf) > self.cap:
                del self.buf[: len(self.buf) - self.cap]

    def text(self) -> str:
        return bytes(self.buf).decode("utf-8", "replace")


def run_job(job: ExecJob, cfg: SandboxConfig) -> ExecResult:
    """Run one program with its tests under the limits of ``cfg``."""
    return run_jobs([job], cfg)[0]


def _run_one(job: ExecJob, cfg: SandboxConfig, python: str) -> ExecResult:
    uid, gid = _sandbox_ids(cfg.sandbox_user)
    workdir = Path(tempfile.mkdtemp(prefix="pva_sae_job_"))
    marker = secrets.token_hex(8)
    nonce = secrets.token_hex(16)
    result_r, result_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    started = time.perf_counter()
    proc = None
    try:
        _write_job_files(workdir, job)
        if uid is not None:
            for path in [workdir, *workdir.iterdir()]:
                os.chown(path, uid, gid)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
               MARKER_ENV: marker}
        proc = subprocess.Popen(
            [python, "-I", "-c", _BOOTSTRAP, _settings(cfg, uid, gid, result_w, nonce_r)],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(result_w, nonce_r), start_new_session=True, close_fds=True)
        os.close(result_w)
        os.close(nonce_r)
        result_w = nonce_r = -1
        os.write(nonce_w, nonce.encode())
        os.close(nonce_w)
        nonce_w = -1
        cap = cfg.output_limit_kb * 1024
        readers = [_TailReader(proc.stdout, cap), _TailReader(proc.stderr, min(cap, STDERR_TAIL_BYTES))]
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            proc.wait(timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_job(proc.pid, marker)
        proc.wait()
        _wait_reaped(uid)
        for reader in readers:
            reader.join(timeout=2)
        duration = time.perf_counter() - started
        report = _read_report(result_r, nonce)
        return _classify(report, proc.returncode, timed_out, duration, readers[1].text())
    finally:
        for fd in (result_r, result_w, nonce_r, nonce_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if proc is not None and proc.poll() is None:
            _kill_job(proc.pid, marker)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _read_report(fd: int, nonce: str) -> dict | None:
    """The harness's last line carrying our nonce (the pipe may stay open in leaked children: no blocking)."""
    os.set_blocking(fd, False)
    data = bytearray()
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
            if len(data) > 1 << 20:
                break
    except BlockingIOError:
        pass
    last = None
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(msg, dict) and msg.get("nonce") == nonce:
            last = msg
    return last


def _classify(report: dict | None, returncode: int, timed_out: bool, duration: float, stderr: str) -> ExecResult:
    tail = stderr[-STDERR_TAIL_BYTES:]
    if timed_out:
        return ExecResult("timeout", "timeout", "wall-clock limit exceeded", duration, tail)
    if report is None:
        if returncode < 0:
            sig = signal.Signals(-returncode)
            if sig == signal.SIGXCPU:
                return ExecResult("timeout", "timeout", "CPU-time limit exceeded (SIGXCPU)", duration, tail)
            if sig == signal.SIGXFSZ:
                return ExecResult("error", "file_size", "file-size limit exceeded (SIGXFSZ)", duration, tail)
            return ExecResult("error", "signal", f"killed by {sig.name}", duration, tail)
        return ExecResult("error", "exit", f"exited with status {returncode} before its tests finished",
                          duration, tail)
    if report["status"] == "passed":
        return ExecResult("passed", None, "", duration, tail)
    if report["status"] == "error":
        return ExecResult("error", report.get("error_type", "sandbox"), report.get("detail", ""), duration, tail)
    exc, phase = report.get("exc", ""), report.get("phase", "")
    detail = f"{exc} in {phase}: {report.get('detail', '')}".strip()
    if exc == "AssertionError" and phase.startswith("test"):
        return ExecResult("failed", None, detail, duration, tail)
    return ExecResult("error", ERROR_TYPES.get(exc, "runtime"), detail, duration, tail)


# --------------------------------------------------------------------------- cleanup


def _kill_job(pid: int, marker: str) -> None:
    """SIGKILL the job's process group, then any process still carrying its marker (left its group)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(3):
        stray = _marked_processes(marker)
        if not stray:
            return
        for other in stray:
            try:
                os.kill(other, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def _wait_reaped(uid: int | None, timeout_s: float = 2.0) -> None:
    """Wait until killed orphans of the sandbox user are reaped: zombies still count against
    RLIMIT_NPROC and would make the next program's fork() fail."""
    if uid is None:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _orphan_zombies(uid):
        time.sleep(0.02)


def _orphan_zombies(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            continue
        if fields.get("State", "").strip().startswith("Z") and int(fields.get("Uid", "-1").split()[0]) == uid:
            count += 1
    return count


def _marked_processes(marker: str) -> list[int]:
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _sweep_world_writable(uid: int | None, since: float) -> list[str]:
    """Remove entries the sandbox user created in world-writable directories during the run."""
    if uid is None:
        return []
    removed = []
    for folder in WORLD_WRITABLE:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_uid != uid or st.st_ctime < since - 1:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed.append(entry.path)
            except OSError:
                continue
    if removed:
        log.warning("removed %d file(s) left by sandboxed programs: %s", len(removed), ", ".join(removed[:5]))
    return removed


# --------------------------------------------------------------------------- many jobs


def run_jobs(jobs: Sequence[ExecJob], cfg: SandboxConfig,
             progress: Callable[[ExecResult], None] | None = None) -> list[ExecResult]:
    """Run ``jobs`` in parallel (``cfg.workers``, 0 = one per core); results in job order."""
    if not jobs:
        return []
    python = sandbox_python(cfg.sandbox_user)
    uid, _ = _sandbox_ids(cfg.sandbox_user)
    since = time.time()
    workers = cfg.workers or os.cpu_count() or 1

    def one(job: ExecJob) -> ExecResult:
        result = _run_one(job, cfg, python)
        if result.error_type == "sandbox":  # e.g. the sandbox user's process quota was full for a moment
            time.sleep(0.5)
            result = _run_one(job, cfg, python)
        if progress is not None:
            progress(result)
        return result

    try:
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            return list(pool.map(one, jobs))
    finally:
        _sweep_world_writable(uid, since)
