"""The sandbox's child process: a supervisor that isolates one job and a worker that runs it.

:mod:`pva_sae.execution.sandbox` runs this file by path, with the base interpreter and without
site-packages::

    python -S -s -P .../pva_sae/execution/child.py PAYLOAD_FD REPORT_FD pva-sandbox

or, with the fork server (``sandbox.start_method = "forkserver"``), loaded once by
:mod:`pva_sae.execution.forkserver`, which forks a fresh process per job and calls
:func:`run_supervisor` in it.

The design (processes, namespaces, uid, the pass channel) is described in sandbox.py's module
docstring; this is the code it describes. The file imports only the standard library and never
pva_sae, which the child's interpreter cannot import. Importing it defines names and nothing else,
so its pure helpers can be tested in-process; :func:`main` runs only when it is the script.

The supervisor runs trusted code with the caller's privileges. The worker limits itself, drops to
the job's uid, then runs the program and its tests in this interpreter (see "The test harness").
"""

# The harness catches whatever the program raises (BaseException included: SystemExit, and exception
# classes of the program's own) and ignores failed best-effort writes once the program may have broken
# its streams; running the program with exec is the purpose of this module.
# ruff: noqa: BLE001, S110

import builtins
import ctypes
import errno
import marshal
import os
import resource
import select
import signal
import site
import sys
import time

# Every function below resolves built-in names (exec, isinstance, AssertionError...) in this private
# copy: a function looks them up in the `__builtins__` of the module it was defined in. A program
# that patches `builtins.exec` therefore changes what it calls, never what the harness calls.
__builtins__ = dict(vars(builtins))
# The worker calls these after the program ran; bound now, so that patching `os` cannot reach them.
_exit, _getpid, _write = os._exit, os.getpid, os.write
_STREAMS = (sys.__stdout__, sys.__stderr__)

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
# /proc/<pid>/net files read to tell whether a job left anything in its network namespace. The
# sockstat files count the namespace's sockets (the per-protocol tables /proc/net/tcp... would walk the
# host's whole hash tables: a millisecond each). The others are empty in a new namespace: one header
# line, or (NET_LISTS) nothing at all while the loopback interface is down.
NET_COUNTS = ("sockstat", "sockstat6")
NET_COUNTERS = (b"used", b"inuse", b"tw")  # per namespace; sockstat's other numbers are the host's
NET_TABLES = ("unix", "ip6_flowlabel", "fib_trie", "if_inet6")
NET_LISTS = ("fib_trie", "if_inet6")
SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
RESULT_BUFFER = 65536
# Above every descriptor a process can hold (descriptors are C ints).
MAX_FD = 2**31 - 1
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
LIBC_FUNCTIONS = ("prctl", "unshare", "setns", "mount")
_LOADED = {"libc": None, "packages": None}


def main():
    if not getattr(sys.flags, "safe_path", False):  # Python 3.10 has no -P: drop this file's directory
        del sys.path[0]
    add_site_builtins()
    run_supervisor(int(sys.argv[1]), int(sys.argv[2]))


def run_supervisor(payload_fd, report_fd, network_fd=None, pid_init=False):
    """Read the job, supervise it, write the report for the caller.

    The whole life of a supervisor after start-up, the same whether this file is the script of a new
    interpreter (:func:`main`) or was loaded by the fork server, which forks a process per job and
    calls this in it (see :mod:`pva_sae.execution.forkserver`). ``network_fd`` (fork server only) is
    the worker slot's network namespace, entered instead of a new one. ``pid_init`` (fork server
    only): this process is pid 1 of a new pid namespace already, so it is the namespace's reaper
    itself and forks no separate pid 1. Returns True when the job left state in the slot's network
    namespace (see :func:`network_namespace_used`): it must not be entered again.
    """
    with os.fdopen(payload_fd, "rb") as f:
        job = marshal.loads(f.read())
    report = supervise(job, report_fd, network_fd, pid_init)
    try:
        write_all(report_fd, marshal.dumps(report))
    except BrokenPipeError:  # the caller is gone
        pass
    return bool(report.get("network_used"))


def add_site_builtins():
    """exit, quit, help, copyright...: what the site module adds to the builtins (-S skips it)."""
    site.setquit()
    site.setcopyright()
    site.sethelper()


def write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


# ---------------------------------------------------------------- supervisor

def supervise(job, report_fd, network_fd=None, pid_init=False):
    """Isolate, fork the worker, watch it, kill everything it left; return the report for the caller.

    With ``network_fd`` (a worker slot's network namespace) the report's ``network_used`` says
    whether the job left anything in it, checked once every process of the job is dead. With
    ``pid_init`` this process is pid 1 of the job's pid namespace (see :func:`run_supervisor`).
    """
    report = {"drops_privileges": job["uid"] is not None, "private_tmp": False, "no_network": False,
              "network_namespace": "none", "private_ipc": False, "pid_namespace": False}
    try:
        libc = load_libc()
        prctl(libc, PR_SET_CHILD_SUBREAPER, 1)
        if job["uid"] is not None:
            path_fds = isolate(libc, job, report, network_fd, pid_init)
        else:
            path_fds = {}
            report["pid_namespace"] = pid_init
            if network_fd is not None:
                os.close(network_fd)
        if not (job["host_dir"] or report["private_tmp"]):
            # No directory on the host to run the program in: the caller runs the job again with one.
            report["private_tmp_refused"] = True
            return report
        init_pid = start_namespace_init(libc) if report["pid_namespace"] and not pid_init else None
        nonce = os.urandom(16).hex().encode()
        result_r, result_w = os.pipe()
    except Exception as exc:
        report["setup_error"] = describe(exc)
        return report
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            close_fds_except({result_w, *path_fds.values()})
            worker(job, libc, nonce, result_w, path_fds)
        finally:
            _exit(EXIT_HARNESS_BUG)
    os.close(result_w)
    for fd in path_fds.values():
        os.close(fd)
    worker_pid = own_pid(pid) if init_pid is not None else pid
    ended, status, data, cpu_s = watch(pid, result_r, report_fd, started + job["timeout_s"])
    report["duration_s"] = time.monotonic() - started
    report["cpu_s"] = cpu_s
    if init_pid is not None:
        # Killing pid 1 kills every process of the namespace. Its exit completes once all of them are
        # reaped, those whose parent is this process (the worker; a clone with CLONE_PARENT) by us.
        os.kill(init_pid, signal.SIGKILL)
        reap_children()
    elif pid_init and os.getpid() == 1:
        # As pid 1 of the namespace, kill(-1) reaches every other process in it (and in any pid
        # namespace below it), and nothing outside; as its reaper, this process then reaps them all.
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:  # no process is left
            pass
        reap_children()
    kill_descendants()
    if report["network_namespace"] == "per worker slot":
        report["network_used"] = network_namespace_used()
    report["timed_out"] = ended == "timeout"
    report["caller_gone"] = ended == "caller_gone"
    report["exit_code"] = os.waitstatus_to_exitcode(status)
    result = accepted_result(data, nonce, worker_pid)
    if result and result[0] == "setup_error":
        report["setup_error"] = result[2]
    elif result and ended == "exited":
        report["result"] = result
    return report


def isolate(libc, job, report, network_fd=None, pid_init=False):
    """As root: enter new network, IPC, mount and pid namespaces (where the kernel allows them).

    With ``network_fd`` the network namespace is the worker slot's (entered with ``setns``; a new one
    only if that fails), otherwise a new one. With ``pid_init`` this process is in a new pid namespace
    already (its pid 1) and unshares none. Returns descriptors of the import path's directories,
    opened in the new mount namespace before the private tmpfs hides /tmp (an interpreter installed
    there stays reachable through them).
    """
    if network_fd is not None and libc.setns(network_fd, CLONE_NEWNET) == 0:
        report["no_network"], report["network_namespace"] = True, "per worker slot"
    else:
        report["no_network"] = libc.unshare(CLONE_NEWNET) == 0
        report["network_namespace"] = "per job" if report["no_network"] else "none"
    if network_fd is not None:
        os.close(network_fd)
    report["private_ipc"] = libc.unshare(CLONE_NEWIPC) == 0
    own_mounts = enter_mount_namespace(libc)
    path_fds = open_path_dirs()
    report["private_tmp"] = own_mounts and make_private_tmp(libc, job)
    # Only the children forked from now on are in a new pid namespace; this process stays outside
    # (unless it is pid 1 of one already: pid_init).
    report["pid_namespace"] = pid_init or libc.unshare(CLONE_NEWPID) == 0
    return path_fds


def read_file(path):
    """The whole content of a (small, /proc) file, with plain system calls."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def network_namespace_used():
    """Whether this process's network namespace holds anything a job can leave in it.

    Read from ``/proc/thread-self/net`` once every process of the job is dead: any socket a process
    made in it (``sockets: used``, which counts every family: unix, abstract or not, TCP, UDP, raw,
    ping, netlink, packet), a TCP socket in any state (``inuse``) or in TIME_WAIT (``tw``), a unix
    socket, an IPv6 flow label, or an address or route (loopback up). A fresh namespace has none of
    them. A socket that outlives its processes (one passed over a unix socket in a cycle, until the
    kernel's garbage collector frees it) is found too.
    """
    for name in NET_COUNTS:
        try:
            fields = read_file(f"/proc/thread-self/net/{name}").split()
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
        if any(fields[i] in NET_COUNTERS and fields[i + 1] != b"0" for i in range(len(fields) - 1)):
            return True
    for name in NET_TABLES:
        try:
            lines = read_file(f"/proc/thread-self/net/{name}").splitlines()
        except FileNotFoundError:
            continue
        if any(line.strip() for line in lines[0 if name in NET_LISTS else 1:]):
            return True
    return False


def load_libc():
    """The C library with the functions the supervisor calls resolved; loaded once per process (the
    fork server loads it before forking, so its supervisors inherit it)."""
    if _LOADED["libc"] is None:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in LIBC_FUNCTIONS:
            getattr(libc, name)
        _LOADED["libc"] = libc
    return _LOADED["libc"]


def prctl(libc, option, value):
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def mount(libc, source, target, fstype, flags, data=None):
    def encode(s):
        return None if s is None else s.encode()

    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"mount {target}: {os.strerror(number)}")


def enter_mount_namespace(libc):
    """A private mount namespace: nothing mounted in it reaches the caller's. False if refused."""
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    try:
        mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    except OSError:
        return False
    return True


def make_private_tmp(libc, job):
    """Give the program a private, size-limited tmpfs as its directory and as every shared scratch directory.

    The tmpfs is mounted on the job's directory on the host (the working directory), or on ``/tmp``
    itself when the job has none (``host_dir`` False). Returns False (and changes nothing visible)
    when the tmpfs cannot be mounted.
    """
    workdir = os.getcwd() if job["host_dir"] else "/tmp"
    options = f"size={job['tmpfs_mb']}m,mode=0700,uid={job['uid']},gid={job['gid']}"
    try:
        mount(libc, "tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, options)
    except OSError:
        return False
    os.chdir(workdir)
    for path in SHARED_DIRS:
        if path != workdir and os.path.isdir(path):
            mount(libc, ".", path, None, MS_BIND)
    try:
        mount(libc, None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    except OSError:
        pass
    os.chdir("/tmp")
    os.environ["HOME"] = os.environ["TMPDIR"] = "/tmp"
    return True


def start_namespace_init(libc):
    """Fork pid 1 of the new pid namespace and return its pid once it is ready.

    It only reaps the orphans of the namespace. When it dies (SIGKILL from the supervisor, or
    PR_SET_PDEATHSIG when the supervisor dies), the kernel kills every process of the namespace.
    The worker is forked after it, as pid 2, so the program gets ordinary signal semantics (pid 1
    of a namespace ignores signals it has no handler for).
    """
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            close_fds_except({ready_w})
            prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
            os.write(ready_w, b"1")  # EPIPE if the supervisor died before PR_SET_PDEATHSIG took effect
            os.close(ready_w)
            reap_forever()
        finally:
            os._exit(0)
    os.close(ready_w)
    ready = os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    if not ready:
        raise OSError("pid 1 of the job's pid namespace did not start")
    return pid


def reap_forever():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # blocked, so it waits in sigtimedwait
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        signal.sigtimedwait({signal.SIGCHLD}, 60)


def reap_children():
    """Wait for every child of this process to exit (all are dying: they are in a killed namespace)."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def own_pid(pid):
    """The pid that process ``pid`` sees for itself: the last NSpid entry (its own pid namespace)."""
    for line in read_file(f"/proc/{pid}/status").splitlines():
        if line.startswith(b"NSpid:"):
            return int(line.split()[-1])
    return pid


def close_fds_except(keep):
    """Close every inherited descriptor above stderr but those in ``keep``.

    The gaps between the kept descriptors go with one ``close_range`` system call each; where the
    kernel or C library lacks it, every open descriptor listed in ``/proc/self/fd`` is closed one by
    one (never a loop over the whole descriptor space)."""
    libc = load_libc()
    close_range = getattr(libc, "close_range", None)
    low, ranges = 3, []
    for fd in sorted(fd for fd in keep if fd >= low):
        if fd > low:
            ranges.append((low, fd - 1))
        low = fd + 1
    ranges.append((low, MAX_FD))
    if close_range is not None and all(close_range(a, b, 0) == 0 for a, b in ranges):
        return
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def watch(pid, result_r, report_fd, deadline):
    """Wait for the worker until the deadline, collecting what it writes to the result pipe.

    Meanwhile reaps every other child as soon as it exits: the orphans of the job this process
    adopted (as subreaper, or as pid 1 of the job's pid namespace), so that they do not count
    against the job's RLIMIT_NPROC as zombies. Stops early when the caller is gone (its end of the
    report pipe closed). Returns (how it ended: 'exited', 'timeout' or 'caller_gone'; the worker's
    wait status; the collected bytes; the worker's CPU time in seconds, user + system, from wait4).
    """
    os.set_blocking(result_r, False)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    # SIGCHLD wakes the poll below through this pipe (the worker was forked before the handler is set).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, _wake)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    poller = select.poll()
    poller.register(result_r, select.POLLIN)
    poller.register(report_fd, 0)  # POLLERR only: the caller closed the read end
    poller.register(wake_r, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    data = bytearray()
    reading = True
    ended = "exited"
    usage = None
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        reap_others(pid)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            ended = "timeout"
        if ended != "exited":
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            break
        wait_s = remaining if pidfd is not None else min(remaining, 0.005)
        for fd, _events in poller.poll(max(1, int(wait_s * 1000) + 1)):
            if fd == result_r:
                reading = read_some(result_r, data)
                if not reading:
                    poller.unregister(result_r)
            elif fd == report_fd:
                ended = "caller_gone"
            elif fd == wake_r:
                drain(wake_r)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.close(wake_r)
    os.close(wake_w)
    while reading:
        reading = read_some(result_r, data, stop_when_empty=True)
    if pidfd is not None:
        os.close(pidfd)
    cpu_s = usage.ru_utime + usage.ru_stime if usage is not None else None
    return ended, status, data, cpu_s


def _wake(signum, frame):
    """SIGCHLD only wakes the watch (through the wakeup descriptor)."""


def drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


REAP_PER_PASS = 64


def reap_others(worker):
    """Reap children that have exited, except the worker (whose status the watch collects): at most
    ``REAP_PER_PASS`` per call, so a job making orphans fast cannot keep the watch from its deadline."""
    for _ in range(REAP_PER_PASS):
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or not info.si_pid or info.si_pid == worker:
            return
        os.waitpid(info.si_pid, 0)


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

    As a subreaper this process inherits every orphan below it (in a pid namespace, the namespace's
    pid 1 does), so once it has no children at all, no descendant exists. Processes forked while a
    sweep runs are caught by the next one.
    """
    me = int(os.readlink("/proc/self"))  # the host's pid (os.getpid() is 1 for a namespace's pid 1)
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        for pid in descendants(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.001)


def descendants(root):
    """Pids below ``root``, from /proc (the host's: pids as this process sees them)."""
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

def worker(job, libc, nonce, result_w, path_fds):
    """Limit this process, drop privileges, run the program and its tests, report, exit."""
    try:
        set_limits(job["limits"])
        if job["uid"] is not None:
            drop_privileges(job["uid"], job["gid"])
        prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
        reach_path_dirs(path_fds)
    except BaseException as exc:
        emit(result_w, nonce, ("setup_error", "", describe(exc)))
        _exit(EXIT_WORKER_SETUP)
    outcome = run_tests(job)
    emit(result_w, nonce, outcome)
    for stream in _STREAMS:
        try:
            stream.flush()
        except BaseException:
            pass
    _exit(0)


def open_path_dirs():
    """Descriptors of the import path's directories, opened while they are still readable."""
    fds = {}
    for entry in sys.path:
        if entry not in fds and os.path.isdir(entry):
            fds[entry] = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
    return fds


def reach_path_dirs(fds):
    """Replace import-path entries the sandbox user cannot reach by their open descriptors.

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
    for path in package_paths():
        path[:] = [relocate(entry, moved) for entry in path]


def package_paths():
    """The ``__path__`` lists of the imported packages.

    Found once per set of imported modules: the fork server finds them before it forks, so that
    each worker touches only these few lists rather than every module (each page a forked process
    writes to is copied for it)."""
    found = _LOADED["packages"]
    if found is None or found[0] != len(sys.modules):
        paths = [getattr(module, "__dict__", {}).get("__path__") for module in list(sys.modules.values())]
        found = _LOADED["packages"] = (len(sys.modules), [path for path in paths if isinstance(path, list)])
    return found[1]


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
    line = b" ".join([nonce, str(_getpid()).encode(), status.encode(), (error_type or "-").encode(),
                      detail.encode("utf-8", "replace").hex().encode()]) + b"\n"
    try:
        while line:
            line = line[_write(fd, line):]
    except OSError:
        _exit(EXIT_RESULT_LOST)


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
            exec(code, namespace)  # noqa: S102
        except BaseException as exc:
            show_traceback(exc, sources)
            return outcome_of(exc, label, sources)
    return "passed", "", ""


def fresh_main():
    """A new __main__ module for the program, so that `import __main__` and pickling see the program.

    The program gets a builtins module of its own, a copy, as its `__builtins__` and as what
    `import builtins` returns: a program that patches it sees its patch, as in plain CPython, and the
    harness, which resolves built-in names in its private copy, does not.
    """
    module = type(sys)("__main__")
    own_builtins = type(sys)("builtins")
    own_builtins.__dict__.update(vars(builtins))
    module.__dict__["__builtins__"] = own_builtins
    sys.modules["builtins"] = own_builtins
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
    """The ERROR_TYPES name of an exception, through its class hierarchy; 'runtime' for any other."""
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
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
        for stream in _STREAMS:
            stream.flush()
    except BaseException:
        pass
    try:
        _write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


if __name__ == "__main__":
    main()
