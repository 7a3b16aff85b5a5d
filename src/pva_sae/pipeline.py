"""`pva-sae run`: every stage that exists, in order, on one config (by default the embedded model).

Each stage is skipped when its ``.done`` marker is present in the run directory, so rerunning an
interrupted pipeline continues where it stopped.
"""

from __future__ import annotations

import time

from .config import Config


def run_pipeline(cfg: Config, progress: bool = True) -> list[str]:
    """Run the stages; return human-readable summary lines (where the results are)."""
    from .build import build_dataset
    from .rundir import RunDir

    run = RunDir.at(cfg.output.run_dir)
    lines = []
    started = time.perf_counter()
    records = build_dataset(cfg, progress=progress)
    n_pass = sum(r["passed"] for r in records)
    lines.append(f"build: {len(records)} samples, {n_pass} passed ({n_pass / max(len(records), 1):.1%}) "
                 f"-> {run.datasets}")
    lines.append(f"finished in {time.perf_counter() - started:.0f} s; results in {run.root}")
    return lines
