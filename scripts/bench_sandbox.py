"""Sandbox throughput: MBPP reference solutions per second, fork server against a new interpreter per program.

Every program is distinct: each repeat appends a comment naming the repeat (``# repeat 2``), and the
label cache is off, so every job really runs. For each start method (``forkserver``, ``spawn``) and
each worker count (1, 2, 4, ..., all cores and twice that) one long-lived :class:`~pva_sae.execution.sandbox.Sandbox`
is made and warmed (a few jobs), then all ``tasks x repeats`` jobs go through it in one ``map``;
programs/s is jobs over that wall-clock time, and ``programs_per_s_first_99pct`` the first 99% of the jobs over
the time they took (a few programs that run for seconds alone can set a whole pass's wall time while the other
workers idle: that figure is the pool's throughput); ``cpu_ms_per_program`` is the CPU time (user + system) of
the caller and of every sandbox process per job, pool start and warm-up included, which does not
depend on what else loads the machine (kernel work done outside these processes is not in it).
``worker_wall_ms_per_program`` is the wall-clock time of the worker processes (fork to exit: the
program, its tests and the worker's own setup), summed over jobs, per job, and ``slowest_program``
names the longest: MBPP task 123's reference solution runs for about 2 s of CPU, so in the first 150
tasks it alone adds some 14 ms per program, and one worker runs it while the others finish the rest. With ``--cache`` the last line measures a pass served
entirely from a label cache. With ``--namespaces`` it first times each namespace step a supervisor
takes (fork + the step + exit, in 1 and in ``cores`` concurrent loops, as root): a step whose rate does
not grow with the loops is serialised in the kernel. Writes ``docs/bench_sandbox_<device>_<date>.json`` and prints a table::

    python scripts/bench_sandbox.py --device cpu2 --repeats 1 --tasks 200 --workers 1,2
    python scripts/bench_sandbox.py --device h200 --repeats 3          # all 974 tasks, 1 .. 2 x cores
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pva_sae
from pva_sae.config import SandboxConfig
from pva_sae.execution.label_cache import LabelCache, label_environment
from pva_sae.execution.sandbox import ExecJob, Sandbox, probe

MBPP_PATH = Path(pva_sae.__file__).parent / "assets" / "mbpp" / "mbpp.jsonl"
DOCS = Path(__file__).resolve().parents[1] / "docs"
WARMUP_JOBS = 4
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
NAMESPACE_STEPS = ("fork only", "new network", "setns network", "new ipc", "new mount + tmpfs", "new pid + pid 1")


def reference_jobs(n_tasks: int | None, repeats: int) -> list[ExecJob]:
    with open(MBPP_PATH, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][:n_tasks]
    return [ExecJob((row["task_id"], repeat), f"{row['code']}\n# repeat {repeat}\n", tuple(row["test_list"]),
                    row.get("test_setup_code") or "") for repeat in range(repeats) for row in rows]


def worker_counts(spec: str | None) -> list[int]:
    cores = os.cpu_count() or 1
    if spec:
        return [int(w) for w in spec.split(",")]
    counts, w = [], 1
    while w < cores:
        counts.append(w)
        w *= 2
    return counts + [cores, 2 * cores]  # a job mostly waits on its processes: more workers than cores can help


def cpu_s() -> float:
    """CPU time of this process and of every descendant reaped so far (user + system)."""
    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime


def namespace_step(libc, step: str, held_net: int, scratch: bytes) -> int:
    """In a forked process: one supervisor namespace step; 0 when it worked."""
    if step == "new network":
        return libc.unshare(CLONE_NEWNET)
    if step == "setns network":
        return libc.setns(held_net, CLONE_NEWNET)
    if step == "new ipc":
        return libc.unshare(CLONE_NEWIPC)
    if step == "new mount + tmpfs":
        if libc.unshare(CLONE_NEWNS) or libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None):
            return 1
        if libc.mount(b"tmpfs", scratch, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=16m"):
            return 1
        return libc.mount(scratch, b"/tmp", None, MS_BIND, None)
    if step == "new pid + pid 1":
        if libc.unshare(CLONE_NEWPID):
            return 1
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        return os.waitpid(pid, 0)[1]
    return 0


def namespace_costs(loops: int, repeats: int) -> list[dict]:
    """Rate and CPU time of fork + each namespace step + exit, in 1 and in ``cores`` concurrent loops."""
    libc = ctypes.CDLL(None, use_errno=True)
    scratch = tempfile.mkdtemp(prefix="pva-bench-ns-")
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    if libc.unshare(CLONE_NEWNET):
        raise SystemExit("--namespaces needs root (unshare(CLONE_NEWNET) was refused)")
    held = os.open("/proc/self/ns/net", os.O_RDONLY)  # the namespace "setns network" enters
    if libc.setns(own, CLONE_NEWNET):
        raise SystemExit("could not return to this process's network namespace")
    os.close(own)
    rows = []
    for parallel in sorted({1, os.cpu_count() or 1}):
        for step in NAMESPACE_STEPS:
            before, started = cpu_s(), time.perf_counter()
            loopers = []
            for _ in range(parallel):
                looper = os.fork()
                if looper == 0:
                    code = 0
                    for _ in range(loops * repeats):
                        pid = os.fork()
                        if pid == 0:
                            os._exit(1 if namespace_step(libc, step, held, scratch.encode()) else 0)
                        code |= os.waitpid(pid, 0)[1]
                    os._exit(1 if code else 0)
                loopers.append(looper)
            failed = any(os.waitpid(looper, 0)[1] for looper in loopers)
            elapsed, jobs = time.perf_counter() - started, parallel * loops * repeats
            rows.append({"step": step, "parallel": parallel, "per_s": round(jobs / elapsed, 1), "failed": failed,
                         "cpu_ms": round(1000 * (cpu_s() - before) / jobs, 3)})
            print(f"{step:>18}  x{parallel:<3} {rows[-1]['per_s']:>9.1f}/s  {rows[-1]['cpu_ms']:.3f} CPU ms each"
                  f"{'  FAILED' if failed else ''}", flush=True)
    os.close(held)
    os.rmdir(scratch)
    return rows


def own_cpu_s(pid: int | None = None) -> float:
    """CPU time (user + system) of one process itself, without its children: this one by default."""
    if pid is None:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(jobs: list[ExecJob], cfg: SandboxConfig, workers: int, cache: LabelCache | None = None) -> dict:
    cpu_before, caller_before = cpu_s(), own_cpu_s()
    started = time.perf_counter()
    with Sandbox(cfg, workers=workers, cache=cache) as sandbox:
        ready = time.perf_counter()
        if cache is None:
            sandbox.map([dataclasses.replace(j, program=j.program + "# warm-up\n") for j in jobs[:WARMUP_JOBS]])
        server_pids = [server.pid for server in sandbox._servers if server is not None]
        server_before = sum(own_cpu_s(pid) for pid in server_pids)
        done: list[float] = []
        begin = time.perf_counter()
        results = sandbox.map(jobs, progress=lambda r: done.append(time.perf_counter()))
        elapsed = time.perf_counter() - begin
        # The caller (all its threads, one interpreter) and the fork servers: every job passes through both.
        server = sum(own_cpu_s(pid) for pid in server_pids) - server_before
    caller = own_cpu_s() - caller_before
    cpu = cpu_s() - cpu_before  # the pool is closed: its server and every supervisor are reaped
    statuses: dict[str, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    # The workers' wall-clock time (fork to exit: the program, its tests, the worker's own setup).
    worker_s = sorted(r.duration_s for r in results if not r.cached)
    slowest = max(results, key=lambda r: r.duration_s)
    # A few long programs (MBPP task 123 runs for seconds by itself) can set the whole pass's wall time while
    # every other worker idles; the rate until 99% of the programs were done shows the pool's throughput.
    done.sort()
    n99 = max(1, int(0.99 * len(done)))
    t99 = done[n99 - 1] - begin if done else elapsed
    return {"start_method": cfg.start_method, "workers": workers, "programs": len(jobs), "seconds": round(elapsed, 3),
            "programs_per_s": round(len(jobs) / elapsed, 1),
            "first_99pct_s": round(t99, 3), "programs_per_s_first_99pct": round(n99 / t99, 1) if t99 > 0 else None,
            "pool_start_s": round(ready - started, 3),
            "statuses": statuses, "cache_hits": sum(r.cached for r in results),
            "cpu_ms_per_program": round(1000 * cpu / len(jobs), 2),
            "caller_cpu_ms_per_program": round(1000 * caller / len(jobs), 3),
            "server_cpu_ms_per_program": round(1000 * server / len(jobs), 3),
            "worker_wall_ms_per_program": round(1000 * sum(worker_s) / len(jobs), 2),
            "worker_wall_ms_median": round(1000 * worker_s[len(worker_s) // 2], 2) if worker_s else 0.0,
            "slowest_program": {"key": repr(jobs[results.index(slowest)].key), "seconds": slowest.duration_s}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True, help="short machine name for the output file, e.g. h200")
    parser.add_argument("--tasks", type=int, default=None, help="first N MBPP tasks (default: all 974)")
    parser.add_argument("--repeats", type=int, default=3, help="distinct copies of each program")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default 1,2,4,...,all cores, 2 x cores)")
    parser.add_argument("--methods", default="forkserver,spawn")
    parser.add_argument("--cache", action="store_true", help="also time a pass served from the label cache")
    parser.add_argument("--namespaces", action="store_true", help="first time each namespace step (needs root)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    steps = namespace_costs(200, args.repeats) if args.namespaces else []

    load_before = os.getloadavg()
    jobs = reference_jobs(args.tasks, args.repeats)
    base = SandboxConfig(label_cache=False)
    runs = []
    for method in args.methods.split(","):
        cfg = dataclasses.replace(base, start_method=method)
        for workers in worker_counts(args.workers):
            runs.append(measure(jobs, cfg, workers))
            print(f"{method:>10}  workers {workers:>3}  {runs[-1]['programs_per_s']:>8.1f} programs/s  "
                  f"(first 99%: {runs[-1]['programs_per_s_first_99pct']}/s in {runs[-1]['first_99pct_s']} s; "
                  f"{runs[-1]['programs']} in {runs[-1]['seconds']} s; {runs[-1]['cpu_ms_per_program']} CPU ms each; "
                  f"caller {runs[-1]['caller_cpu_ms_per_program']}, server {runs[-1]['server_cpu_ms_per_program']}, "
                  f"worker wall {runs[-1]['worker_wall_ms_per_program']} ms (slowest "
                  f"{runs[-1]['slowest_program']['key']}: {runs[-1]['slowest_program']['seconds']:g} s); "
                  f"{runs[-1]['statuses']})", flush=True)
    if args.cache:
        folder = tempfile.mkdtemp(prefix="pva-bench-cache-")
        with LabelCache(Path(folder) / "labels.sqlite", label_environment(base)) as cache:
            workers = worker_counts(args.workers)[-1]
            measure(jobs, base, workers, cache)  # fills the cache
            runs.append({**measure(jobs, base, workers, cache), "start_method": "cache"})
            print(f"{'cache':>10}  workers {workers:>3}  {runs[-1]['programs_per_s']:>8.1f} programs/s", flush=True)
        shutil.rmtree(folder)
    date = datetime.date.today().isoformat()
    out = args.out or DOCS / f"bench_sandbox_{args.device}_{date}.json"
    report = {"device": args.device, "date": date, "cpu_count": os.cpu_count(), "python": sys.version,
              "platform": platform.platform(), "euid": os.geteuid(), "protections": probe(base),
              "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
              "tasks": args.tasks or len({j.key[0] for j in jobs}), "repeats": args.repeats, "namespace_steps": steps, "runs": runs}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
