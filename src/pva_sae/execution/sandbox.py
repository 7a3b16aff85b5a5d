"""Run generated programs against their test asserts, each in a fresh, limited interpreter.

This is the only module of pva-sae that executes generated code. It labels a program ``passed`` only
when every test assert ran and held. It contains the accidents and the simple attacks that generated
code produces (endless loops, memory and fork bombs, ``sys.exit`` before the tests, writes outside
its directory, floods of output, crashes of the interpreter). It is **not a sandbox in the strong
sense**: the program shares the kernel with the caller and no system-call filter is installed.
Run untrusted code from strangers in a VM or container as well.

Processes
---------
For every job the caller starts ``sys.executable -s -P -c <child script>`` (``-P`` on Python 3.11+)
in a new session (``start_new_session``, so the child is the leader of its own process group), in a
fresh temporary directory, stdin from ``/dev/null``, stdout and stderr to two anonymous temporary
files, and a minimal environment. That process is the **supervisor**; it runs trusted code only:

1. it reads the job (marshal) from an inherited file descriptor and closes it;
2. it becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``): any process the program starts, even one
   that calls ``setsid()`` to leave the process group, stays its descendant;
3. as root, it enters new mount and network namespaces (where the kernel allows it): a size-limited
   tmpfs is mounted on the working directory and bound over ``/tmp``, ``/var/tmp``, ``/dev/shm`` and
   ``/run/lock``, ``/`` is remounted read-only, and the program has no network;
4. it forks the **worker**, which sets the resource limits (``RLIMIT_AS``, ``RLIMIT_CPU``,
   ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``, ``RLIMIT_CORE=0``) on itself, drops to
   ``cfg.sandbox_user`` when running as root (``setgroups([])``, ``setgid``, ``setuid``, then
   ``PR_SET_NO_NEW_PRIVS``), and only then compiles and runs the program;
5. it waits for the worker at most ``cfg.timeout_s``, SIGKILLs the worker on timeout, then kills and
   reaps every remaining descendant (found through ``/proc``) and writes its report to the caller
   through a second inherited pipe.

The caller waits for the supervisor (with a margin, in case the supervisor itself is stuck), sends
SIGKILL to the whole process group, reaps, reads the report, and deletes the temporary directory.

The limits are set inside the child rather than in a ``preexec_fn`` because ``preexec_fn`` is unsafe
in a threaded caller (``run_jobs`` uses threads) and because the supervisor itself must stay
unlimited. The uid drop matters beyond file permissions: ``RLIMIT_NPROC`` is not enforced for root,
and a root program could kill the caller. The program's parent is the root-owned supervisor, never
the caller, so ``os.kill(os.getppid(), SIGKILL)`` fails with ``PermissionError``.

The standard library of an interpreter installed under a private home (``/root/.pyenv``) is not
readable by the sandbox user. Before dropping privileges the worker opens every directory of
``sys.path``; entries it can no longer read afterwards are replaced by ``/proc/self/fd/N``, which
reaches the already-open directory without a permission check on its parents.

The test harness
----------------
The worker runs, in one ``__main__`` namespace: the program, then ``test_setup_code`` (MBPP's setup
code builds objects from classes the program defines, so it must follow the program), then each test
assert in order, stopping at the first that does not hold. Everything is compiled before anything
runs, so a syntax error anywhere is reported as ``syntax``.

How a pass is reported
----------------------
The supervisor draws a random nonce before forking. After the last assert the harness writes one
line, ``<nonce> <pid> <status> <error_type> <hex detail>``, to a pipe read by the supervisor, which
accepts only a line carrying its nonce and the worker's pid. A program that exits early
(``sys.exit(0)`` is caught as ``exit``; ``os._exit(0)`` leaves no line), prints "passed", writes
to every open descriptor, or forks a child that finishes the tests in its place cannot produce an
accepted line. stdin is ``/dev/null`` and the nonce never passes through a file or an argument. The
nonce does live in the worker's memory: a program that deliberately searches the harness's frames
(``gc``, ``sys._getframe``) can find it. That is the residual risk of running the tests in the same
interpreter as the program, accepted here.

Outcomes
--------
``status`` is one of ``passed``, ``failed`` (a test assert evaluated false), ``error`` or ``timeout``
(wall-clock ``timeout_s`` exceeded, or ``RLIMIT_CPU`` reached). For ``error``, ``error_type`` is one of
:data:`ERROR_TYPES`: the Python exception mapped through its class hierarchy (``syntax``, ``name``,
``type``, ``value``, ``index``, ``key``, ``attribute``, ``import``, ``recursion``, ``memory``,
``zero_division``, ``eof`` for ``input()`` on the closed stdin, ``runtime`` for any other
exception), ``output_limit`` (a write failed with ``EFBIG`` because output or a file reached
``file_size_limit_mb``), ``exit`` (``sys.exit``/``os._exit`` or a lost result before the tests
finished), ``signal`` (killed by a signal other than the timeout's, e.g. ``SIGSEGV``; the signal
name is the detail) or ``sandbox`` (the supervisor ended without a report).

An ``AssertionError`` counts as ``failed`` only when it is raised by the test assert itself. One
raised by the program's own code (a top-level self-check, or an ``assert`` inside the function under
test) is ``error``/``runtime``: the program crashed, it did not return a wrong answer.

Output
------
stdout and stderr go to anonymous files (never to memory); ``RLIMIT_FSIZE`` bounds each at
``file_size_limit_mb``, and a program writing past it gets ``OSError(EFBIG)`` (Python ignores
``SIGXFSZ``), reported as ``output_limit`` unless the program handles it. The caller keeps the last
``output_limit_kb`` of stdout (``stdout_tail``) and the last 2 KB of stderr (``stderr_tail``, which
ends with the harness's traceback of the failure); the rest is discarded.

Determinism
-----------
``-I`` would ignore ``PYTHONHASHSEED``; the interpreter instead gets ``-s`` and ``-P`` (no user site,
no script directory on ``sys.path``) and an environment built here from scratch with
``PYTHONHASHSEED=0``, which isolates it just as well and makes set and dict order of strings, and
therefore labels, the same on every run.

Residual risks
--------------
* The program runs in the harness's interpreter, so a program written to subvert the harness (see
  above), or an exploit of the kernel, can report a false pass or escape.
* Jobs that run in parallel share the sandbox user: a program can signal its neighbours
  (``os.kill(-1, SIGKILL)``), whose outcome then reads ``signal``; ``RLIMIT_NPROC`` counts all of
  that user's processes, so a fork bomb can keep a neighbour from forking. Nothing kills every
  process of the sandbox user, since parallel jobs share it; each supervisor kills its own tree.
* ``RLIMIT_AS`` is per process: a program with ``max_processes`` processes may use that many times
  ``memory_limit_mb``. There is no cgroup.
* Without root there is no uid drop: the program runs as the caller's user and may read or write
  that user's files and signal that user's processes (the supervisor included; processes that left
  the group may then outlive the job). Without mount/network namespaces (unprivileged containers)
  the program sees the real ``/tmp`` and the network, and in the working directory may write many
  files of up to ``file_size_limit_mb`` each. :func:`probe` says which protections are active.

Linux only (``/proc``, ``prctl``, namespaces, ``os.fork``).
"""

from __future__ import annotations

import ast
import marshal
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from pva_sae.config import ConfigError, SandboxConfig

STATUSES = ("passed", "failed", "error", "timeout")

ERROR_TYPES = (
    "syntax", "name", "type", "value", "index", "key", "attribute", "import", "recursion", "memory",
    "zero_division", "eof", "runtime", "output_limit", "exit", "signal", "sandbox",
)

# Marker in every sandbox process's command line, so that `ps` shows what a process is.
PROCESS_TAG = "pva-sandbox"

STDERR_TAIL_BYTES = 2048
# The supervisor enforces timeout_s; the caller waits this much longer before killing the supervisor.
SUPERVISOR_GRACE_S = 10.0
# The private tmpfs holds this many times file_size_limit_mb.
TMPFS_FILES = 4
HASH_SEED = "0"
REPORT_LIMIT_BYTES = 1 << 20
# Exit status of a worker whose result could not be written (the child script's EXIT_RESULT_LOST).
_EXIT_RESULT_LOST = 71


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a property of the program under test)."""


@dataclass(frozen=True)
class ExecJob:
    """One program and the test asserts it must pass. ``key`` identifies the job for the caller; the sandbox ignores it."""

    key: object
    program: str
    tests: tuple[str, ...]
    setup_code: str = ""


@dataclass(frozen=True)
class ExecResult:
    """What happened to one job; see the module docstring for the vocabulary of status and error_type."""

    status: str  # 'passed' | 'failed' | 'error' | 'timeout'
    error_type: str | None  # one of ERROR_TYPES when status is 'error', else None
    detail: str  # what failed, short: "test 2 failed: assert ...", "program: NameError: ...", "SIGSEGV"
    duration_s: float  # the program's own run time (worker process), without interpreter start-up
    stderr_tail: str  # last 2 KB of stderr, ending with the harness's traceback of the failure
    stdout_tail: str = ""  # last output_limit_kb of stdout

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------- public entry points

def run_job(job: ExecJob, cfg: SandboxConfig) -> ExecResult:
    """Run one job in its own sandbox and classify the outcome."""
    _check_config(cfg)
    return _execute(job, cfg, _sandbox_identity(cfg))[0]


def run_jobs(jobs: Sequence[ExecJob], cfg: SandboxConfig,
             progress: Callable[[ExecResult], None] | None = None) -> list[ExecResult]:
    """Run jobs in parallel (``cfg.workers`` at once; 0 = one per CPU core); results come back in job order.

    ``progress`` is called in the calling thread with each result as it completes (completion order).
    """
    _check_config(cfg)
    if not jobs:
        return []
    identity = _sandbox_identity(cfg)
    workers = min(cfg.workers or os.cpu_count() or 1, len(jobs))
    results: list[ExecResult | None] = [None] * len(jobs)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        futures = {pool.submit(_execute, job, cfg, identity): index for index, job in enumerate(jobs)}
        try:
            for future in as_completed(futures):
                result = future.result()[0]
                results[futures[future]] = result
                if progress is not None:
                    progress(result)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results  # type: ignore[return-value]


def probe(cfg: SandboxConfig) -> dict[str, bool]:
    """Which protections are active on this machine: run a trivial job and read the supervisor's report.

    Keys: ``drops_privileges`` (runs as ``cfg.sandbox_user``), ``private_tmp`` (mount namespace with a
    private tmpfs and a read-only root), ``no_network`` (network namespace).
    """
    _check_config(cfg)
    result, report = _execute(ExecJob("probe", "", ()), cfg, _sandbox_identity(cfg))
    if not result.passed:
        raise SandboxError(f"the sandbox probe did not pass: {result.status} {result.error_type} {result.detail}")
    return {name: bool(report.get(name)) for name in ("drops_privileges", "private_tmp", "no_network")}


# --------------------------------------------------------------------------- configuration

def _check_config(cfg: SandboxConfig) -> None:
    positive = ("timeout_s", "cpu_time_s", "memory_limit_mb", "file_size_limit_mb", "max_open_files",
                "max_processes", "output_limit_kb")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"sandbox.{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.max_open_files < 16:
        raise ConfigError(f"sandbox.max_open_files must be >= 16 (the interpreter needs some), got {cfg.max_open_files}")
    if cfg.workers < 0:
        raise ConfigError(f"sandbox.workers must be >= 0 (0 = one per CPU core), got {cfg.workers}")


def _sandbox_identity(cfg: SandboxConfig) -> tuple[int, int] | None:
    """(uid, gid) to run programs as when we are root; None when we are not (no switch is possible)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(cfg.sandbox_user)
    except KeyError:
        raise ConfigError(
            f"sandbox.sandbox_user {cfg.sandbox_user!r} does not exist on this machine. pva-sae runs as root, "
            "so programs must run as an unprivileged user: create one (e.g. `useradd --system --no-create-home "
            "pva-sandbox`) or set sandbox.sandbox_user to an existing one such as 'nobody'."
        ) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ConfigError(f"sandbox.sandbox_user {cfg.sandbox_user!r} has uid or gid 0; it must be unprivileged")
    return entry.pw_uid, entry.pw_gid


def _payload(job: ExecJob, cfg: SandboxConfig, identity: tuple[int, int] | None) -> bytes:
    mb = 1024 * 1024
    limits = {
        "AS": (cfg.memory_limit_mb * mb,) * 2,
        "CPU": (cfg.cpu_time_s, cfg.cpu_time_s + 1),
        "FSIZE": (cfg.file_size_limit_mb * mb,) * 2,
        "NOFILE": (cfg.max_open_files,) * 2,
        "NPROC": (cfg.max_processes,) * 2,
        "CORE": (0, 0),
    }
    return marshal.dumps({
        "program": str(job.program),
        "setup": str(job.setup_code or ""),
        "tests": [str(t) for t in job.tests],
        "timeout_s": float(cfg.timeout_s),
        "limits": limits,
        "uid": identity[0] if identity else None,
        "gid": identity[1] if identity else None,
        "tmpfs_mb": max(16, TMPFS_FILES * cfg.file_size_limit_mb),
    })


def _child_env(workdir: str) -> dict[str, str]:
    """The whole environment of the child: nothing is inherited from the caller."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONHASHSEED": HASH_SEED,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        # Threads count against RLIMIT_NPROC: numerical libraries must not start one per core.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _child_command(payload_fd: int, report_fd: int) -> list[str]:
    flags = ["-s", "-P"] if sys.version_info >= (3, 11) else ["-s"]
    return [sys.executable, *flags, "-c", _CHILD_SCRIPT, str(payload_fd), str(report_fd), PROCESS_TAG]


# --------------------------------------------------------------------------- one job

def _execute(job: ExecJob, cfg: SandboxConfig, identity: tuple[int, int] | None) -> tuple[ExecResult, dict]:
    """Run one job; return its result and the supervisor's report (empty when there was none)."""
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="pva-sandbox-")
    try:
        if identity is not None:
            os.chown(workdir, *identity)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as payload:
            payload.write(_payload(job, cfg, identity))
            payload.flush()
            payload.seek(0)
            report, supervisor_stuck, exit_code = _run_supervisor(payload.fileno(), out, err, workdir, cfg)
            stderr_tail = _tail(err, min(STDERR_TAIL_BYTES, cfg.output_limit_kb * 1024))
            stdout_tail = _tail(out, cfg.output_limit_kb * 1024)
    finally:
        _remove_tree(workdir)
    if report.get("setup_error"):
        raise SandboxError(f"the sandbox could not be set up: {report['setup_error']}\n{stderr_tail}")
    status, error_type, detail = _classify(report, supervisor_stuck, exit_code, cfg)
    duration = report.get("duration_s", time.monotonic() - started)
    result = ExecResult(status, error_type, detail, round(float(duration), 4), stderr_tail, stdout_tail)
    return result, report


def _run_supervisor(payload_fd: int, out, err, workdir: str, cfg: SandboxConfig) -> tuple[dict, bool, int]:
    """Start the supervisor, wait for it, kill its process group, reap it; (report, stuck, exit code)."""
    report_r, report_w = os.pipe()
    try:
        try:
            proc = subprocess.Popen(
                _child_command(payload_fd, report_w), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=workdir, env=_child_env(workdir), start_new_session=True, close_fds=True,
                pass_fds=(payload_fd, report_w),
            )
        finally:
            os.close(report_w)
        stuck = not _wait_exited(proc.pid, cfg.timeout_s + SUPERVISOR_GRACE_S)
        # The supervisor is still unreaped here, so its pid (= the group id) cannot have been reused.
        _kill_group(proc.pid)
        exit_code = proc.wait()
        return _read_report(report_r), stuck, exit_code
    finally:
        os.close(report_r)


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait until child ``pid`` has exited, without reaping it; False on timeout."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        poller = select.poll()  # not select(): the caller may hold more than 1024 descriptors
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        while True:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if pidfd is not None:
                poller.poll(remaining * 1000)
            else:
                time.sleep(min(remaining, 0.005))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_report(fd: int) -> dict:
    """The supervisor's report (a Python literal), or {} when it wrote none or garbage."""
    os.set_blocking(fd, False)
    data = bytearray()
    while len(data) < REPORT_LIMIT_BYTES:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    try:
        report = ast.literal_eval(data.decode("utf-8"))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        return {}
    return report if isinstance(report, dict) else {}


def _tail(f, limit: int) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    return f.read(limit).decode("utf-8", errors="replace")


def _remove_tree(path: str) -> None:
    """Delete the working directory, also when the program took permissions away inside it (non-root runs)."""
    try:
        shutil.rmtree(path)
    except OSError:
        for folder, subfolders, _files in os.walk(path):
            for name in subfolders:
                try:
                    os.chmod(os.path.join(folder, name), 0o700, follow_symlinks=False)
                except OSError:
                    pass
        shutil.rmtree(path, ignore_errors=True)


def _classify(report: dict, supervisor_stuck: bool, exit_code: int, cfg: SandboxConfig) -> tuple[str, str | None, str]:
    """(status, error_type, detail) from the supervisor's report."""
    if not report:
        if supervisor_stuck:
            return "timeout", None, f"the sandbox supervisor did not finish within {cfg.timeout_s + SUPERVISOR_GRACE_S:g} s"
        return "error", "sandbox", f"the sandbox supervisor ended without a report ({_describe_exit(exit_code)})"
    if report.get("result"):
        status, error_type, detail = report["result"]
        return status, error_type or None, detail
    if report.get("timed_out"):
        return "timeout", None, f"wall-clock limit of {cfg.timeout_s:g} s exceeded"
    worker_exit = report.get("exit_code", 0)
    if worker_exit == -signal.SIGXCPU:
        return "timeout", None, f"CPU time limit of {cfg.cpu_time_s} s exceeded (SIGXCPU)"
    if worker_exit < 0:
        return "error", "signal", _signal_name(-worker_exit)
    if worker_exit == _EXIT_RESULT_LOST:
        return "error", "exit", "the program closed the harness's result pipe; its tests could not report"
    return "error", "exit", f"the program {_describe_exit(worker_exit)} before its tests finished"


def _describe_exit(code: int) -> str:
    return f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --------------------------------------------------------------------------- the child process
#
# Run by the child interpreter with `-c`; it imports only small standard modules so that it starts
# quickly. The supervisor part runs with the caller's privileges and never runs program code; the
# worker part sets the limits, drops privileges, then runs the program and its tests.

_CHILD_SCRIPT = r'''
import builtins
import marshal
import os
import resource
import select
import sys
import time

SIGKILL = 9
EFBIG = 27
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
RESULT_BUFFER = 65536
DETAIL_CHARS = 300
TRACEBACK_FRAMES = 20
EXIT_WORKER_SETUP, EXIT_RESULT_LOST, EXIT_HARNESS_BUG = 70, 71, 72
ERROR_TYPES = {
    SyntaxError: "syntax", NameError: "name", TypeError: "type", ValueError: "value",
    IndexError: "index", KeyError: "key", AttributeError: "attribute", ImportError: "import",
    RecursionError: "recursion", MemoryError: "memory", ZeroDivisionError: "zero_division",
    EOFError: "eof", SystemExit: "exit",
}
STATUSES = ("passed", "failed", "error", "setup_error")


def main():
    if sys.path and sys.path[0] == "":
        del sys.path[0]
    payload_fd, report_fd = int(sys.argv[1]), int(sys.argv[2])
    with os.fdopen(payload_fd, "rb") as f:
        job = marshal.loads(f.read())
    report = supervise(job, report_fd)
    write_all(report_fd, repr(report).encode())


def write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


# ---------------------------------------------------------------- supervisor

def supervise(job, report_fd):
    """Fork the worker, watch it, clean up after it; return the report for the caller."""
    report = {"drops_privileges": job["uid"] is not None, "private_tmp": False, "no_network": False}
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        prctl(libc, PR_SET_CHILD_SUBREAPER, 1)
        if job["uid"] is not None:
            report["no_network"] = libc.unshare(CLONE_NEWNET) == 0
            report["private_tmp"] = make_private_tmp(libc, job)
        nonce = os.urandom(16).hex().encode()
        result_r, result_w = os.pipe()
    except Exception as exc:
        report["setup_error"] = describe(exc)
        return report
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(result_r)
            os.close(report_fd)
            worker(job, libc, nonce, result_w)
        finally:
            os._exit(EXIT_HARNESS_BUG)
    os.close(result_w)
    timed_out, status, data = watch(pid, result_r, started + job["timeout_s"])
    report["duration_s"] = time.monotonic() - started
    kill_descendants()
    report["timed_out"] = timed_out
    report["exit_code"] = os.waitstatus_to_exitcode(status)
    result = accepted_result(data, nonce, pid)
    if result and result[0] == "setup_error":
        report["setup_error"] = result[2]
    elif result and not timed_out:
        report["result"] = result
    return report


def prctl(libc, option, value):
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes_errno(), f"prctl({option}) failed")


def ctypes_errno():
    import ctypes
    return ctypes.get_errno()


def mount(libc, source, target, fstype, flags, data=None):
    encode = lambda s: None if s is None else s.encode()
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        errno = ctypes_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")


def make_private_tmp(libc, job):
    """Give the program a private, size-limited tmpfs as its directory and as every shared scratch directory.

    Returns False (and changes nothing visible) when the kernel refuses a mount namespace.
    """
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    try:
        # Private propagation first: nothing mounted below may reach the caller's namespace.
        mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
        workdir = os.getcwd()
        options = f"size={job['tmpfs_mb']}m,mode=0700,uid={job['uid']},gid={job['gid']}"
        mount(libc, "tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, options)
    except OSError:
        return False
    os.chdir(workdir)
    for path in SHARED_DIRS:
        if os.path.isdir(path):
            mount(libc, ".", path, None, MS_BIND)
    try:
        mount(libc, None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    except OSError:
        pass
    os.chdir("/tmp")
    os.environ["HOME"] = os.environ["TMPDIR"] = "/tmp"
    return True


def watch(pid, result_r, deadline):
    """Wait for the worker until the deadline, collecting what it writes to the result pipe.

    Returns (timed_out, wait status, collected bytes).
    """
    os.set_blocking(result_r, False)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    data = bytearray()
    reading = True
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, SIGKILL)
            status = os.waitpid(pid, 0)[1]
            timed_out = True
            break
        watched = ([result_r] if reading else []) + ([pidfd] if pidfd is not None else [])
        wait = remaining if pidfd is not None else min(remaining, 0.005)
        ready = select.select(watched, [], [], wait)[0]
        if result_r in ready:
            reading = read_some(result_r, data)
    while reading:
        reading = read_some(result_r, data, stop_when_empty=True)
    return timed_out, status, data


def read_some(fd, data, stop_when_empty=False):
    """Append what can be read now (keeping the last RESULT_BUFFER bytes); False at end of stream."""
    try:
        chunk = os.read(fd, RESULT_BUFFER)
    except BlockingIOError:
        return not stop_when_empty
    if not chunk:
        return False
    data += chunk
    if len(data) > RESULT_BUFFER:
        del data[:-RESULT_BUFFER]
    return True


def accepted_result(data, nonce, pid):
    """The last line carrying the nonce and the worker's pid, as (status, error_type, detail)."""
    for line in reversed(bytes(data).split(b"\n")):
        parts = line.split(b" ")
        if len(parts) != 5 or parts[0] != nonce or parts[1] != str(pid).encode():
            continue
        try:
            status, error_type = parts[2].decode(), parts[3].decode()
            detail = bytes.fromhex(parts[4].decode()).decode("utf-8", "replace")
        except ValueError:
            continue
        if status in STATUSES:
            return status, "" if error_type == "-" else error_type, detail
    return None


def kill_descendants():
    """SIGKILL and reap every descendant until none is left.

    As a subreaper this process inherits every orphan below it, so once it has no children at all,
    no descendant exists. Processes forked while a sweep runs are caught by the next one.
    """
    me = os.getpid()
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        for pid in descendants(me):
            try:
                os.kill(pid, SIGKILL)
            except OSError:
                pass
        time.sleep(0.001)


def descendants(root):
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


# ---------------------------------------------------------------- worker

def worker(job, libc, nonce, result_w):
    """Limit this process, drop privileges, run the program and its tests, report, exit."""
    try:
        path_dirs = open_path_dirs() if job["uid"] is not None else {}
        set_limits(job["limits"])
        if job["uid"] is not None:
            drop_privileges(job["uid"], job["gid"])
        prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
        reach_path_dirs(path_dirs)
    except BaseException as exc:
        emit(result_w, nonce, ("setup_error", "", describe(exc)))
        os._exit(EXIT_WORKER_SETUP)
    outcome = run_tests(job)
    emit(result_w, nonce, outcome)
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(0)


def open_path_dirs():
    """Descriptors of the import path's directories, opened while they are still readable."""
    fds = {}
    for entry in sys.path:
        if entry not in fds and os.path.isdir(entry):
            fds[entry] = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
    return fds


def reach_path_dirs(fds):
    """Replace import-path entries the sandbox user cannot read by their open descriptors.

    Packages imported before the switch (encodings, collections, ctypes...) import their submodules
    lazily through their own __path__, which is redirected the same way.
    """
    moved = {}
    for entry, fd in fds.items():
        if os.access(entry, os.R_OK | os.X_OK):
            os.close(fd)
        else:
            moved[entry] = f"/proc/self/fd/{fd}"
    if not moved:
        return
    sys.path[:] = [relocate(entry, moved) for entry in sys.path]
    for module in list(sys.modules.values()):
        path = getattr(module, "__dict__", {}).get("__path__")
        if isinstance(path, list):
            path[:] = [relocate(entry, moved) for entry in path]


def relocate(path, moved):
    """`path` under the longest moved directory, rewritten below that directory's descriptor."""
    for directory in sorted(moved, key=len, reverse=True):
        if path == directory or path.startswith(directory + "/"):
            return moved[directory] + path[len(directory):]
    return path


def set_limits(limits):
    for name, (soft, hard) in limits.items():
        which = getattr(resource, "RLIMIT_" + name)
        current_hard = resource.getrlimit(which)[1]
        if os.geteuid() != 0 and current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
        resource.setrlimit(which, (min(soft, hard), hard))


def drop_privileges(uid, gid):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise PermissionError(f"could not switch to uid {uid} gid {gid}")


def emit(fd, nonce, outcome):
    status, error_type, detail = outcome
    line = b" ".join([nonce, str(os.getpid()).encode(), status.encode(), (error_type or "-").encode(),
                      detail.encode("utf-8", "replace").hex().encode()]) + b"\n"
    try:
        while line:
            line = line[os.write(fd, line):]
    except OSError:
        os._exit(EXIT_RESULT_LOST)


# ---------------------------------------------------------------- harness

def run_tests(job):
    """Compile everything, then run program, setup code and each assert; return (status, error_type, detail)."""
    pieces = [("program", job["program"])]
    if job["setup"].strip():
        pieces.append(("setup", job["setup"]))
    pieces += [(f"test {i}", test) for i, test in enumerate(job["tests"], 1)]
    sources = {f"<{label}>": source for label, source in pieces}
    compiled = []
    for label, source in pieces:
        try:
            compiled.append((label, compile(source, f"<{label}>", "exec", dont_inherit=True)))
        except BaseException as exc:
            show_traceback(exc, sources)
            kind = "syntax" if isinstance(exc, (SyntaxError, ValueError)) else error_type(exc)
            return "error", kind, f"{label}: {describe(exc)}"
    namespace = fresh_main()
    for label, code in compiled:
        try:
            exec(code, namespace)
        except BaseException as exc:
            show_traceback(exc, sources)
            return outcome_of(exc, label, sources)
    return "passed", "", ""


def fresh_main():
    """A new __main__ module for the program, so that `import __main__` and pickling see the program."""
    module = type(sys)("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    return module.__dict__


def outcome_of(exc, label, sources):
    if isinstance(exc, AssertionError) and label.startswith("test ") and innermost_file(exc) == f"<{label}>":
        message = describe(exc)
        detail = f"{label} failed: {sources[f'<{label}>'].strip()}"
        if message != "AssertionError":
            detail += f" ({message})"
        write_stderr(detail + "\n")
        return "failed", "", detail[:DETAIL_CHARS]
    return "error", error_type(exc), f"{label}: {describe(exc)}"[:DETAIL_CHARS]


def error_type(exc):
    if isinstance(exc, OSError) and exc.errno == EFBIG:
        return "output_limit"
    for cls in type(exc).__mro__:
        if cls in ERROR_TYPES:
            return ERROR_TYPES[cls]
    return "runtime"


def innermost_file(exc):
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename if tb is not None else None


def describe(exc):
    name = type(exc).__name__
    try:
        message = str(exc)
    except BaseException:
        message = "<unprintable message>"
    return (f"{name}: {message}" if message else name)[:DETAIL_CHARS]


def show_traceback(exc, sources):
    """Write a short traceback (last frames, with the program's lines) to stderr for stderr_tail."""
    try:
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno, tb.tb_frame.f_code.co_name))
            tb = tb.tb_next
        frames = [f for f in frames if f[0] in sources][-TRACEBACK_FRAMES:]
        lines = ["Traceback (most recent call last):"]
        for filename, lineno, name in frames:
            lines.append(f'  File "{filename}", line {lineno}, in {name}')
            source_lines = sources[filename].splitlines()
            if 0 < lineno <= len(source_lines):
                lines.append("    " + source_lines[lineno - 1].strip())
        if isinstance(exc, SyntaxError) and exc.text:
            lines.append(f'  File "{exc.filename}", line {exc.lineno}')
            lines.append("    " + exc.text.strip())
        lines.append(describe(exc))
        write_stderr("\n".join(lines) + "\n")
    except BaseException:
        pass


def write_stderr(text):
    try:
        for stream in (sys.__stdout__, sys.__stderr__):
            stream.flush()
    except BaseException:
        pass
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


main()
'''
