"""Calibrate the steering statistics (pva_sae.stats.causal) by simulation and publish the tables.

Runs ``pva_sae.stats.calibration.run_calibration``: every design x mean flip rate x potency model x
scenario (typical-direction null, average-of-controls null, two stronger targets) and the baseline
family, ``--reps`` replications per cell. Prints the two tables, writes every cell to
``docs/statistics_calibration.json`` and replaces the two tables in ``docs/statistics.md`` (between
the ``<!-- calibration:table-N -->`` markers). Deterministic given ``--seed``.

Usage: ``OMP_NUM_THREADS=1 python scripts/calibrate_stats.py [--seed 0] [--reps 2000] [--quick]``.
The full run takes a few minutes on one core; ``--quick`` runs 200 replications and writes nothing
unless ``--write`` is given.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import scipy

from pva_sae.stats import calibration as cal

ROOT = Path(__file__).resolve().parents[1]
TABLE_MARKERS = {1: "calibration:table-1", 2: "calibration:table-2"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=None, help="replications per cell (default 2000; 200 with --quick)")
    p.add_argument("--quick", action="store_true", help="200 replications, nothing written unless --write")
    p.add_argument("--write", action="store_true", help="write the JSON and the docs tables even with --quick")
    p.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples per replication")
    p.add_argument("--n-signflips", type=int, default=1000, help="sign flips of the naive sign-flip test")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "statistics_calibration.json")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "statistics.md")
    p.add_argument("--progress", action="store_true", help="print one line per finished cell to stderr")
    return p.parse_args(argv)


def replace_between_markers(text: str, marker: str, body: str) -> str:
    """Replace what lies between ``<!-- marker -->`` and ``<!-- /marker -->``; ValueError if absent."""
    pattern = re.compile(rf"(<!-- {re.escape(marker)} -->).*?(<!-- /{re.escape(marker)} -->)", re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{marker!r} markers not found")
    return pattern.sub(lambda m: f"{m.group(1)}\n{body}\n{m.group(2)}", text, count=1)


def run_header(results: dict) -> str:
    return (f"Seed {results['seed']}, {results['reps']} replications per cell, {results['n_resamples']} bootstrap "
            f"resamples, exact permutation distribution; `python scripts/calibrate_stats.py --seed "
            f"{results['seed']} --reps {results['reps']}` (numpy {np.__version__}, scipy {scipy.__version__}).")


def _rounded(x):
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reps = args.reps or (200 if args.quick else 2000)
    progress = (lambda s: print(s, file=sys.stderr, flush=True)) if args.progress else None
    start = time.perf_counter()
    results = cal.run_calibration(reps=reps, seed=args.seed, n_resamples=args.n_resamples,
                                  n_signflips=args.n_signflips, progress=progress)
    summary = cal.summarise(results)
    elapsed = time.perf_counter() - start
    tables = {1: cal.reported_table(summary), 2: cal.other_table(summary)}
    header = run_header(results)
    print(header, "\n\nTable 1: reported tests under their own null\n", tables[1],
          "\n\nTable 2: other nulls, variants and legacy tests\n", tables[2], sep="")
    failing = [r["test"] for r in summary["reported"] if not r["within_bound"]]
    print(f"\n{len(results['cells'])} cells in {elapsed:.0f} s; reported tests outside their bounds: "
          f"{', '.join(failing) or 'none'}")
    if args.quick and not args.write:
        return 1 if failing else 0
    args.json.write_text(json.dumps(_rounded({**results, "summary": summary}), indent=1) + "\n")
    text = args.docs.read_text()
    for i, body in tables.items():
        text = replace_between_markers(text, TABLE_MARKERS[i], f"{header}\n\n{body}")
    args.docs.write_text(text)
    print(f"wrote {args.json} and the tables in {args.docs}")
    return 1 if failing else 0


if __name__ == "__main__":
    raise SystemExit(main())
