"""Time a whole study stage by stage: build, analyze, validate, steer, report.

    python scripts/bench_study.py --run-dir runs/bench --size full [--model pva-tiny] [--set KEY=VALUE ...]
    python scripts/bench_study.py --run-dir runs/bench --size default --json docs/bench_study.json

``--size default`` is the model's registered config defaults (for the embedded default: the CPU-sized
study of `pva-sae run`); ``--size full`` lifts them to the study sizes the config defaults give a real
model (all validation tasks x 3 samples at every temperature, the 6-point alpha grid, 60 controls per
direction, every task steered). Prints and writes each stage's wall time, samples generated,
samples/s and the device, with versions and the date.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

FULL = ["validation.robustness_max_tasks=0", "validation.samples_per_temperature=3", "steering.max_tasks=0",
        "steering.tuning_max_tasks=0", "steering.n_controls=60", "steering.tuning_controls=4",
        "steering.alpha_grid=[0.05, 0.1, 0.2, 0.5, 1.0, 2.0]", "steering.n_permutations=10000",
        "steering.bootstrap_resamples=2000"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--model", default="pva-tiny")
    p.add_argument("--size", choices=("default", "full"), default="full")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--json", help="write the timings here")
    p.add_argument("--stages", default="build,analyze,validate,steer,report")
    args = p.parse_args(argv)

    import torch

    from pva_sae.model.registry import resolve_for_model
    from pva_sae.rundir.atomic import read_json
    from pva_sae.rundir.paths import RunDir
    from pva_sae.stages.analyze import analyze
    from pva_sae.stages.build import build_dataset
    from pva_sae.stages.report import write_report
    from pva_sae.stages.steer import steer
    from pva_sae.stages.validate import validate

    items = [f"model.name={args.model}", f"output.run_dir={args.run_dir}", "checkpoint.resume=auto"]
    items += (FULL if args.size == "full" else []) + args.overrides
    cfg = resolve_for_model(None, items)
    run = RunDir.at(args.run_dir)
    stages = {"build": lambda: build_dataset(cfg, interactive=False, progress=False),
              "analyze": lambda: analyze(cfg, progress=False), "validate": lambda: validate(cfg, progress=False),
              "steer": lambda: steer(cfg, progress=False), "report": lambda: write_report(run.root)}
    out = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "size": args.size, "overrides": items,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
           "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}, "stages": {}}
    started = time.perf_counter()
    for name in args.stages.split(","):
        t0 = time.perf_counter()
        result = stages[name]()
        seconds = time.perf_counter() - t0
        row = {"seconds": round(seconds, 1)}
        if name == "build":
            row["samples"] = len(result)
        elif name == "validate":
            row["samples"] = sum(t["n_samples"] for t in result["temperature"].values()
                                 if not t["source"].startswith("build"))
        elif name == "steer":
            row["samples"] = result["tasks"]["generated"]
            row["controls_per_direction"] = cfg.steering.n_controls
        if row.get("samples"):
            row["samples_per_s"] = round(row["samples"] / seconds, 1)
        out["stages"][name] = row
        print(f"{name:9s} {seconds:8.1f} s  {row.get('samples', '')}", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    if "steer" in out["stages"]:
        res = read_json(run.root / "steering" / "results.json")
        out["steering_summary"] = {n: {"rate": e["rate"], "rank_p": e["rank_p"]["p"],
                                       "permutation_p": e["permutation_p"]["p"], "holm_p": e["holm_p"]}
                                   for n, e in res["experiments"].items()}
    print(f"total     {out['total_seconds']:8.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
