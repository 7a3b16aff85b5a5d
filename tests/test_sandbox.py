"""The sandbox on normal and hostile programs.

Every test also checks (autouse fixture) that the job left nothing behind: no process below this
test process, and an empty scratch temp directory. Hostile programs print the pid of every process
they create, and the test checks that each one is gone: that catches processes that left their
process group and were reparented away from this process.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import random
import resource
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pva_sae.config import ConfigError, SandboxConfig
from pva_sae.execution.sandbox import ERROR_TYPES, PROCESS_TAG, STATUSES, ExecJob, probe, run_job, run_jobs

CFG = SandboxConfig(timeout_s=2.0, cpu_time_s=5, memory_limit_mb=512, output_limit_kb=16, max_processes=16)
GOOD = "def f(x):\n    return x + 1\n"
TESTS = ("assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 1")
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="switching to the sandbox user needs root")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def protections():
    return probe(CFG)


@pytest.fixture(autouse=True)
def leaves_nothing_behind(tmp_path, monkeypatch):
    """Jobs get their temp files from a private scratch directory, which must be empty afterwards."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    yield scratch
    assert descendants(os.getpid()) == []
    assert list(scratch.iterdir()) == []


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(b")") + 2:].split()[1]), []).append(int(name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            found += [child]
            stack.append(child)
    return found


def alive_sandbox_process(pid: int) -> bool:
    """True if ``pid`` exists and is still a sandbox process (guards against pid reuse)."""
    try:
        return PROCESS_TAG.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def printed_pids(result) -> list[int]:
    return [int(tok) for tok in result.stdout_tail.split() if tok.isdigit()]


def run(program: str, tests=TESTS, setup: str = "", cfg: SandboxConfig = CFG):
    result = run_job(ExecJob("k", program, tuple(tests), setup), cfg)
    assert result.status in STATUSES
    assert result.error_type is None or result.error_type in ERROR_TYPES
    assert (result.error_type is not None) == (result.status == "error")
    return result


# --------------------------------------------------------------------------- normal programs

def test_pass():
    result = run(GOOD)
    assert result.passed and result.detail == "" and result.duration_s < CFG.timeout_s


def test_failed_assert_names_the_test():
    result = run("def f(x):\n    return x + 1 if x else 0\n")
    assert (result.status, result.error_type) == ("failed", None)
    assert result.detail == "test 3 failed: assert f(0) == 1"
    assert "test 3 failed" in result.stderr_tail


@pytest.mark.parametrize("program, error_type", [
    ("def f(x)\n    return x\n", "syntax"),
    ("def f(x):\n  return x\n    + 1\n", "syntax"),
    ("def f(x):\n    return y\n", "name"),
    ("def f(x):\n    return x + 'a'\n", "type"),
    ("def f(x):\n    return int('a')\n", "value"),
    ("def f(x):\n    return [][x]\n", "index"),
    ("def f(x):\n    return {}[x]\n", "key"),
    ("def f(x):\n    return x.nope\n", "attribute"),
    ("import no_such_module_pva\n", "import"),
    ("def f(x):\n    return 1 // (x - x)\n", "zero_division"),
    ("def f(x):\n    raise RuntimeError('boom')\n", "runtime"),
])
def test_errors_are_classified(program, error_type):
    result = run(program)
    assert (result.status, result.error_type) == ("error", error_type)
    assert result.stderr_tail.strip()


def test_syntax_error_in_a_test_is_reported_before_anything_runs():
    result = run("print('ran')\n" + GOOD, tests=("assert f(1) == 2", "assert f(2) = 3"))
    assert (result.status, result.error_type) == ("error", "syntax") and result.detail.startswith("test 2")
    assert "ran" not in result.stdout_tail


@pytest.mark.parametrize("program", [
    "assert 1 == 2, 'self-check'\n" + GOOD,
    "def f(x):\n    assert x > 0\n    return x + 1\n",
])
def test_assertion_error_from_program_code_is_a_runtime_error(program):
    result = run(program)
    assert (result.status, result.error_type) == ("error", "runtime") and "AssertionError" in result.detail


def test_setup_code_runs_after_the_program_and_before_the_tests():
    program = "class Node:\n    def __init__(self, v):\n        self.v = v\ndef f(n):\n    return n.v + 1\n"
    setup = "root = Node(1)\nroot2 = Node(2)"
    assert run(program, tests=("assert f(root) == 2", "assert f(root2) == 3"), setup=setup).passed


def test_program_runs_as_main():
    program = "import __main__\nif __name__ == '__main__':\n    MAIN = __main__.__dict__ is globals()\n" + GOOD
    assert run(program, tests=("assert MAIN",)).passed


def test_string_hashing_is_deterministic():
    program = "print(hash('pva-sae'), list({'a', 'b', 'c', 'd'}))\n" + GOOD
    first, second = run(program), run(program)
    assert first.passed and first.stdout_tail == second.stdout_tail


def test_stdlib_imports_work_after_the_user_switch():
    program = ("import decimal, statistics, heapq, json, ctypes.util\n"
               "print(b'\\xe9'.decode('latin-1'), 'x'.encode('idna'), statistics.mean([1, 2]))\n" + GOOD)
    result = run(program)
    assert result.passed, result.stderr_tail


@needs_root
def test_runs_as_the_sandbox_user_with_a_minimal_environment():
    nobody = pwd.getpwnam(CFG.sandbox_user)
    program = ("import os\nUIDS = (os.getuid(), os.geteuid(), os.getgid(), os.getgroups())\n"
               "KEYS = sorted(os.environ)\n" + GOOD)
    allowed = {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE",
               "PYTHONIOENCODING", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}
    tests = (f"assert UIDS == ({nobody.pw_uid}, {nobody.pw_uid}, {nobody.pw_gid}, [])",
             f"assert set(KEYS) <= {allowed!r}")
    result = run(program, tests=tests)
    assert result.passed, result.detail


def test_probe_reports_the_protections(protections):
    assert set(protections) == {"drops_privileges", "private_tmp", "no_network"}
    assert protections["drops_privileges"] == IS_ROOT


# --------------------------------------------------------------------------- hostile programs

def test_infinite_loop_times_out():
    started = time.monotonic()
    result = run("while True:\n    pass\n" + GOOD)
    assert (result.status, result.error_type) == ("timeout", None)
    assert CFG.timeout_s <= result.duration_s < CFG.timeout_s + 1
    assert time.monotonic() - started < CFG.timeout_s + 3


def test_cpu_time_limit_is_a_timeout():
    cfg = SandboxConfig(timeout_s=10, cpu_time_s=1)
    result = run("while True:\n    pass\n", cfg=cfg)
    assert result.status == "timeout" and "CPU" in result.detail
    assert result.duration_s < 5


@pytest.mark.parametrize("program", [
    "x = bytearray(64 * 1024**3)\n",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10**6))\n",
])
def test_memory_bomb_is_a_memory_error(program):
    cfg = SandboxConfig(timeout_s=10, memory_limit_mb=256)
    result = run(program + GOOD, cfg=cfg)
    assert (result.status, result.error_type) == ("error", "memory")


def test_fork_bomb_is_contained():
    program = "import os\nwhile True:\n    os.fork()\n    print(os.getpid(), flush=True)\n"
    result = run(program + GOOD)
    assert not result.passed
    assert not [pid for pid in printed_pids(result) if alive_sandbox_process(pid)]


def test_persistent_fork_bomb_with_escaping_children_leaves_no_survivor():
    program = ("import os, time\n"
               "for _ in range(200):\n"
               "    try:\n"
               "        if os.fork() == 0:\n"
               "            os.setsid()\n"
               "            print(os.getpid(), flush=True)\n"
               "            if os.fork() == 0:\n"
               "                print(os.getpid(), flush=True)\n"
               "            time.sleep(600)\n"
               "    except OSError:\n"
               "        time.sleep(0.01)\n"
               "time.sleep(600)\n")
    result = run(program + GOOD)
    assert result.status == "timeout"
    pids = printed_pids(result)
    assert len(pids) > 3
    assert not [pid for pid in pids if alive_sandbox_process(pid)]


@needs_root
def test_process_limit_binds():
    program = ("import os, time\nMADE = 0\nfor _ in range(64):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(600)\n    MADE += 1\n")
    result = run(program, tests=(f"assert 0 < MADE < {CFG.max_processes}",))
    assert result.passed, result.detail


def test_detached_child_does_not_outlive_a_passing_job():
    program = ("import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    time.sleep(600)\n"
               "while os.getsid(pid) != pid:\n    time.sleep(0.01)\nprint(pid, flush=True)\n" + GOOD)
    result = run(program)
    assert result.passed
    assert len(printed_pids(result)) == 1 and not alive_sandbox_process(printed_pids(result)[0])


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n" + GOOD,
    "import os\nos._exit(0)\n" + GOOD,
    "raise SystemExit\n" + GOOD,
    "exit()\n" + GOOD,
    GOOD + "import sys\ndef f(x):\n    sys.exit(0)\n",
])
def test_exiting_before_the_tests_finish_is_not_a_pass(program):
    result = run(program)
    assert (result.status, result.error_type) == ("error", "exit")


def test_faking_the_result_channel_is_not_a_pass():
    program = ("import os\nfor fd in range(3, 64):\n    for line in (b'passed\\n', b'0 0 passed - \\n'):\n"
               "        try:\n            os.write(fd, line)\n        except OSError:\n            pass\n"
               "print('passed')\nos._exit(0)\n")
    result = run(program + GOOD)
    assert (result.status, result.error_type) == ("error", "exit")


def test_a_forked_copy_finishing_the_tests_is_not_a_pass():
    program = "import os, time\nif os.fork():\n    os._exit(0)\ntime.sleep(0.3)\n" + GOOD
    result = run(program)
    assert (result.status, result.error_type) == ("error", "exit")


def test_input_sees_a_closed_stdin():
    result = run("name = input()\n" + GOOD)
    assert (result.status, result.error_type) == ("error", "eof")


@needs_root
def test_files_outside_the_working_directory_are_out_of_reach(tmp_path, protections):
    canary = Path(f"/tmp/pva_canary_{uuid.uuid4().hex}")
    canary.write_text("keep")
    canary.chmod(0o644)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    created = Path(f"/tmp/pva_canary_{uuid.uuid4().hex}_new")
    attempts = [f"os.remove({str(canary)!r})", f"open({str(canary)!r}, 'w').write('gone')",
                f"open({str(created)!r}, 'w').write('x')", f"open({str(private / 'x')!r}, 'w').write('x')",
                f"open({str(REPO / 'pva_canary')!r}, 'w').write('x')", "open('/root/pva_canary', 'w').write('x')",
                f"os.chmod({str(REPO)!r}, 0o777)"]
    program = "import os\nDONE = []\n" + "".join(
        f"try:\n    {attempt}\n    DONE.append({attempt!r})\nexcept OSError:\n    pass\n" for attempt in attempts)
    program += "open('scratch.txt', 'w').write('mine')\nos.makedirs('a/b')\nos.chmod('a', 0)\n" + GOOD
    try:
        result = run(program, tests=TESTS)
        assert result.passed, result.detail
        assert canary.read_text() == "keep"
        assert not (private / "x").exists() and not (REPO / "pva_canary").exists()
        assert not Path("/root/pva_canary").exists()
        assert (REPO.stat().st_mode & 0o777) != 0o777
        if protections["private_tmp"]:
            assert not created.exists()
    finally:
        canary.unlink()
        created.unlink(missing_ok=True)


@pytest.mark.parametrize("program", [
    "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "import os\nwhile True:\n    os.write(2, b'e' * 65536)\n",
    "f = open('big.bin', 'wb')\nwhile True:\n    f.write(b'x' * 65536)\n",
])
def test_huge_output_is_capped(program):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run(program + GOOD)
    assert (result.status, result.error_type) == ("error", "output_limit")
    assert len(result.stdout_tail.encode()) <= CFG.output_limit_kb * 1024
    assert len(result.stderr_tail.encode()) <= 2048
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB


def test_moderate_output_is_kept_and_does_not_fail_the_program():
    result = run("for i in range(20000):\n    print(i)\n" + GOOD)
    assert result.passed
    assert result.stdout_tail.endswith("19999\n") and len(result.stdout_tail) <= CFG.output_limit_kb * 1024


def test_killing_its_parent_fails():
    program = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    if IS_ROOT:
        program += f"os.kill({os.getpid()}, signal.SIGKILL)\n"
    result = run(program + GOOD)
    assert not result.passed
    if IS_ROOT:
        assert (result.error_type, "PermissionError") == ("runtime", result.detail.split(":")[1].strip())


def test_recursion_bomb():
    result = run("def g(n):\n    return g(n + 1)\ng(0)\n" + GOOD)
    assert (result.status, result.error_type) == ("error", "recursion")


def test_segfault_is_reported_as_a_signal():
    result = run("import ctypes\nctypes.string_at(0)\n" + GOOD)
    assert (result.status, result.error_type, result.detail) == ("error", "signal", "SIGSEGV")


def test_no_network(protections):
    if not protections["no_network"]:
        pytest.skip("no network namespace on this machine")
    program = ("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    NET = True\n"
               "except OSError:\n    NET = False\n" + GOOD)
    assert run(program, tests=("assert not NET",)).passed


# --------------------------------------------------------------------------- configuration and batches

@needs_root
def test_missing_sandbox_user_is_a_clear_error():
    with pytest.raises(ConfigError, match="does not exist on this machine"):
        run_job(ExecJob("k", GOOD, TESTS), SandboxConfig(sandbox_user="pva_no_such_user_xyz"))


@pytest.mark.parametrize("field, value", [("timeout_s", 0), ("memory_limit_mb", -1), ("workers", -1)])
def test_bad_limits_are_rejected(field, value):
    with pytest.raises(ConfigError, match=f"sandbox.{field}"):
        run_jobs([ExecJob("k", GOOD, TESTS)], SandboxConfig(**{field: value}))


def test_run_jobs_keeps_order_calls_progress_and_runs_in_parallel():
    sleep = "import time\ntime.sleep(0.6)\n"
    jobs = [ExecJob(i, sleep + (GOOD if i % 2 else "def f(x):\n    return 0\n"), TESTS) for i in range(4)]
    seen = []
    started = time.monotonic()
    results = run_jobs(jobs, SandboxConfig(timeout_s=5, workers=4), progress=seen.append)
    assert time.monotonic() - started < 4 * 0.6
    assert [r.passed for r in results] == [False, True, False, True]
    assert sorted(map(id, seen)) == sorted(map(id, results))
    assert run_jobs([], CFG) == []


# --------------------------------------------------------------------------- MBPP references

def load_reference_checker():
    spec = importlib.util.spec_from_file_location("check_references", REPO / "scripts" / "check_references.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_reference_sample_passes_and_mutants_get_the_plain_python_verdict():
    """60 seeded MBPP tasks: references pass; each mutant's verdict equals plain CPython's; return-None mutants fail."""
    checker = load_reference_checker()
    rows = [row for row in checker.load_rows() if row["task_id"] not in checker.KNOWN_FAILURES]
    sample = random.Random(0).sample(rows, 60)
    references = [checker.reference_job(row) for row in sample]
    mutants = [job for row in sample for job in checker.mutant_jobs(row)]
    cfg = SandboxConfig(timeout_s=3)
    results = run_jobs(references + mutants, cfg)
    reference_results, mutant_results = results[:len(references)], results[len(references):]
    assert [job.key for job, r in zip(references, reference_results) if not r.passed] == []
    assert all(not r.passed for job, r in zip(mutants, mutant_results) if job.key[1] == "return None")
    assert checker.cross_check(mutants, mutant_results, cfg) == []
    assert sum(not r.passed for r in mutant_results) > 0.8 * len(mutants)
