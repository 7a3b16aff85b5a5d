"""Check the sandbox on MBPP: every reference solution should pass, and broken copies of it should not.

1. All 974 reference solutions of the packaged MBPP run through ``pva_sae.execution.sandbox.run_jobs`` with
   their ``test_list`` and ``test_setup_code`` (the tests the pipeline labels with). Failures are
   listed with their reason; the three known ones are explained in :data:`KNOWN_FAILURES`.
2. Each passing reference is mutated mechanically (:data:`MUTATIONS`, via ``ast``, so every mutant is
   valid Python) and the mutants run too. A mutant that fails is "caught". A surviving mutant is
   behaviourally equivalent on the three tests (a flipped comparison in dead code, a constant that
   does not matter), not necessarily a fault of the harness; survivors are listed for inspection.
3. With ``--cross-check``, every reference and mutant also runs in plain CPython without the
   sandbox (``python -c program + setup + tests``), and the report counts the programs on which the
   two verdicts differ. MBPP references and their mutants are benign, which is what makes running
   them unsandboxed acceptable here.

Prints a Markdown report and writes it to ``--out`` (default ``docs/reference_solutions.md``)::

    python scripts/check_references.py [--out PATH] [--workers N] [--tasks N] [--cross-check]
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pva_sae
from pva_sae.config import SandboxConfig
from pva_sae.execution.sandbox import BatchStats, ExecJob, ExecResult, probe, run_jobs

MBPP_PATH = Path(pva_sae.__file__).parent / "assets" / "mbpp" / "mbpp.jsonl"

KNOWN_FAILURES = {
    341: "the test expects `tuple({12, 13, 14, 15, 16}) == (12, 13, 14, 15, 16)`, i.e. sorted set iteration; "
         "CPython iterates a set of small ints in hash-table slot order, which for this set gives "
         "(16, 12, 13, 14, 15), so the reference itself fails the third test",
    596: "the test hard-codes `sys.getsizeof` of tuples (104 and 88 bytes) measured on an older CPython; "
         "Python 3.11 tuples are 16 bytes smaller (88 and 72), so no correct program can pass",
    642: "the expected set literal fixes the element order inside each `tuple(set(sub))`, which follows "
         "set iteration order of tuples, i.e. tuple hashes; tuple hashing changed in Python 3.8, so the "
         "reference now builds ((3, 3), (5, 7)) where the test expects ((5, 7), (3, 3))",
}

NEGATED_COMPARISON = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}


class _ReturnNone(ast.NodeTransformer):
    """Every ``return <value>`` returns None instead: the function computes but never answers."""

    def __init__(self) -> None:
        self.changed = False

    def visit_Return(self, node: ast.Return) -> ast.Return:
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            self.changed = True
            return ast.copy_location(ast.Return(value=ast.Constant(None)), node)
        return node


class _NegateFirstComparison(ast.NodeTransformer):
    """The first comparison operator in source order becomes its negation (``<`` -> ``>=``, ``in`` -> ``not in``)."""

    def __init__(self) -> None:
        self.changed = False

    def visit_Compare(self, node: ast.Compare) -> ast.Compare:
        if not self.changed:
            node.ops[0] = NEGATED_COMPARISON[type(node.ops[0])]()
            self.changed = True
        return self.generic_visit(node)


class _OffByOne(ast.NodeTransformer):
    """The first integer literal in source order grows by one (``range(n)`` -> ``range(n)`` with n+1, ``[0]`` -> ``[1]``)."""

    def __init__(self) -> None:
        self.changed = False

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        if not self.changed and type(node.value) is int:
            self.changed = True
            return ast.copy_location(ast.Constant(node.value + 1), node)
        return node


MUTATIONS: dict[str, Callable[[], ast.NodeTransformer]] = {
    "return None": _ReturnNone,
    "negate first comparison": _NegateFirstComparison,
    "first int literal + 1": _OffByOne,
}


def load_rows(path: Path = MBPP_PATH) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def reference_job(row: dict) -> ExecJob:
    return ExecJob(row["task_id"], row["code"], tuple(row["test_list"]), row.get("test_setup_code") or "")


def mutate(code: str, mutation: Callable[[], ast.NodeTransformer]) -> str | None:
    """The mutant's source, or None when the mutation does not apply to this program."""
    transformer = mutation()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))  # '\d' in MBPP's plain strings
        tree = transformer.visit(ast.parse(code))
    if not transformer.changed:
        return None
    return ast.unparse(ast.fix_missing_locations(tree))


def mutant_jobs(row: dict) -> list[ExecJob]:
    """One job per applicable mutation; key = (task_id, mutation name)."""
    jobs = []
    for name, mutation in MUTATIONS.items():
        program = mutate(row["code"], mutation)
        if program is not None:
            jobs.append(ExecJob((row["task_id"], name), program, tuple(row["test_list"]),
                                row.get("test_setup_code") or ""))
    return jobs


def timed_run(jobs: list[ExecJob], cfg: SandboxConfig, stats: BatchStats) -> tuple[list[ExecResult], float]:
    started = time.perf_counter()
    results = run_jobs(jobs, cfg, stats=stats)
    return results, time.perf_counter() - started


def plain_python_passes(job: ExecJob, timeout_s: float) -> bool:
    """The verdict of plain CPython, without the sandbox, on the same program, setup code and tests."""
    source = "\n".join([job.program, job.setup_code, *job.tests, "import os", "os._exit(42)"])
    with tempfile.TemporaryDirectory() as workdir:
        try:
            done = subprocess.run([sys.executable, "-c", source], capture_output=True, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL, cwd=workdir, check=False)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 42


def cross_check(jobs: list[ExecJob], results: list[ExecResult], cfg: SandboxConfig) -> list[tuple]:
    """(key, sandbox status, plain verdict) for every job whose two verdicts differ."""
    with ThreadPoolExecutor(max_workers=cfg.workers or os.cpu_count()) as pool:
        plain = list(pool.map(lambda job: plain_python_passes(job, cfg.timeout_s), jobs))
    return [(job.key, r.status, p) for job, r, p in zip(jobs, results, plain) if r.passed != p]


def python_version() -> str:
    out = subprocess.run([sys.executable, "--version"], capture_output=True, text=True, check=True)
    return (out.stdout or out.stderr).strip()


def reason(result: ExecResult) -> str:
    return f"{result.status}/{result.error_type or '-'}: {result.detail}"


def describe_protections(protections: dict[str, bool | str]) -> str:
    return ", ".join(f"{k}={({True: 'yes', False: 'no'}).get(v, v)}" for k, v in protections.items())


def report(rows, refs, ref_s, mutants, mut_results, mut_s, cfg, protections, stats, disagreements) -> str:
    passed = sum(r.passed for r in refs)
    workers = cfg.workers or os.cpu_count()
    lines = [
        "# MBPP reference solutions through the sandbox",
        "",
        (f"Generated by `python scripts/check_references.py` on {datetime.date.today().isoformat()}; "
         f"`python --version`: {python_version()}; {platform.machine()}, {os.cpu_count()} CPU cores, "
         f"{workers} sandbox workers, load average {os.getloadavg()[0]:.1f} at the end of the run. Protections "
         f"active: {describe_protections(protections)}. Wall-clock timeouts re-run alone after their batch: "
         f"{stats.reruns} ({stats.rerun_timeouts} timed out again)."),
        "",
        ("Each program runs in a fresh interpreter (program, then `test_setup_code`, then each assert of "
         "`test_list`); see `pva_sae/execution/sandbox.py`."),
        "",
        "## References",
        "",
        f"**{passed} / {len(refs)} pass** in {ref_s:.1f} s ({len(refs) / ref_s:.0f} programs/s).",
        "",
    ]
    for row, result in zip(rows, refs):
        if not result.passed:
            why = KNOWN_FAILURES.get(row["task_id"], "UNEXPECTED: investigate")
            lines.append(f"- task {row['task_id']}: {reason(result)}  \n  {why}.")
    unexplained = [r["task_id"] for r, res in zip(rows, refs) if not res.passed and r["task_id"] not in KNOWN_FAILURES]
    lines += ["", f"Unexplained failures: {unexplained or 'none'}.", "", "## Mutants", ""]
    lines.append(
        f"Mutants of the passing references: **{sum(not r.passed for r in mut_results)} / {len(mut_results)} "
        f"caught** (fail), in {mut_s:.1f} s. A surviving mutant behaves like the reference on the three tests "
        "(dead or irrelevant code), which the mutation cannot know."
    )
    lines += ["", "| mutation | mutants | caught | survived |", "|---|---:|---:|---:|"]
    for name in MUTATIONS:
        these = [r for job, r in zip(mutants, mut_results) if job.key[1] == name]
        caught = sum(not r.passed for r in these)
        lines.append(f"| {name} | {len(these)} | {caught} | {len(these) - caught} |")
    lines += ["", "Surviving mutants, by task id:", ""]
    for name in MUTATIONS:
        survivors = [str(job.key[0]) for job, r in zip(mutants, mut_results) if r.passed and job.key[1] == name]
        lines.append(f"- {name} ({len(survivors)}): {', '.join(survivors) or 'none'}")
    errors = {}
    for r in mut_results:
        if not r.passed:
            errors[r.error_type or r.status] = errors.get(r.error_type or r.status, 0) + 1
    lines += ["", "How caught mutants fail: " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) + ".", ""]
    if disagreements is not None:
        lines += ["## Cross-check with plain CPython", "",
                  (f"Programs whose sandbox verdict differs from plain CPython's: **{len(disagreements)} of "
                   f"{len(refs) + len(mut_results)}** (references and mutants)."), ""]
        lines += [f"- {key}: sandbox {status}, plain {'pass' if plain else 'fail'}" for key, status, plain in disagreements]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/reference_solutions.md", help="where to write the Markdown report")
    p.add_argument("--workers", type=int, default=0, help="sandbox workers (0 = one per CPU core)")
    p.add_argument("--tasks", type=int, default=None, help="only the first N tasks (quick look)")
    p.add_argument("--cross-check", action="store_true",
                   help="also run every program in plain CPython and compare the verdicts")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    cfg = SandboxConfig(workers=args.workers)
    rows = load_rows()[: args.tasks]
    protections = probe(cfg)
    stats = BatchStats()
    refs, ref_s = timed_run([reference_job(row) for row in rows], cfg, stats)
    mutants = [job for row, res in zip(rows, refs) if res.passed for job in mutant_jobs(row)]
    mut_results, mut_s = timed_run(mutants, cfg, stats)
    jobs = [reference_job(row) for row in rows] + mutants
    disagreements = cross_check(jobs, refs + mut_results, cfg) if args.cross_check else None
    text = report(rows, refs, ref_s, mutants, mut_results, mut_s, cfg, protections, stats, disagreements)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    unexplained = [r for r, res in zip(rows, refs) if not res.passed and r["task_id"] not in KNOWN_FAILURES]
    return 1 if unexplained or disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
