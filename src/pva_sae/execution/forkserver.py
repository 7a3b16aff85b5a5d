"""The sandbox's fork server: a trusted process that forks a fresh supervisor for every job of its worker slots.

Starting a new interpreter for every program (``sandbox.start_method = "spawn"``) costs most of a
job's time: the interpreter starts, compiles ``child.py`` and imports what it needs. The fork server
does that once. A pool starts one server per group of worker slots (see sandbox.py).
:class:`ForkServer` (the caller's side, in this file too) starts this file by path with the same
interpreter, flags and environment as a spawned child::

    python -S -s -P .../pva_sae/execution/forkserver.py CONTROL_FD .../child.py pva-sandbox

The server loads ``child.py`` (without site, as the spawned child does), adds the builtins ``site``
would add, becomes a child subreaper and answers on ``CONTROL_FD``, one end of a ``SOCK_SEQPACKET``
socket pair whose other end the caller holds. It runs trusted code only and never a program: for
each job it **forks** a process, the supervisor, as pid 1 of a new pid namespace (the server
unshares one for that fork and enters its own again right after; where the kernel refuses, the
supervisor makes the namespace and its pid 1 as a spawned one does), which

1. starts a new session (``setsid``), restores the signal dispositions the server changed, puts the
   job's stdout and stderr files on descriptors 1 and 2 (stdin stays ``/dev/null``), closes every
   other descriptor but the job's payload, report pipe, uid lock and its slot's network namespace
   (the server's sockets included, so a program cannot reach the server), enters the job's working directory and replaces the whole
   environment by the job's;
2. then does exactly what a spawned supervisor does (:func:`child.run_supervisor`): namespaces,
   the worker that limits itself and drops to the job's uid after the fork, the watch, the kill of
   every descendant, the report; but it enters its connection's network namespace instead of making
   a new one, and, being pid 1 of the job's pid namespace, it is the namespace's reaper itself (no
   separate pid 1 is forked) and kills the namespace's other processes with ``kill(-1, SIGKILL)``.
   When it exits, for whatever reason, the kernel kills whatever is left in the namespace.

Each connection (a worker slot: it runs one job at a time) has a network namespace of its own,
made by the server on the connection's first job and held by a descriptor only; the server forks a
connection's next supervisor only after reaping the previous one. A supervisor exits with
``EXIT_NETWORK_USED`` when its job left something in the namespace (see
:func:`child.network_namespace_used`), and the server then discards the namespace, as it does when
a supervisor ends with any code but 0; the connection's next job gets a new one. Why this keeps jobs
apart is argued in sandbox.py's module docstring ("Network namespaces").

So every program still gets a process of its own, forked from a process that never ran a program:
whatever a program changes (``sys.modules``, builtins, globals, the working directory, signal
handlers, memory) dies with its process, and the next job is forked from the unchanged server. The
job's content (program, tests) reaches the supervisor through the payload descriptor, which only the
supervisor reads: the server never holds it. The interpreter state a program starts from is the
spawned child's: the same interpreter, flags (``-S -s -P``), ``PYTHONHASHSEED``, locale and import
path, the same modules imported (plus ``socket``; ``random`` is not imported, so each program's
``random`` is seeded afresh from ``os.urandom``).

Protocol (every message is one ``SOCK_SEQPACKET`` datagram, the data a marshal dump):

* server -> caller on the control socket, once: ``b"ready"``.
* caller -> server on the control socket: ``b"connect"`` with one descriptor, a socket of a new
  connection (a pool thread has one each; the server serves any number at once).
* caller -> server on a connection: a job, ``{"cwd", "env", "argv", "wait_s"}`` with the descriptors
  ``(payload, stdout, stderr, report, [uid lock])``; the server forks the supervisor and closes its
  own copies. A job sent while the connection's last one still runs is refused.
* server -> caller on that connection, once the supervisor has exited: ``{"exit_code", "stuck"}``.
  Before reaping it the server SIGKILLs the supervisor's process group (its pid cannot have been
  reused yet); a supervisor still alive ``wait_s`` after its start (stuck) is killed the same way and
  reported with ``stuck`` True. When a supervisor died abnormally, the server kills every process
  it adopted as subreaper (what that supervisor left), so nothing of a job outlives it.

The server exits when the control socket closes (the caller closed it or died) and every
supervisor it started has exited; the supervisors themselves stop when the caller dies (their report
pipe's reader is gone). This file imports only the standard library and never pva_sae; it does not
import ``threading``, ``random`` or ``subprocess``, so the interpreter a program inherits stays
close to a spawned one.
"""

# The server must survive anything one job does and answer every connection; its loop catches and
# reports what a single request raises.
# ruff: noqa: BLE001

import marshal
import os
import select
import signal
import socket
import sys
import time

READY = b"ready"


class ServerBroken(Exception):
    """The server can no longer fork supervisors correctly (it exits; its pool starts another)."""

CONNECT = b"connect"
MESSAGE_BYTES = 1 << 16
MAX_FDS = 8
# The caller waits this long for the server to load child.py and answer.
START_TIMEOUT_S = 30.0
# How long close() waits for the server to exit before killing it.
EXIT_TIMEOUT_S = 10.0
EXIT_SUPERVISOR_SETUP = 73
# A supervisor exits with this when its job left state in the slot's network namespace (not an error).
EXIT_NETWORK_USED = 74
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000


class ServerGone(OSError):
    """The fork server died or stopped answering; a new one can be started."""


# ---------------------------------------------------------------- caller side

class ForkServer:
    """The caller's handle on one fork server process (see the module docstring for the protocol).

    ``command`` is the interpreter and its flags; ``env`` the server's whole environment (the jobs'
    environments replace it in each supervisor). :meth:`connect` gives a :class:`Connection` per
    caller thread; :meth:`close` ends the server.
    """

    def __init__(self, command: list[str], child_path: str, tag: str, env: dict[str, str]):
        control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.set_inheritable(theirs.fileno(), True)
            argv = [*command, os.path.abspath(__file__), str(theirs.fileno()), child_path, tag]
            actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                       (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
            self.pid = os.posix_spawn(command[0], argv, env, file_actions=actions, setsid=True)
        finally:
            theirs.close()
        self._control = control
        self._exited = False
        if not _readable(control, START_TIMEOUT_S) or control.recv(MESSAGE_BYTES) != READY:
            self.close()
            raise ServerGone(f"the sandbox fork server ({' '.join(argv)}) did not start; its error, if any, is "
                             "on stderr")

    def connect(self) -> "Connection":
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            socket.send_fds(self._control, [CONNECT], [theirs.fileno()])
        except OSError as exc:
            ours.close()
            raise ServerGone(f"the sandbox fork server is gone ({exc})") from exc
        finally:
            theirs.close()
        return Connection(ours)

    def alive(self) -> bool:
        if self._exited:
            return False
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            done = self.pid
        self._exited = bool(done)
        return not self._exited

    def close(self, wait_s: float = EXIT_TIMEOUT_S) -> None:
        """Close the control socket and reap the server (it exits once its supervisors have); kill it
        when it has not exited after ``wait_s``."""
        self._control.close()
        deadline = time.monotonic() + wait_s
        while self.alive():
            if time.monotonic() >= deadline:
                _kill(self.pid)
                try:
                    os.waitpid(self.pid, 0)
                except ChildProcessError:
                    pass
                self._exited = True
                break
            time.sleep(0.002)


class Connection:
    """One caller thread's connection to the server: one job at a time."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def run(self, cwd: str, env: dict[str, str], argv: list[str], fds: tuple[int, ...], wait_s: float,
            answer_s: float) -> tuple[int, bool]:
        """Fork a supervisor for one job and wait until it has exited: (its exit code, whether it was stuck).

        ``fds`` are the payload, stdout, stderr and report descriptors and the uid lock's, if any; the
        server kills the supervisor ``wait_s`` after its start. Raises :class:`ServerGone` when no
        answer comes within ``answer_s``.
        """
        header = marshal.dumps({"cwd": cwd, "env": env, "argv": argv, "wait_s": float(wait_s)})
        try:
            socket.send_fds(self._sock, [header], list(fds))
            if not _readable(self._sock, answer_s):
                raise ServerGone(f"the sandbox fork server did not answer within {answer_s:g} s")
            answer = self._sock.recv(MESSAGE_BYTES)
        except ServerGone:
            raise
        except OSError as exc:
            raise ServerGone(f"the sandbox fork server is gone ({exc})") from exc
        if not answer:
            raise ServerGone("the sandbox fork server closed the connection")
        result = marshal.loads(answer)
        return int(result["exit_code"]), bool(result["stuck"])

    def close(self) -> None:
        self._sock.close()


def _readable(sock: socket.socket, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout_s * 1000))))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


# ---------------------------------------------------------------- server side

def main():
    if not getattr(sys.flags, "safe_path", False):  # Python 3.10 has no -P: drop this file's directory
        del sys.path[0]
    control_fd, child_path, tag = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    child = load_child(child_path)
    child.add_site_builtins()
    Server(child, socket.socket(fileno=control_fd), [child_path, "-", "-", tag]).serve()


def load_child(path):
    """child.py as a module object, compiled and run as the spawned interpreter would (not put in sys.modules)."""
    module = type(sys)("pva_sandbox_child")
    module.__file__ = path
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec", dont_inherit=True)
    exec(code, module.__dict__)  # noqa: S102  (trusted: the sandbox's own child module)
    return module


class Server:
    """The loop: accept connections, fork a supervisor per job, reap supervisors and answer."""

    def __init__(self, child, control, argv):
        self.child, self.control, self.argv = child, control, argv
        self.libc = child.load_libc()
        child.package_paths()  # found once here, not in every worker
        self.connections = {}  # fd -> socket
        self.jobs = {}  # supervisor pid -> [connection socket, deadline, stuck]
        self.busy = set()  # connection sockets with a running supervisor
        self.networks = {}  # connection socket -> descriptor of its slot's network namespace, or None
        # Restores the pid namespace of the server's children after each supervisor's fork.
        self.own_pids = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.poller = select.poll()

    def serve(self):
        self.child.prctl(self.libc, self.child.PR_SET_CHILD_SUBREAPER, 1)
        signal.signal(signal.SIGCHLD, _ignore)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.poller.register(self.control, select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)
        self.control.send(READY)
        accepting = True
        while accepting or self.jobs:
            for fd, _events in self.poller.poll(self.poll_timeout_ms()):
                if fd == self.wake_r:
                    _drain(self.wake_r)
                elif fd == self.control.fileno():
                    accepting = self.accept()
                elif fd in self.connections:
                    self.request(self.connections[fd])
            self.reap()
            self.kill_overdue()

    def poll_timeout_ms(self):
        if not self.jobs:
            return None
        first = min(deadline for _conn, deadline, _stuck in self.jobs.values())
        return max(0, int((first - time.monotonic()) * 1000) + 1)

    def accept(self):
        """A new connection; False when the control socket closed (no new connections, then exit)."""
        try:
            message, fds, _flags, _addr = socket.recv_fds(self.control, MESSAGE_BYTES, MAX_FDS)
        except OSError:
            message, fds = b"", []
        if not message:
            self.poller.unregister(self.control)
            return False
        if message != CONNECT or not fds:
            for fd in fds:
                os.close(fd)
            return True
        for fd in fds[1:]:
            os.close(fd)
        conn = socket.socket(fileno=fds[0])
        self.connections[conn.fileno()] = conn
        self.poller.register(conn, select.POLLIN)
        return True

    def request(self, conn):
        try:
            message, fds, _flags, _addr = socket.recv_fds(conn, MESSAGE_BYTES, MAX_FDS)
        except OSError:
            message, fds = b"", []
        if not message:
            self.poller.unregister(conn)
            del self.connections[conn.fileno()]
            self.drop_network(conn)
            conn.close()
            return
        try:
            if conn in self.busy:
                raise RuntimeError("a job of this connection is still running")
            job = marshal.loads(message)
            pid = self.fork_supervisor(job, fds, self.network_of(conn))
        except Exception as exc:
            self.answer(conn, {"exit_code": EXIT_SUPERVISOR_SETUP, "stuck": False, "error": repr(exc)})
            if isinstance(exc, ServerBroken):
                # Every later child would start in the wrong pid namespace: exit, so the pool starts a new server.
                raise SystemExit(1) from exc
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.busy.add(conn)
        self.jobs[pid] = [conn, time.monotonic() + job["wait_s"], False]

    def network_of(self, conn):
        """The descriptor of ``conn``'s network namespace (made on its first job), or None where the
        kernel refuses one (each supervisor then tries a new namespace of its own)."""
        if conn not in self.networks:
            self.networks[conn] = self.new_network()
        return self.networks[conn]

    def new_network(self):
        """A new network namespace, held by a descriptor only: the server enters it, opens it and
        returns to its own (it is single-threaded and opens no socket meanwhile)."""
        own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if self.libc.unshare(CLONE_NEWNET) != 0:
                return None
            fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            if self.libc.setns(own, CLONE_NEWNET) != 0:
                os.close(fd)
                raise OSError(self.child.ctypes.get_errno(), "the fork server could not return to its network namespace")
            return fd
        finally:
            os.close(own)

    def drop_network(self, conn):
        """Forget ``conn``'s network namespace: its next job gets a new one."""
        fd = self.networks.pop(conn, None)
        if fd is not None:
            os.close(fd)

    def fork_supervisor(self, job, fds, network):
        """Fork the supervisor as pid 1 of a new pid namespace (where the kernel allows one)."""
        pid_init = self.libc.unshare(CLONE_NEWPID) == 0
        try:
            pid = os.fork()
        except BaseException:
            if pid_init:
                self.restore_pid_namespace()
            raise
        if pid == 0:
            code = EXIT_SUPERVISOR_SETUP
            try:
                code = EXIT_NETWORK_USED if self.become_supervisor(job, fds, network, pid_init) else 0
            except BaseException as exc:
                self.report_setup_error(fds, exc)
            finally:
                os._exit(code)
        if pid_init:
            try:
                self.restore_pid_namespace()
            except OSError as exc:
                _kill(pid)  # reaped as a stray child: what it started is killed
                raise ServerBroken(str(exc)) from exc
        return pid

    def restore_pid_namespace(self):
        """Fork the next children into the server's own pid namespace again (undo ``unshare``)."""
        if self.libc.setns(self.own_pids, CLONE_NEWPID) != 0:
            raise OSError(self.child.ctypes.get_errno(), "the fork server could not return to its pid namespace")

    def report_setup_error(self, fds, exc):
        """Tell the caller (through the job's report pipe) why the supervisor could not start."""
        if len(fds) >= 4:
            try:
                error = {"setup_error": "fork server: " + self.child.describe(exc)}
                self.child.write_all(fds[3], marshal.dumps(error))
            except OSError:
                pass

    def become_supervisor(self, job, fds, network, pid_init):
        """In the forked process: the state a spawned supervisor starts in, then the supervisor's work.

        ``pid_init``: this process is pid 1 of a new pid namespace. Returns True when the job left
        state in the slot's network namespace ``network``."""
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        payload, out, err, report = fds[:4]
        os.dup2(out, 1)
        os.dup2(err, 2)
        self.child.close_fds_except({payload, report, *fds[4:], *([] if network is None else [network])})
        os.chdir(job["cwd"])
        set_environment(job["env"])
        sys.argv[:] = job["argv"] or self.argv
        return self.child.run_supervisor(payload, report, network, pid_init)

    def reap(self):
        """Reap every child that exited: a supervisor's group is killed first and its connection answered."""
        abnormal = False  # a supervisor died abnormally or an adopted process was reaped
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None or not info.si_pid:
                break
            job = self.jobs.pop(info.si_pid, None)
            if job is not None:
                _kill_group(info.si_pid)  # still unreaped: the group id cannot have been reused
            _, status = os.waitpid(info.si_pid, 0)
            if job is None:
                abnormal = True
                continue
            conn = job[0]
            self.busy.discard(conn)
            code = os.waitstatus_to_exitcode(status)
            if code == EXIT_NETWORK_USED:
                code = 0
                self.drop_network(conn)
            elif code != 0:  # what it left may still be dying: no later job enters that namespace
                abnormal = True
                self.drop_network(conn)
            self.answer(conn, {"exit_code": code, "stuck": job[2]})
        if abnormal:
            self.kill_adopted()

    def kill_adopted(self):
        """SIGKILL every process below this server that no running supervisor owns.

        They are what a supervisor that died abnormally left: as a subreaper the server adopted them.
        Their children, adopted in turn when they die, are found when they are reaped (see :meth:`reap`).
        """
        children = _children_map()
        stack = [pid for pid in children.get(os.getpid(), ()) if pid not in self.jobs]
        while stack:
            pid = stack.pop()
            _kill(pid)
            stack += children.get(pid, ())

    def kill_overdue(self):
        now = time.monotonic()
        for pid, job in self.jobs.items():
            if not job[2] and now >= job[1]:
                job[2] = True
                _kill_group(pid)

    def answer(self, conn, result):
        try:
            conn.send(marshal.dumps(result))
        except OSError:  # the caller's thread is gone
            pass


def set_environment(env):
    """Make ``os.environ`` (and the C environment) exactly ``env``, in its order.

    The server's own environment is a job's but for a value or two (it was made by the same
    function), so where the names and their order agree only the values that differ are set."""
    if list(os.environ) == list(env):
        for name, value in env.items():
            if os.environ[name] != value:
                os.environ[name] = value
    else:
        os.environ.clear()
        os.environ.update(env)


def _ignore(signum, frame):
    """SIGCHLD only wakes the loop (through the wakeup descriptor)."""


def _drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _children_map():
    """{parent pid: [child pids]} of every live (not zombie) process, from /proc."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(name))
    return children


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


if __name__ == "__main__":
    main()
