"""Run generated programs against their test asserts, each in a fresh, limited interpreter.

This is the only module of pva-sae that executes generated code (the code that runs in the child
process is :mod:`pva_sae.execution.child`, which this module starts). It labels a program ``passed``
only when every test assert ran and held. It contains the accidents and the simple attacks that
generated code produces (endless loops, memory, fork and thread bombs, ``sys.exit`` before the tests,
writes outside its directory, floods of output, crashes of the interpreter, attacks on neighbouring
jobs). It is **not a sandbox in the strong sense**: the program shares the kernel with the caller and
no system-call filter is installed. Run untrusted code from strangers in a VM or container as well.

Processes
---------
For every job the caller starts ``python -S -s -P .../child.py`` (``-P`` on Python 3.11+) in a new
session (``start_new_session``), in a fresh temporary directory, stdin from ``/dev/null``, stdout and
stderr to two anonymous temporary files, and a minimal environment. As root, once a job's private
tmpfs (step 3) was mounted in this process, jobs get no directory on the host: the supervisor starts
in ``/`` and mounts the tmpfs on ``/tmp`` itself (should that fail, nothing runs, and the job runs
again with a directory, as do the jobs after it). ``child.py`` is run by path: the
interpreter reads and compiles the whole file at start-up, with the caller's credentials, so the
later uid drop never needs to read it. That process is the **supervisor**; it runs trusted code only:

1. it reads the job (marshal) from an inherited file descriptor and closes it;
2. it becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``): any process the program starts, even one
   that calls ``setsid()`` to leave the process group, stays its descendant;
3. as root, it enters a network namespace (a new one; with the fork server, its worker slot's, see
   "Network namespaces") and new IPC and mount namespaces (where the kernel allows them): the
   program has no network and no System V IPC shared with anyone, a size-limited tmpfs is mounted on
   the working directory (or on ``/tmp``, see above) and bound over ``/tmp``, ``/var/tmp``,
   ``/dev/shm`` and ``/run/lock``, and ``/`` is remounted read-only. It then unshares the pid
   namespace and forks **pid 1** of the new namespace, a trusted process that only reaps orphans and
   dies with the supervisor (``PR_SET_PDEATHSIG``); when pid 1 dies the kernel kills every process of
   the namespace. (With the fork server the supervisor is forked as pid 1 of a new pid namespace and
   is that reaper itself, see below);
4. it forks the **worker** (pid 2 of the namespace, so the program gets ordinary signal semantics),
   which sets the resource limits (``RLIMIT_AS``, ``RLIMIT_CPU``, ``RLIMIT_FSIZE``,
   ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``, ``RLIMIT_CORE=0``) on itself, drops to the job's uid when
   running as root (``setgroups([])``, ``setgid``, ``setuid``, then ``PR_SET_NO_NEW_PRIVS``), and only
   then runs the program;
5. it waits for the worker at most ``cfg.timeout_s`` (reaping meanwhile every orphan of the job it
   adopted, so that exited ones do not count against ``RLIMIT_NPROC``), SIGKILLs the worker on
   timeout, kills pid 1 of the namespace (as pid 1 itself: ``kill(-1, SIGKILL)``, which reaches
   every other process of the namespace, and reaps them), then, when it is not pid 1 of the job's
   namespace (spawn), kills and reaps every remaining descendant (found through ``/proc``, which
   stays the host's, so its pids are the supervisor's), and writes its report to the caller through a second inherited pipe. It also stops at once when
   the caller dies (its end of that pipe closes).

The caller waits for the supervisor (with a margin, in case the supervisor itself is stuck), sends
SIGKILL to the whole process group, reaps, reads the report, and deletes the temporary directory, if
the job had one.

Start methods (``cfg.start_method``): with ``"spawn"`` the supervisor is a new interpreter, as just
described. With ``"forkserver"`` (the default) a pool (:class:`Sandbox`) starts trusted server
processes, ``python -S -s -P .../forkserver.py``, with the same interpreter, flags and environment,
one per ``SLOTS_PER_SERVER`` worker threads (each thread uses one; a single server, which forks
every supervisor of its slots one after another, would limit a large pool). Each loads ``child.py``
once; for every job it forks a fresh supervisor, as pid 1 of a new pid namespace (it unshares one
just for that fork and returns to its own), that takes the job's descriptors, session, directory and
environment and then runs the same code from step 1, without a separate pid 1 (see
:mod:`pva_sae.execution.forkserver`). The server never runs a program and never reads a job: each
program still gets a new process, new IPC, mount and pid namespaces (and its worker slot's network
namespace, see "Network namespaces"), limits and uid set after the fork in its own worker, and
nothing a program changes reaches the next one. Waiting, the process-group kill and reaping
are then done by the server (it is the supervisor's parent), which is also a subreaper that kills
whatever a supervisor that died abnormally left; the caller waits for the server's answer. A
fork server that dies is replaced (a job it lost runs again on the new one). :func:`probe`
records the start method. A
caller killed before that leaves its temporary directory behind; the next call removes directories
whose creating process is gone (their names carry its pid and start time).

Network namespaces
------------------
With ``"spawn"`` every supervisor unshares a new network namespace. Creating one (the loopback
device is registered under the kernel's global ``rtnl`` lock, with ``pernet_ops_rwsem`` and
``net_rwsem`` held) and destroying one (``cleanup_net``, a single kernel work item, with RCU grace
periods) are serialised across the whole machine, which caps parallel jobs at a few hundred per
second however many cores there are. With ``"forkserver"`` the server makes one network namespace
per **worker slot**, a connection (one pool thread, which runs one job at a time), when the slot
gets its first job; it holds only a descriptor of it (it enters the new namespace, opens
``/proc/self/ns/net`` and returns to its own). Each supervisor of the slot enters it with
``setns`` before it unshares anything else or forks, and closes the descriptor, so no process of
the program holds it. No job can see or change what another job did to the network, because:

1. Jobs that run at the same time never share one: only jobs of one slot do, and the server forks
   a slot's next supervisor only after it has reaped the previous one (it refuses a second job on a
   connection whose job still runs).
2. No process of a job is alive when the next job of its slot starts: a supervisor that ends
   normally has killed every process of the job's pid namespace (it is pid 1 of it under the fork
   server) and reaped every descendant (step 5), and a
   process has released its descriptors, sockets included, before it can be reaped. When a
   supervisor ends otherwise (killed, stuck, failed), processes of its job may still be dying: the
   server discards the slot's namespace and the next job gets a new one.
3. A program cannot change the namespace's lasting state. It is owned by the host's user
   namespace and the program holds no capability in it (it runs as a pool uid under
   ``PR_SET_NO_NEW_PRIVS``): it cannot bring loopback up (``SIOCSIFFLAGS`` fails with ``EPERM``),
   add an address, route, rule, neighbour, queueing discipline or firewall rule, or write
   ``/proc/sys/net`` (owned by root, mode 0644). A user namespace it creates gives it capabilities
   only over the namespaces that user namespace owns, which die with its processes. With loopback
   down and no other interface, no packet goes anywhere: a TCP connect fails with ``ENETUNREACH``,
   so no connection can linger in ``TIME_WAIT``.
4. What could outlive a program is a socket (held in a cycle of unix sockets passing each other
   over ``SCM_RIGHTS``, until the kernel's garbage collector frees it, it keeps an abstract unix
   name or a port bound) or an IPv6 flow label (they linger after release). Once every process of
   the job is dead the supervisor reads ``/proc/thread-self/net`` (``sockstat`` and ``sockstat6``:
   every socket a process made in the namespace, of any family, and TCP sockets in any state or in
   ``TIME_WAIT``; the unix socket table; flow labels; addresses and routes) and, when it finds any,
   the server discards the namespace.

So every job enters a new network namespace or one in which no socket, flow label, address or
route is left and loopback is down, as in a new one. What does carry over are the namespace's
statistics counters (``/proc/net/snmp``, ``/proc/net/netstat``, loopback's counters in
``/proc/net/dev``): a program that makes failed sends raises ``OutNoRoutes``, which a later job of
its slot can read. Two programs written to cooperate could pass a few bits that way; a program that
does not read these files is not affected, and the host's ``/proc`` already offers such channels
(see "Residual risks"). The IPC namespace stays per job (System V segments, semaphores and message
queues, and POSIX message queues, outlive their processes), and so does the mount namespace (the
tmpfs must be new for every job). :func:`probe` records ``network_namespace``: ``"per worker
slot"``, ``"per job"`` (spawn, or where ``setns`` fails) or ``"none"``.

The limits are set inside the child rather than in a ``preexec_fn`` because ``preexec_fn`` is unsafe
in a threaded caller (``run_jobs`` uses threads) and because the supervisor itself must stay
unlimited. The uid drop matters beyond file permissions: ``RLIMIT_NPROC`` is not enforced for root,
and a root program could kill the caller.

Jobs cannot touch each other
----------------------------
As root, every running job has a uid of its own, from a pool (``cfg.uid_pool_start`` to
``uid_pool_start + uid_pool_size - 1``: uids without a passwd entry, with the group of
``cfg.sandbox_user``). A job claims a free uid with an exclusive ``flock`` on
``/run/lock/pva-sandbox-uids/<uid>.lock`` (under ``/tmp`` without ``/run/lock``; the folder is checked
to be root's on every claim), held by the caller until the supervisor has been reaped (by then every
process of the job is dead: a pid namespace dies with its pid 1) and by the supervisor, so concurrent
``run_jobs`` calls, in this process or another, never share a uid. Kill and ptrace permission and ``RLIMIT_NPROC`` go by uid, so
``os.kill(-1, SIGKILL)`` reaches only the job's own processes and a fork or thread bomb exhausts only
its own ``max_processes``; a pid namespace alone would not separate ``RLIMIT_NPROC``. The pid
namespace adds that the program cannot name a process outside its job (its pids are 1, 2, ...;
``os.getppid()`` of the worker is 0, or 1 with the fork server, whose supervisor is pid 1 and owned
by root) and that nothing it started outlives pid 1, even when the supervisor is killed.
``uid_pool_size = 0`` runs every job as ``cfg.sandbox_user`` itself (jobs can
then signal each other and share ``RLIMIT_NPROC``). A pool uid has no passwd entry, so
``pwd.getpwuid(os.getuid())`` (and ``getpass.getuser()``) fails inside the sandbox.

What a program can import
-------------------------
The standard library of the interpreter that runs pva-sae, nothing else, the same wherever the
virtual environment or the package lives. The child is the base interpreter (``sys._base_executable``
with symlinks resolved, not a venv's ``bin/python``) started with ``-S`` (no ``site``: no site-packages,
no ``.pth`` files, no editable installs); the builtins ``site`` would add (``exit``, ``quit``, ``help``)
are added by hand. The standard library of an interpreter under a private home (``/root/.pyenv``) is
not readable by the sandbox user, and one under ``/tmp`` is hidden by the private tmpfs: the
supervisor opens every directory of ``sys.path`` before both, and the worker replaces entries it
cannot reach by ``/proc/self/fd/N``, which reaches the already-open directory without a path lookup.
``sys.executable`` names the base interpreter; it need not be executable by the sandbox user.

The test harness
----------------
The worker runs, in one ``__main__`` namespace: the program, then ``test_setup_code`` (MBPP's setup
code builds objects from classes the program defines, so it must follow the program), then each test
assert in order, stopping at the first that does not hold. Everything is compiled before anything
runs, so a syntax error anywhere is reported as ``syntax``. The namespace's ``__builtins__`` is a copy
of the builtins module (and is what ``import builtins`` returns to the program), while the harness
resolves every built-in name in a private copy taken when ``child.py`` was loaded and binds the ``os``
functions it calls then: a program that patches ``builtins.exec``, ``builtins.isinstance``,
``builtins.AssertionError`` or its own ``__builtins__`` changes what it and the tests see, as in plain
CPython, but not what the harness calls.

How a pass is reported
----------------------
The supervisor draws a random nonce before forking. After the last assert the harness writes one
line, ``<nonce> <pid> <status> <error_type> <hex detail>``, to a pipe read by the supervisor, which
accepts only a line carrying its nonce and the worker's pid (as the worker sees it, in its
namespace). A program that exits early (``sys.exit(0)`` is caught as ``exit``; ``os._exit(0)`` leaves
no line), prints "passed", writes to every open descriptor, or forks a child that finishes the tests
in its place cannot produce an accepted line. stdin is ``/dev/null`` and the nonce never passes
through a file or an argument.

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

Timeouts under load: in :func:`run_jobs` (and :meth:`Sandbox.map`), a job that hit the wall-clock
limit while other jobs of the pool ran beside it is run once more, alone (no other job of the pool
beside it), after the parallel batch; its result then has ``attempts == 2`` and the second
attempt's outcome is the label. The re-runs waiting when a round starts (those of this batch, and of
other batches labelled beside it in the same pool) run together in that round, at most half the pool's
workers at once, so that each has a core to itself: a round of endless loops costs one more ``timeout_s``
of wall-clock time, whatever their number (up to half the workers). A caller that labels many batches
beside other work and can wait (steering) passes ``defer_reruns``: its re-runs then wait until half the
workers' worth have gathered, the caller flushes, or ``DEFER_MAX_S`` passes, so that endless loops spread
over a stage share a few rounds instead of pausing the pool once each. A ``RLIMIT_CPU`` timeout is not
re-run (load does not consume the program's CPU time). :class:`BatchStats` counts the re-runs.

When ``cpu_time_s <= timeout_s`` (the default: both 10) and the pool has more than one worker, a job run in a
parallel batch gets a CPU-time limit of ``ceil(CPU_LOAD_MARGIN x cpu_time_s)`` and a wall-clock limit of
twice that (or of twice ``timeout_s``, the longer), so that a busy endless loop reaches its CPU-time limit
and its label is final at once: load can inflate a program's CPU time (cores shared by hyperthreads, lower
clocks), but not by the margin (1.5), so a program that used that much CPU beside others would use more
than ``cpu_time_s`` alone too, and the CPU limit would stop it there. Every other attempt that ran longer
than ``timeout_s`` or used more than ``cpu_time_s`` of CPU (a program that sleeps, one starved by the load,
one that finished late) is run again alone as above; one that ran with no other job beside it is a timeout
(it ran past a limit alone). An attempt that ended within both limits is final, as before. The labels are
those of the plain policy (given the margin); only the attempts differ.

Output
------
stdout and stderr go to anonymous files (never to memory); ``RLIMIT_FSIZE`` bounds each at
``file_size_limit_mb``, and a program writing past it gets ``OSError(EFBIG)`` (Python ignores
``SIGXFSZ``), reported as ``output_limit`` unless the program handles it. The caller keeps the last
``output_limit_kb`` of stdout (``stdout_tail``) and the last 2 KB of stderr (``stderr_tail``, which
ends with the harness's traceback of the failure); the rest is discarded.

Pools and the label cache
-------------------------
:class:`Sandbox` is a pool kept for a whole stage: its threads and fork server live across
batches (``map`` blocks, ``submit`` returns a Future), so a caller can generate the next batch
while the pool labels this one. Given a label cache (:mod:`pva_sae.execution.label_cache`) it
does not run a job whose label is stored, runs identical jobs of a batch once, and stores every
new final label except timeouts and sandbox failures; such results have ``cached`` True and count
in :class:`BatchStats` as ``cache_hits``.

Determinism
-----------
``-I`` would ignore ``PYTHONHASHSEED``; the interpreter instead gets ``-S``, ``-s`` and ``-P`` and an
environment built here from scratch with ``PYTHONHASHSEED=0``, which isolates it just as well and
makes set and dict order of strings, and therefore labels, the same on every run.

Residual risks
--------------
* The harness runs in the program's interpreter. A program written to subvert it can still report a
  false pass: the nonce and the harness's functions are reachable from the program through frame
  and object introspection (``sys._getframe``, ``gc.get_objects``, tracebacks), a trace function
  (``sys.settrace``) can alter the test frames, and ``ctypes`` can write anywhere in the process's
  memory. A wrong function can also return an object whose ``__eq__`` always answers True, which no
  assert-based test can tell from a right answer. Generated code does none of this by accident; the
  labels are trustworthy for a model's honest attempts, not against an adversary.
* An exploit of the kernel escapes everything here.
* ``/proc`` is the host's: a program can list every process of the machine and read what ``/proc``
  shows to any user (command lines, for instance), though it cannot signal or trace them.
* Only the root mount is remounted read-only; other mounts (``/dev``, a separate ``/home`` or data
  disk) stay writable wherever their permissions let any user write (the usual world-writable
  directories are covered by the private tmpfs).
* ``RLIMIT_AS`` is per process: a program with ``max_processes`` processes may use that many times
  ``memory_limit_mb``. There is no cgroup.
* Without root there is no uid drop, no namespace and no uid pool: the program runs as the caller's
  user and may read or write that user's files and signal that user's processes (the supervisor and
  its neighbours included; processes that left the group may then outlive the job), it sees the real
  ``/tmp`` and the network, and ``RLIMIT_NPROC`` counts all of the user's processes. :func:`probe`
  says which protections are active.

Linux only (``/proc``, ``prctl``, namespaces, ``os.fork``).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import logging
import marshal
import math
import os
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, Self

from pva_sae.config import ConfigError, SandboxConfig
from pva_sae.execution import child, forkserver
from pva_sae.execution.forkserver import ForkServer, ServerGone

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "error", "timeout")

ERROR_TYPES = (
    "syntax", "name", "type", "value", "index", "key", "attribute", "import", "recursion", "memory",
    "zero_division", "eof", "runtime", "output_limit", "exit", "signal", "sandbox",
)

# Marker in every sandbox process's command line and temporary directory name, so that `ps` and `ls`
# show what they are.
PROCESS_TAG = "pva-sandbox"
# What a program may import (see "What a program can import"); recorded by probe().
IMPORT_POLICY = "stdlib"

CHILD_PATH = os.path.abspath(child.__file__)
FORKSERVER_PATH = os.path.abspath(forkserver.__file__)
START_METHODS = ("forkserver", "spawn")
STDERR_TAIL_BYTES = 2048
# The supervisor enforces timeout_s; the caller waits this much longer before killing the supervisor.
SUPERVISOR_GRACE_S = 10.0
# The private tmpfs holds this many times file_size_limit_mb.
TMPFS_FILES = 4
HASH_SEED = "0"
REPORT_LIMIT_BYTES = 1 << 20
# Where the uid locks live: a root-owned folder of the first of these that exists.
UID_LOCK_PARENTS = ("/run/lock", "/tmp")
UID_LOCK_FOLDER = "pva-sandbox-uids"
UID_CLAIM_POLL_S = 0.01
# A pool starts one fork server per this many worker threads, so that no single server process (which
# forks every supervisor of its slots, one after another) limits a large pool.
SLOTS_PER_SERVER = 8
DEFER_MAX_S = 30.0  # longest a deferred re-run waits for others to share its round (Sandbox.map)
CPU_LOAD_MARGIN = 1.5  # a job beside others gets this many times cpu_time_s (rounded up), when cpu_time_s <= timeout_s
BESIDE_WALL_FACTOR = 2.0  # and a wall-clock limit of this many times max(timeout_s, its CPU limit)
# The highest uid the pool may reach (2**31 - 2; -1 as a 32-bit uid means "unchanged").
MAX_UID = 2**31 - 2
_WORKDIR_NAME = re.compile(re.escape(PROCESS_TAG) + r"-(\d+)-(\d+)-")
_cleaned_folders: set[str] = set()
_cleaning = threading.Lock()
_claims = threading.local()  # .uid: the pool uid this thread claimed last
# As root, once a job's private tmpfs was mounted (True), jobs get no working directory on the host
# (see "Processes"); once a supervisor could not mount it on /tmp (False), every job gets one again.
_private_tmp: dict[str, bool | None] = {"works": None}
_private_tmp_lock = threading.Lock()


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
    attempts: int = 1  # 2 when an attempt in a parallel batch was re-run alone (a timeout, or past a limit); the last
    cached: bool = False  # not run: the label of an identical job, from the label cache or from the same batch

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class BatchStats:
    """Counts over every :func:`run_jobs` call it is passed to: pass one object to all calls of a build.

    ``as_dict()`` is what a run manifest records.
    """

    jobs: int = 0  # jobs labelled, each counted once however many attempts it took (cache hits included)
    reruns: int = 0  # jobs whose attempt beside other jobs load may have decided (see Timeouts under load), run again alone
    rerun_timeouts: int = 0  # of those, the ones that timed out again (their label is timeout)
    timeouts: int = 0  # jobs whose final status is timeout (wall-clock or CPU-time limit)
    cache_hits: int = 0  # jobs not run: their label came from the label cache or an identical job of the batch

    def add(self, results: Sequence[ExecResult], reruns: int) -> None:
        self.jobs += len(results)
        self.reruns += reruns
        self.rerun_timeouts += sum(r.attempts == 2 and r.status == "timeout" and not r.cached for r in results)
        self.timeouts += sum(r.status == "timeout" for r in results)
        self.cache_hits += sum(r.cached for r in results)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- public entry points

class LabelStore(Protocol):
    """What :class:`Sandbox` needs of a label cache (:class:`pva_sae.execution.label_cache.LabelCache`)."""

    def key(self, job: ExecJob) -> str: ...

    def get_many(self, keys: Iterable[str]) -> dict[str, ExecResult]: ...

    def put_many(self, items: Sequence[tuple[str, ExecResult]]) -> None: ...


def run_job(job: ExecJob, cfg: SandboxConfig) -> ExecResult:
    """Run one job in its own sandbox and classify the outcome (a single attempt: it runs alone)."""
    with Sandbox(cfg, workers=1) as sandbox:
        return sandbox.run_once(job)[0]


def run_jobs(jobs: Sequence[ExecJob], cfg: SandboxConfig, progress: Callable[[ExecResult], None] | None = None,
             stats: BatchStats | None = None, cache: LabelStore | None = None) -> list[ExecResult]:
    """Run jobs in parallel (``cfg.workers`` at once; 0 = one per CPU core); results come back in job order.

    A job that hits the wall-clock limit while others run beside it is run again, alone, once the
    parallel batch is done (``attempts == 2``). ``progress`` is called in the calling thread with each
    final result (completion order; re-run jobs last). ``stats``, if given, is added to. With
    ``cache``, a job whose label is known is not run (``cached`` is True), see :meth:`Sandbox.map`.
    A pool (and its fork server) lives for this call only; :class:`Sandbox` keeps one across calls.
    """
    _start(cfg)
    if not jobs:
        return []
    workers = min(cfg.workers or os.cpu_count() or 1, len(jobs))
    with Sandbox(cfg, cache=cache, stats=stats, workers=workers) as sandbox:
        return sandbox.map(jobs, progress)


class Sandbox:
    """A pool that runs jobs, kept alive across batches: ``workers`` threads and, with
    ``cfg.start_method == "forkserver"``, one fork server per :data:`SLOTS_PER_SERVER` threads, started
    (pre-warmed) when the pool is made; each thread sends its jobs to one of them.

    Use it as a context manager, or call :meth:`close`. :meth:`map` (blocking) and :meth:`submit`
    (a :class:`~concurrent.futures.Future`) label a batch with :func:`run_jobs`' semantics, and may be
    called any number of times, also from several threads: jobs of one pool run beside each other,
    and the re-runs of wall-clock timeouts run alone (no other job of this pool beside them; the re-runs
    waiting at that time, from every batch, run together, at most half the workers at once).
    ``cache`` (a :class:`LabelStore`) serves known labels and stores new final ones; ``stats`` is
    added to by every batch. ``workers`` defaults to ``cfg.workers`` (0 = one per CPU core).
    """

    def __init__(self, cfg: SandboxConfig, *, cache: LabelStore | None = None, stats: BatchStats | None = None,
                 workers: int | None = None):
        self.cfg, self.cache, self.stats = cfg, cache, stats
        self._user = _start(cfg)
        self.workers = workers or cfg.workers or os.cpu_count() or 1
        self._threads = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox")
        self._batches: ThreadPoolExecutor | None = None
        self._gate = _Gate()
        # Re-runs of wall-clock timeouts, waiting for a round alone: [job, result or None, done Event] (see
        # _rerun_alone); deferred ones wait for a round that the coordinator thread starts (see map).
        self._reruns: list[list] = []
        self._rerun_cond = threading.Condition()
        self._deferred_since: float | None = None  # when the oldest deferred re-run waiting asked
        self._flush = False      # run a round for the deferred re-runs now
        self._draining = False   # closing: no re-run is deferred any more
        self._coordinator: threading.Thread | None = None
        self._in_round = False
        self._running: dict = {}  # cache key -> Future of its final result, for programs a batch is running now
        self._rerun_threads = ThreadPoolExecutor(max_workers=max(1, self.workers // 2), thread_name_prefix="rerun")
        self._lock = threading.Lock()  # the server, the connections, stats, the re-runs waiting
        self._local = threading.local()
        # One fork server per SLOTS_PER_SERVER threads; a thread keeps the server it was given first.
        self._servers: list[ForkServer | None] = [None] * math.ceil(self.workers / SLOTS_PER_SERVER)
        self._thread_count = 0
        self._connections: list[forkserver.Connection] = []
        self._closed = False
        self._closing = False
        if cfg.start_method == "forkserver":
            for index in range(len(self._servers)):
                self._fork_server(index)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def map(self, jobs: Iterable[ExecJob], progress: Callable[[ExecResult], None] | None = None, *,
            defer_reruns: bool = False) -> list[ExecResult]:
        """Label ``jobs``; results in job order. ``progress`` gets each final result in the calling thread.

        ``defer_reruns``: the re-runs of this batch's wall-clock timeouts wait to share a round alone with
        those of later batches: the round starts once half the workers' worth of re-runs wait, when
        :meth:`flush_reruns` is called, or after ``DEFER_MAX_S``. For callers that label many batches beside
        each other and can wait (steering); without it the round starts as soon as the pool is free.

        With a cache, jobs whose key is stored are not run, of identical jobs of the batch only one
        runs, and a job identical to one another batch of this pool is running now waits for that run's
        final result instead of running again; those results have ``cached`` True and count as
        ``cache_hits``. Timeouts and sandbox failures are never stored, so they run again next time.
        """
        jobs = list(jobs)
        results: list[ExecResult | None] = [None] * len(jobs)
        keys = [self.cache.key(job) for job in jobs] if self.cache is not None else list(range(len(jobs)))
        known = self.cache.get_many(set(keys)) if self.cache is not None else {}
        groups: dict = {}
        for index, key in enumerate(keys):
            if key in known:
                results[index] = dataclasses.replace(known[key], cached=True)
                if progress is not None:
                    progress(results[index])
            else:
                groups.setdefault(key, []).append(index)
        # With a cache, a program another batch of this pool is running now is not run twice: this batch takes
        # that run's final result (identical programs agree, as with the cache).
        owned: dict = {}
        elsewhere: dict = {}
        if self.cache is not None:
            with self._lock:
                for key in groups:
                    if key in self._running:
                        elsewhere[key] = self._running[key]
                    else:
                        owned[key] = self._running[key] = Future()
        mine = {key: indices for key, indices in groups.items() if key not in elsewhere}

        def finish(key, result: ExecResult, shared: bool = False) -> None:
            for n, index in enumerate(groups[key]):
                results[index] = result if n == 0 and not shared else dataclasses.replace(result, cached=True)
                if progress is not None:
                    progress(results[index])

        timed_out: list = []
        try:
            fresh, timed_out = self._run_parallel({key: jobs[indices[0]] for key, indices in mine.items()}, finish)
            if timed_out:  # nothing else of this pool runs beside the re-runs
                again = self._rerun_alone([jobs[groups[key][0]] for key in timed_out], defer=defer_reruns)
                for key, result in zip(timed_out, again):
                    finish(key, dataclasses.replace(result, attempts=2))
                    fresh[key] = results[groups[key][0]]
            if self.cache is not None:
                self.cache.put_many([(key, result) for key, result in fresh.items() if cacheable(result)])
        except BaseException as exc:
            self._release_running(owned, {}, exc)
            raise
        self._release_running(owned, fresh, None)
        if any(not future.done() for future in elsewhere.values()):
            self.flush_reruns()          # the batch running them may wait on a deferred round
        for key, future in elsewhere.items():
            finish(key, future.result(), shared=True)
        if self.stats is not None:
            with self._lock:
                self.stats.add(results, reruns=len(timed_out))
        return results  # type: ignore[return-value]

    def _release_running(self, owned: dict, fresh: dict, error: BaseException | None) -> None:
        """Hand the final results of this batch's own runs to batches waiting on them, and forget them."""
        with self._lock:
            for key in owned:
                self._running.pop(key, None)
        for key, future in owned.items():
            if key in fresh:
                future.set_result(fresh[key])
            else:
                future.set_exception(error or SandboxError("the batch running this program ended without it"))

    def submit(self, jobs: Iterable[ExecJob], progress: Callable[[ExecResult], None] | None = None) -> Future:
        """:meth:`map` in the background: a Future of the results. Batches submitted run one after
        another, in order; ``progress`` is called in the pool's batch thread."""
        with self._lock:
            if self._batches is None:
                self._batches = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-batch")
        return self._batches.submit(self.map, list(jobs), progress)

    def run_once(self, job: ExecJob, limits: SandboxConfig | None = None) -> tuple[ExecResult, dict]:
        """One attempt at one job, in the calling thread: (result, the supervisor's report).

        ``limits``: the attempt's wall-clock and CPU-time limits (default ``cfg``'s). When the fork server dies
        before the job could report (killed, say), the job starts again once on a new server.
        """
        try:
            return _execute(job, self.cfg, self._user, self._connection(), limits)
        except ServerGone:
            self._drop_server(getattr(self._local, "index", 0), getattr(self._local, "server", None))
        try:
            return _execute(job, self.cfg, self._user, self._connection(), limits)
        except ServerGone as exc:
            raise SandboxError(f"the sandbox fork server failed twice in a row: {exc}") from None

    def close(self) -> None:
        """Wait for the running batches, then end the threads and the fork server."""
        if self._closing:
            return
        self._closing = True
        self.drain_reruns()
        if self._batches is not None:
            self._batches.shutdown(wait=True)
        while True:                                  # the rounds of re-runs asked for so far end first
            with self._rerun_cond:
                if not (self._reruns or self._in_round):
                    self._closed = True
                    self._rerun_cond.notify_all()
                    break
                coordinated = self._coordinator is not None and self._coordinator.is_alive()
                if self._in_round or coordinated:
                    self._rerun_cond.wait(timeout=0.5)
                    continue
            self._round()
        if self._coordinator is not None:
            self._coordinator.join()
        self._threads.shutdown(wait=True, cancel_futures=True)
        self._rerun_threads.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
            for index, server in enumerate(self._servers):
                if server is not None:
                    server.close()
                    self._servers[index] = None

    def _run_parallel(self, jobs: dict, finish: Callable[[object, ExecResult], None]) -> tuple[dict, list]:
        """Run each job once; ``finish`` every result but the wall-clock timeouts of jobs that ran beside
        another, whose keys come back (in job order) to be run again alone."""
        futures = {self._threads.submit(self._attempt, job): key for key, job in jobs.items()}
        fresh, timed_out = {}, []
        try:
            for future in as_completed(futures):
                key = futures[future]
                result, report, beside = future.result()
                if _load_may_decide(result, report, self.cfg, self._beside_limits is not None):
                    if beside:
                        fresh[key] = result
                        timed_out.append(key)
                        continue
                    result = _timeout_alone(result, report, self.cfg)
                fresh[key] = result
                finish(key, result)
        except BaseException:
            for future in futures:
                future.cancel()
            wait(futures)
            raise
        order = {key: n for n, key in enumerate(jobs)}
        return fresh, sorted(timed_out, key=order.__getitem__)

    def _rerun_alone(self, jobs: list[ExecJob], defer: bool = False) -> list[ExecResult]:
        """Run ``jobs`` (wall-clock timeouts of a batch) again with no other job of this pool beside them.

        Every re-run waiting when a round starts goes into it, from whichever batches (threads) asked, so
        batches labelled beside each other share the pause; in a round at most half the pool's workers run
        at once, so each re-run has a core to itself (two re-runs on one core would be load again). With
        ``defer`` the round is left to the coordinator thread (see :meth:`map`)."""
        entries = [[job, None, threading.Event()] for job in jobs]
        with self._rerun_cond:
            self._reruns.extend(entries)
            defer = defer and not self._draining and not self._closed
            if defer:
                if self._deferred_since is None:
                    self._deferred_since = time.monotonic()
                if self._coordinator is None or not self._coordinator.is_alive():
                    self._coordinator = threading.Thread(target=self._coordinate, name="sandbox-reruns", daemon=True)
                    self._coordinator.start()
                self._rerun_cond.notify_all()
        if not defer:
            self._round()
        for entry in entries:
            entry[2].wait()
        for entry in entries:
            if isinstance(entry[1], BaseException):
                raise entry[1]
        return [entry[1] for entry in entries]

    def flush_reruns(self) -> None:
        """Start a round for the deferred re-runs waiting now, or for the next one deferred if none waits (a
        caller about to wait on a batch whose first attempts are still running)."""
        with self._rerun_cond:
            self._flush = True
            self._rerun_cond.notify_all()

    def drain_reruns(self) -> None:
        """From now on no re-run is deferred, and those waiting get their round at once (closing)."""
        with self._rerun_cond:
            self._draining = True
            if self._reruns:
                self._flush = True
            self._rerun_cond.notify_all()

    def _round_due(self) -> bool:
        if not self._reruns:
            return False
        return (self._flush or self._draining or len(self._reruns) >= max(1, self.workers // 2)
                or (self._deferred_since is not None and time.monotonic() - self._deferred_since >= DEFER_MAX_S))

    def _coordinate(self) -> None:
        """The coordinator thread: starts a round for the deferred re-runs when one is due (see :meth:`map`)."""
        while True:
            with self._rerun_cond:
                while not self._round_due():
                    if self._closed and not self._reruns:
                        return
                    self._rerun_cond.wait(timeout=0.5 if self._reruns else None)
            try:
                self._round()
            except Exception:  # noqa: BLE001 - its entries got their errors; keep serving the others
                log.exception("a round of sandbox re-runs failed")

    def _round(self) -> None:
        """One round of re-runs alone: every entry waiting when it starts, each done (result or error) after it."""
        with self._gate.alone():       # one round at a time; a later round finds its entries already run
            round_: list[list] = []
            futures: list[Future] = []
            try:
                with self._rerun_cond:
                    round_, self._reruns = self._reruns, []
                    self._deferred_since, self._flush, self._in_round = None, False, True
                for entry in round_:
                    futures.append(self._rerun_threads.submit(self.run_once, entry[0]))
                for entry, future in zip(round_, futures):
                    try:
                        entry[1] = future.result()[0]
                    except Exception as exc:  # noqa: BLE001 - the batch that asked for it raises it
                        entry[1] = exc
            finally:
                # Interrupted (Ctrl+C in the thread leading the round): the re-runs still running end before
                # the pool runs anything else, and every batch waiting on this round gets an answer, also
                # when a second interrupt stops the wait.
                try:
                    for future in futures:
                        future.cancel()
                    wait(futures)
                finally:
                    for entry in round_:
                        if entry[1] is None:
                            entry[1] = SandboxError("the re-run of a timed-out program was interrupted")
                        entry[2].set()
                    with self._rerun_cond:
                        self._in_round = False
                        self._rerun_cond.notify_all()

    @functools.cached_property
    def _beside_limits(self) -> SandboxConfig | None:
        """The limits of an attempt in a parallel batch (None: ``cfg``'s), see "Timeouts under load"."""
        cfg = self.cfg
        if self.workers < 2 or cfg.cpu_time_s > cfg.timeout_s:
            return None
        cpu = math.ceil(CPU_LOAD_MARGIN * cfg.cpu_time_s)
        return dataclasses.replace(cfg, cpu_time_s=cpu, timeout_s=BESIDE_WALL_FACTOR * max(cfg.timeout_s, cpu))

    def _attempt(self, job: ExecJob) -> tuple[ExecResult, dict, bool]:
        with self._gate.beside() as beside:
            result, report = self.run_once(job, self._beside_limits)
        return result, report, beside[0]

    def _fork_server(self, index: int) -> ForkServer:
        """The running fork server number ``index``; a new one when there is none or it died."""
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            server = self._servers[index]
            if server is None or not server.alive():
                if server is not None:
                    server.close()
                command = [interpreter(), *_interpreter_flags()]
                try:
                    server = ForkServer(command, CHILD_PATH, PROCESS_TAG, _child_env(tempfile.gettempdir()))
                except ServerGone as exc:
                    self._servers[index] = None
                    raise SandboxError(f"{exc}; set sandbox.start_method=spawn to run without it") from None
                self._servers[index] = server
            return server

    def _drop_server(self, index: int, server: ForkServer | None) -> None:
        """Forget fork server ``index``, ``server``, which stopped answering (it is killed and reaped),
        unless another thread already replaced it; the next job starts a new one."""
        with self._lock:
            if server is not None and self._servers[index] is server:
                server.close(wait_s=0)
                self._servers[index] = None

    def _connection(self) -> forkserver.Connection | None:
        """This thread's connection to its fork server (None with start_method 'spawn').

        Threads are spread over the servers in the order they first run a job (pool threads, and
        the threads that run the rounds of re-runs)."""
        if self.cfg.start_method != "forkserver":
            return None
        local = self._local
        if not hasattr(local, "index"):
            with self._lock:
                local.index = self._thread_count % len(self._servers)
                self._thread_count += 1
        server = self._fork_server(local.index)
        if getattr(local, "server", None) is not server:
            try:
                connection = server.connect()
            except ServerGone:  # it died since the last job: start another
                self._drop_server(local.index, server)
                server = self._fork_server(local.index)
                connection = server.connect()
            with self._lock:
                self._connections.append(connection)
            local.server, local.connection = server, connection
        return local.connection


class _Gate:
    """Jobs of one pool run beside each other; a round of re-runs runs alone (no other job of the pool beside it)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._active = 0  # jobs running beside each other
        self._starts = 0  # jobs started so far
        self._waiting = 0  # re-runs waiting to run alone
        self._alone = False  # a re-run is running

    @contextmanager
    def beside(self) -> Iterator[list[bool]]:
        """Run one job; the yielded list's item becomes True if another job ran at any time beside it."""
        with self._cond:
            while self._alone or self._waiting:
                self._cond.wait()
            self._active += 1
            self._starts += 1
            started, beside = self._starts, [self._active > 1]
        try:
            yield beside
        finally:
            with self._cond:
                self._active -= 1
                beside[0] = beside[0] or self._starts != started
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._active or self._alone:
                    self._cond.wait()
            finally:                   # also when interrupted while waiting: jobs must not wait for it for ever
                self._waiting -= 1
                self._cond.notify_all()
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


def cacheable(result: ExecResult) -> bool:
    """Whether a label is final enough to be reused: not a timeout (load can cause one), not a failure of
    the sandbox itself, not a SIGKILL (the kernel's OOM killer, which depends on the machine's state)."""
    if result.status == "timeout" or result.error_type == "sandbox":
        return False
    return not (result.error_type == "signal" and result.detail == "SIGKILL")


def probe(cfg: SandboxConfig) -> dict[str, bool | str]:
    """Which protections are active on this machine: run a trivial job and read the supervisor's report.

    Keys: ``drops_privileges`` (programs run unprivileged), ``private_tmp`` (mount namespace with a
    private tmpfs and a read-only root), ``no_network`` (network namespace), ``network_namespace``
    (``"per worker slot"`` with the fork server, ``"per job"`` with spawn, ``"none"`` without one; see
    "Network namespaces"), ``private_ipc`` (IPC namespace), ``pid_namespace`` (each job in its own pid namespace), ``per_job_uid`` (each running
    job has its own uid from the pool), ``imports`` (what a program may import: ``"stdlib"``),
    ``interpreter`` (the Python that runs the programs), ``start_method`` (``cfg.start_method``, the
    one the probe job used) and ``code_version`` (digest of the sandbox's code, see :func:`code_version`).
    """
    with Sandbox(cfg, workers=1) as sandbox:
        result, report = sandbox.run_once(ExecJob("probe", "", ()))
    if not result.passed:
        raise SandboxError(f"the sandbox probe did not pass: {result.status} {result.error_type} {result.detail}")
    found: dict[str, bool | str] = {
        name: bool(report.get(name))
        for name in ("drops_privileges", "private_tmp", "no_network", "private_ipc", "pid_namespace")
    }
    found["network_namespace"] = str(report.get("network_namespace", "none"))
    found["per_job_uid"] = bool(report.get("drops_privileges")) and cfg.uid_pool_size > 0
    found["imports"] = IMPORT_POLICY
    found["interpreter"] = interpreter()
    found["start_method"] = cfg.start_method
    found["code_version"] = code_version()
    return found


@functools.cache
def code_version() -> str:
    """sha256 of the code that decides a label (this module, child.py, forkserver.py): part of a label's cache key."""
    digest = hashlib.sha256()
    for path in (os.path.abspath(__file__), CHILD_PATH, FORKSERVER_PATH):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def check_sandbox_config(cfg: SandboxConfig) -> None:
    """Raise :class:`ConfigError` naming the field and the fix when ``cfg`` cannot work on this machine.

    Fast (no process is started): run it before loading a model.
    """
    _sandbox_user(cfg)
    interpreter()


# --------------------------------------------------------------------------- configuration

def _start(cfg: SandboxConfig) -> tuple[int, int] | None:
    """Check the config, remove what killed callers left behind; the sandbox user's (uid, gid) as root."""
    user = _sandbox_user(cfg)
    _remove_stale_workdirs(user, cfg)
    return user


def _sandbox_user(cfg: SandboxConfig) -> tuple[int, int] | None:
    """Validate ``cfg``; (uid, gid) of ``cfg.sandbox_user`` when we are root, None when we are not."""
    _check_limits(cfg)
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
        raise ConfigError(f"sandbox.sandbox_user {cfg.sandbox_user!r} has uid or gid 0; set it to an unprivileged user")
    _check_pool_is_free(cfg)
    return entry.pw_uid, entry.pw_gid


def _check_limits(cfg: SandboxConfig) -> None:
    positive = ("timeout_s", "cpu_time_s", "memory_limit_mb", "file_size_limit_mb", "max_open_files",
                "max_processes", "output_limit_kb")
    for name in positive:
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            default = getattr(SandboxConfig(), name)
            raise ConfigError(f"sandbox.{name} must be a finite number > 0, got {value!r}; "
                              f"set it to a positive value (default: sandbox.{name}={default})")
    if cfg.max_open_files < 16:
        raise ConfigError(f"sandbox.max_open_files must be >= 16 (the interpreter needs some), got {cfg.max_open_files}")
    if cfg.start_method not in START_METHODS:
        raise ConfigError(f"sandbox.start_method must be one of {', '.join(START_METHODS)}, got {cfg.start_method!r}")
    if cfg.workers < 0:
        raise ConfigError(f"sandbox.workers must be >= 0 (0 = one per CPU core), got {cfg.workers}")
    if cfg.uid_pool_size < 0 or (cfg.uid_pool_size and not 0 < cfg.uid_pool_start <= MAX_UID - cfg.uid_pool_size):
        raise ConfigError(
            f"sandbox.uid_pool_start={cfg.uid_pool_start} with sandbox.uid_pool_size={cfg.uid_pool_size} is not a "
            f"range of uids in 1..{MAX_UID}; set uid_pool_size to 0 (no pool) or more, and uid_pool_start above 0"
        )


def _check_pool_is_free(cfg: SandboxConfig) -> None:
    """No user may own a pool uid: the programs could signal that user's processes."""
    pool = range(cfg.uid_pool_start, cfg.uid_pool_start + cfg.uid_pool_size)
    taken = sorted((e.pw_uid, e.pw_name) for e in pwd.getpwall() if e.pw_uid in pool)
    if taken:
        uid, name = taken[0]
        raise ConfigError(
            f"sandbox.uid_pool_start={cfg.uid_pool_start}, sandbox.uid_pool_size={cfg.uid_pool_size}: uid {uid} "
            f"belongs to user {name!r}, whose processes the programs could then signal; move the pool to uids "
            "that no user has (set sandbox.uid_pool_start), or set sandbox.uid_pool_size=0"
        )


def interpreter() -> str:
    """The Python that runs the programs: this one's base interpreter (outside any venv), symlinks resolved."""
    for candidate in (getattr(sys, "_base_executable", None), sys.executable):
        if candidate:
            path = os.path.realpath(candidate)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    raise SandboxError(f"no Python interpreter to run programs with (sys.executable is {sys.executable!r})")


# --------------------------------------------------------------------------- identities and directories

@contextmanager
def _job_identity(cfg: SandboxConfig, user: tuple[int, int] | None) -> Iterator[tuple[tuple[int, int] | None, int | None]]:
    """((uid, gid) the job runs as, or None without root; the descriptor holding its uid's lock, or None)."""
    if user is None or not cfg.uid_pool_size:
        yield user, None
        return
    uid, lock_fd = _claim_uid(cfg)
    try:
        yield (uid, user[1]), lock_fd
    finally:
        os.close(lock_fd)


def _claim_uid(cfg: SandboxConfig) -> tuple[int, int]:
    """A pool uid no running job has, with the descriptor of its exclusive lock; waits while all are taken.

    The search starts at the uid this thread claimed last (free again once its job ended, unless
    another job took it), so that a pool thread does not try the uids of every running job first.
    """
    folder = _uid_lock_folder()
    pool = range(cfg.uid_pool_start, cfg.uid_pool_start + cfg.uid_pool_size)
    last = getattr(_claims, "uid", None)
    first = pool.index(last) if last in pool else 0
    while True:
        for uid in (*pool[first:], *pool[:first]):
            try:
                fd = os.open(os.path.join(folder, f"{uid}.lock"),
                             os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:  # the folder was removed (a temp cleaner): make and check it again
                folder = _uid_lock_folder()
                fd = os.open(os.path.join(folder, f"{uid}.lock"),
                             os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _claims.uid = uid
            return uid, fd
        time.sleep(UID_CLAIM_POLL_S)


def _uid_lock_folder() -> str:
    """The uid locks' folder, made if missing and checked on every claim: its parent may be world-writable
    (/run/lock, /tmp), so a folder removed and made again by another user must not be used."""
    parent = next((p for p in UID_LOCK_PARENTS if os.path.isdir(p)), UID_LOCK_PARENTS[-1])
    folder = os.path.join(parent, UID_LOCK_FOLDER)
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise SandboxError(f"{folder} must be a directory owned by root and writable only by root; remove it")
    return folder


@functools.cache
def _workdir_prefix(pid: int) -> str:
    """Names of process ``pid``'s working directories start with this: tag, pid and start time."""
    return f"{PROCESS_TAG}-{pid}-{_start_time(pid)}-"


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    return int(text[text.rindex(b")") + 2:].split()[19])


def _remove_stale_workdirs(user: tuple[int, int] | None, cfg: SandboxConfig) -> None:
    """Delete working directories left by callers that died (once per process and temp folder)."""
    folder = tempfile.gettempdir()
    with _cleaning:
        if folder in _cleaned_folders:
            return
        _cleaned_folders.add(folder)
    owners = {os.geteuid()} | ({user[0]} if user else set())
    if user and cfg.uid_pool_size:
        owners |= set(range(cfg.uid_pool_start, cfg.uid_pool_start + cfg.uid_pool_size))
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _WORKDIR_NAME.match(entry.name)
        if not match or _start_time(int(match[1])) == int(match[2]):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid in owners:
            _remove_tree(entry.path)


# --------------------------------------------------------------------------- one job

def _payload(job: ExecJob, cfg: SandboxConfig, identity: tuple[int, int] | None, host_dir: bool = True) -> bytes:
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
        "host_dir": host_dir,
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


def _interpreter_flags() -> list[str]:
    return ["-S", "-s", "-P"] if sys.version_info >= (3, 11) else ["-S", "-s"]


def _child_command(payload_fd: int, report_fd: int) -> list[str]:
    return [interpreter(), *_interpreter_flags(), CHILD_PATH, str(payload_fd), str(report_fd), PROCESS_TAG]


def _execute(job: ExecJob, cfg: SandboxConfig, user: tuple[int, int] | None,
             connection: forkserver.Connection | None = None, limits: SandboxConfig | None = None
             ) -> tuple[ExecResult, dict]:
    """Run one job; return its result and the supervisor's report (empty when there was none).

    ``limits`` (default ``cfg``) gives this attempt's wall-clock and CPU-time limits; outcomes are still
    described with ``cfg``'s (the caller decides what an attempt past them means).

    With ``connection`` the fork server forks the supervisor, otherwise a new interpreter starts.
    Everything here runs in a pool thread under the interpreter lock, for every job, so it uses
    descriptors and plain system calls rather than file objects.
    """
    started = time.monotonic()
    run_cfg = limits or cfg
    with _job_identity(cfg, user) as (identity, lock_fd):
        host_dir = identity is None or _private_tmp["works"] is not True
        workdir = tempfile.mkdtemp(prefix=_workdir_prefix(os.getpid())) if host_dir else None
        files: list[int] = []
        try:
            if identity is not None and workdir is not None:
                os.chown(workdir, *identity)
            out, err, payload = files = [_anonymous_file() for _ in range(3)]
            _write_all(payload, _payload(job, run_cfg, identity, host_dir))
            os.lseek(payload, 0, os.SEEK_SET)
            inherited = (payload,) + ((lock_fd,) if lock_fd is not None else ())
            report, supervisor_stuck, exit_code = _run_supervisor(inherited, out, err, workdir, run_cfg, connection)
            stderr_tail = _tail(err, min(STDERR_TAIL_BYTES, cfg.output_limit_kb * 1024))
            stdout_tail = _tail(out, cfg.output_limit_kb * 1024)
        finally:
            for fd in files:
                os.close(fd)
            if workdir is not None:
                _remove_workdir(workdir)
    if report.get("private_tmp_refused"):  # nothing ran: run it again with a working directory on the host
        with _private_tmp_lock:
            if _private_tmp["works"] is not False:
                log.warning("the sandbox could not mount a private tmpfs on /tmp; jobs run in a directory on the "
                            "host from now on")
            _private_tmp["works"] = False                     # for good: a True set later never undoes it
        return _execute(job, cfg, user, connection, limits)
    if identity is not None and report.get("private_tmp") and _private_tmp["works"] is None:
        with _private_tmp_lock:
            if _private_tmp["works"] is None:
                _private_tmp["works"] = True
    if report.get("setup_error"):
        raise SandboxError(f"the sandbox could not be set up: {report['setup_error']}\n{stderr_tail}")
    status, error_type, detail = _classify(report, supervisor_stuck, exit_code, cfg)
    duration = report.get("duration_s", time.monotonic() - started)
    result = ExecResult(status, error_type, detail, round(float(duration), 4), stderr_tail, stdout_tail)
    return result, report


def _anonymous_file() -> int:
    """A descriptor of a new unnamed file in the temporary folder (``O_TMPFILE``; a named file
    unlinked at once where the file system lacks it)."""
    folder = tempfile.gettempdir()
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # EISDIR: a kernel without O_TMPFILE; EOPNOTSUPP: a file system without it; ...
        if exc.errno in (errno.ENOENT, errno.EACCES):
            raise
    fd, path = tempfile.mkstemp(dir=folder)
    os.unlink(path)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _run_supervisor(inherited: tuple[int, ...], out: int, err: int, workdir: str | None, cfg: SandboxConfig,
                    connection: forkserver.Connection | None = None) -> tuple[dict, bool, int | None]:
    """Start the supervisor, wait for it, kill its process group, reap it; (report, stuck, exit code).

    ``out`` and ``err`` are the descriptors of the job's stdout and stderr files; ``workdir`` the job's
    directory on the host (None: the supervisor starts in ``/`` and mounts the private tmpfs on
    ``/tmp``); ``inherited[0]`` is the payload; the supervisor also keeps the uid lock's descriptor, if
    any, open
    until it exits. The exit code is None when the fork server was lost before it could tell.
    """
    report_r, report_w = os.pipe()
    try:
        if connection is not None:
            return _run_forked_supervisor(connection, inherited, out, err, workdir, cfg, report_r, report_w)
        try:
            proc = subprocess.Popen(
                _child_command(inherited[0], report_w), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=workdir or "/", env=_child_env(workdir or "/tmp"), start_new_session=True, close_fds=True,
                pass_fds=(*inherited, report_w),
            )
        finally:
            os.close(report_w)
        stuck = not _wait_exited(proc.pid, cfg.timeout_s + SUPERVISOR_GRACE_S)
        # The supervisor is still unreaped here, so its pid (= the group id) cannot have been reused.
        _kill_group(proc.pid)
        exit_code = proc.wait()
        return _read_report(report_r, writers_closed=not stuck), stuck, exit_code
    finally:
        os.close(report_r)


def _run_forked_supervisor(connection: forkserver.Connection, inherited: tuple[int, ...], out: int, err: int,
                           workdir: str | None,
                           cfg: SandboxConfig, report_r: int, report_w: int) -> tuple[dict, bool, int | None]:
    """The same through the fork server, which forks the supervisor, kills its group and reaps it."""
    fds = (inherited[0], out, err, report_w, *inherited[1:])
    argv = [CHILD_PATH, str(inherited[0]), str(report_w), PROCESS_TAG]
    try:
        exit_code, stuck = connection.run(workdir or "/", _child_env(workdir or "/tmp"), argv, fds,
                                          cfg.timeout_s + SUPERVISOR_GRACE_S, cfg.timeout_s + 2 * SUPERVISOR_GRACE_S)
    except ServerGone:
        # The supervisor, if it started, still reports through its pipe and exits by its own deadline;
        # without a report the job is started again on a new server (see Sandbox.run_once).
        os.close(report_w)
        report_w = -1
        stuck = not _wait_closed(report_r, cfg.timeout_s + SUPERVISOR_GRACE_S)
        report = _read_report(report_r, writers_closed=not stuck)
        if not report:
            raise
        return report, stuck, None
    finally:
        if report_w >= 0:
            os.close(report_w)
    return _read_report(report_r, writers_closed=not stuck), stuck, exit_code


def _wait_closed(fd: int, timeout: float) -> bool:
    """Wait until every writer of pipe ``fd`` has closed it (without reading); False on timeout."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLHUP)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if any(events & select.POLLHUP for _fd, events in poller.poll(remaining * 1000)):
            return True


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


def _read_report(fd: int, writers_closed: bool = True) -> dict:
    """The supervisor's report (a marshal dump of a dict; only trusted code writes the pipe), or {} when
    it wrote none or garbage.

    ``writers_closed``: every process that held the pipe's write end has exited (the supervisor was
    reaped; no other process keeps it), so reading until the end of the stream cannot block;
    otherwise only what is there now is read."""
    if not writers_closed:
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
        report = marshal.loads(bytes(data))
    except (ValueError, EOFError, TypeError, MemoryError):
        return {}
    return report if isinstance(report, dict) else {}


def _tail(fd: int, limit: int) -> str:
    """The last ``limit`` bytes of file ``fd``, decoded."""
    size = os.fstat(fd).st_size
    if not size:
        return ""
    return os.pread(fd, limit, max(0, size - limit)).decode("utf-8", errors="replace")


def _remove_workdir(path: str) -> None:
    """Delete a job's working directory: an empty directory where the private tmpfs covered it."""
    try:
        os.rmdir(path)
    except OSError:
        _remove_tree(path)


def _remove_tree(path: str) -> None:
    """Delete a working directory, also when the program took permissions away inside it (non-root runs)."""
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


# --------------------------------------------------------------------------- outcomes

def _classify(report: dict, supervisor_stuck: bool, exit_code: int | None, cfg: SandboxConfig) -> tuple[str, str | None, str]:
    """(status, error_type, detail) from the supervisor's report."""
    if not report:
        if supervisor_stuck:
            return "timeout", None, f"the sandbox supervisor did not finish within {cfg.timeout_s + SUPERVISOR_GRACE_S:g} s"
        return "error", "sandbox", f"the sandbox supervisor ended without a report ({_describe_exit(exit_code)})"
    if report.get("result"):
        status, error_type, detail = report["result"]
        return status, error_type or None, detail
    if report.get("timed_out"):
        return "timeout", None, _wall_detail(cfg.timeout_s)
    worker_exit = report.get("exit_code", 0)
    if worker_exit == -signal.SIGXCPU:
        return "timeout", None, _cpu_detail(cfg.cpu_time_s)
    if worker_exit < 0:
        return "error", "signal", _signal_name(-worker_exit)
    if worker_exit == child.EXIT_RESULT_LOST:
        return "error", "exit", "the program closed the harness's result pipe; its tests could not report"
    return "error", "exit", f"the program {_describe_exit(worker_exit)} before its tests finished"


def _wall_clock_timeout(result: ExecResult, report: dict) -> bool:
    """A timeout that load on the machine can cause (not the CPU-time limit, which load does not consume)."""
    return result.status == "timeout" and (not report or bool(report.get("timed_out")))


def _cpu_timeout(report: dict) -> bool:
    return bool(report) and not report.get("result") and not report.get("timed_out") \
        and report.get("exit_code") == -signal.SIGXCPU


def _load_may_decide(result: ExecResult, report: dict, cfg: SandboxConfig, beside_limits: bool) -> bool:
    """Whether an attempt's outcome may depend on load, so that only a run alone decides the label: a
    wall-clock timeout, or (with the raised limits of a job beside others) any outcome but the raised CPU-time
    limit that ran past ``timeout_s`` or used more than ``cpu_time_s`` of CPU."""
    if _wall_clock_timeout(result, report):
        return True
    if not beside_limits or not report or _cpu_timeout(report):
        return False
    cpu = report.get("cpu_s")
    return report.get("duration_s", 0.0) > cfg.timeout_s or (cpu is not None and cpu > cfg.cpu_time_s)


def _timeout_alone(result: ExecResult, report: dict, cfg: SandboxConfig) -> ExecResult:
    """The label of an attempt with raised limits that ran alone (no other job of the pool beside it) past a
    limit of ``cfg``: the timeout the plain limits give."""
    if result.status == "timeout":            # a wall-clock timeout or a stuck supervisor: as it is
        return result
    cpu = report.get("cpu_s") if report else None
    if cpu is not None and cpu > cfg.cpu_time_s and report.get("duration_s", 0.0) <= cfg.timeout_s:
        detail = _cpu_detail(cfg.cpu_time_s)
    else:
        detail = _wall_detail(cfg.timeout_s)
    return dataclasses.replace(result, status="timeout", error_type=None, detail=detail)


def _cpu_detail(cpu_time_s: int) -> str:
    return f"CPU time limit of {cpu_time_s} s exceeded (SIGXCPU)"


def _wall_detail(timeout_s: float) -> str:
    return f"wall-clock limit of {timeout_s:g} s exceeded"


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "the fork server was lost, so its exit status is unknown"
    return f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
