"""Time a whole study stage by stage: build, analyze, validate, steer, report.

    python scripts/bench_study.py --run-dir runs/bench --size full [--model pva-tiny] [--set KEY=VALUE ...]
    python scripts/bench_study.py --run-dir runs/bench --size default --json docs/bench_study.json

``--size default`` is the model's registered config defaults (for the embedded default: the CPU-sized
study of `pva-sae run`); ``--size full`` lifts them to the study sizes the config defaults give a real
model (all validation tasks x 3 samples at every temperature, the 6-point alpha grid, 60 controls per
direction, every task steered). The stages share one loaded model, as in `pva-sae run`.

Per stage it reports: wall time; samples generated and samples/s; the time inside generation calls
(each ends by copying its tokens to the host, so it is device time plus the host's share) as a fraction
of the wall time; the GPU's own busy fraction (mean of ``nvidia-smi`` utilization sampled every 100 ms,
the share of time a kernel was running); the time inside sandbox labelling and the programs labelled
per second of it (with overlap, labelling runs beside generation, so the two fractions can add up to
more than 1). Written as JSON with the device, versions and date. With ``--profile DIR`` each stage also
runs under cProfile: ``DIR/<stage>.pstats`` (for ``python -m pstats`` or snakeviz) and the stage's 25
functions of largest cumulative time in the JSON (where the wall time goes: a host wait on the device,
such as ``Tensor.cpu``, absorbs the GPU time queued before it).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

FULL = ["validation.robustness_max_tasks=0", "validation.samples_per_temperature=3", "steering.max_tasks=0",
        "steering.tuning_max_tasks=0", "steering.n_controls=60", "steering.tuning_controls=4",
        "steering.alpha_grid=[0.05, 0.1, 0.2, 0.5, 1.0, 2.0]", "steering.n_permutations=10000",
        "steering.bootstrap_resamples=2000"]


class Meter:
    """Wall time and call counts of the functions it wraps, read per stage as differences."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.items: dict[str, int] = {}
        self.lock = threading.Lock()

    def wrap(self, name: str, fn, count, tally=None):
        """``fn`` timed under ``name``, counting ``count(args, out)`` items; ``tally(out)``: more named counts."""
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            extra = tally(out) if tally is not None else {}
            with self.lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.items[name] = self.items.get(name, 0) + count(args, out)
                for key, n in extra.items():
                    self.items[key] = self.items.get(key, 0) + n
            return out
        return timed

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        with self.lock:
            return dict(self.seconds), dict(self.items)


class GpuSampler:
    """``nvidia-smi`` utilization (percent of time a kernel ran, GPU 0) every ``interval_ms``, timestamped."""

    def __init__(self, interval_ms: int = 100):
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu",
                                          "--format=csv,noheader,nounits", f"-lms={interval_ms}"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip()) / 100))
            except ValueError:
                continue

    def busy(self, t0: float, t1: float) -> float | None:
        window = [u for t, u in self.samples if t0 <= t <= t1]
        return round(sum(window) / len(window), 3) if window else None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def instrument(meter: Meter) -> None:
    """Time every model load, generation call and sandbox labelling call of the stages."""
    import pva_sae.execution.dataset as dataset
    import pva_sae.model.registry as registry
    from pva_sae.execution.sandbox import Sandbox
    from pva_sae.model.generation import Generator

    registry.load_model = meter.wrap("load", registry.load_model, lambda args, out: 1)
    Generator.generate_batch = meter.wrap("generate", Generator.generate_batch, lambda args, out: len(out))
    Generator.generate_queue = meter.wrap("generate", Generator.generate_queue, lambda args, out: len(out))
    dataset.label_samples = meter.wrap("label", dataset.label_samples, lambda args, out: len(out))
    # The sandbox's own counts: programs run (not served by the label cache), timeouts among the labels, second
    # attempts alone, and the rounds alone (during which nothing else of the pool runs) with their wall time.
    Sandbox.map = meter.wrap("sandbox", Sandbox.map, lambda args, out: 0, tally=lambda out: {
        "sandbox_runs": sum(not r.cached for r in out), "sandbox_timeouts": sum(r.status == "timeout" for r in out),
        "sandbox_reruns": sum(r.attempts == 2 and not r.cached for r in out)})
    Sandbox._round = meter.wrap("rerun_round", Sandbox._round, lambda args, out: 1)


def stage_row(name: str, result, seconds: float, before, after, gpu_busy, cfg) -> dict:
    (s0, n0), (s1, n1) = before, after
    spent = {k: s1.get(k, 0.0) - s0.get(k, 0.0) for k in ("load", "generate", "label")}
    count = {k: n1.get(k, 0) - n0.get(k, 0) for k in ("generate", "label")}
    row = {"seconds": round(seconds, 2), "samples": count["generate"],
           "samples_per_s": round(count["generate"] / seconds, 1) if seconds > 0 else None,
           "model_load_s": round(spent["load"], 2),
           "generate_s": round(spent["generate"], 2),
           "generate_fraction": round(spent["generate"] / seconds, 3) if seconds > 0 else None,
           "gpu_busy_fraction": gpu_busy,
           "label_s": round(spent["label"], 2), "programs": count["label"],
           "programs_per_s": round(count["label"] / spent["label"], 1) if spent["label"] > 0 else None,
           "label_fraction": round(spent["label"] / seconds, 3) if seconds > 0 else None,
           "sandbox": {key: n1.get(f"sandbox_{key}", 0) - n0.get(f"sandbox_{key}", 0)
                       for key in ("runs", "timeouts", "reruns")},
           "rerun_rounds": n1.get("rerun_round", 0) - n0.get("rerun_round", 0),
           "rerun_rounds_s": round(s1.get("rerun_round", 0.0) - s0.get("rerun_round", 0.0), 2)}
    if name == "steer" and result is not None:
        row["controls_per_direction"] = cfg.steering.n_controls
        row["steered_generations"] = result["tasks"]["generated"]
    return row


def profile_top(profiler: cProfile.Profile, path: Path, n: int = 25) -> dict[str, list[str]]:
    """Save the stage's profile; its ``n`` functions of largest cumulative and of largest own time, one line each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(str(path))
    out = {}
    for order in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(n)
        lines = text.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
        out[order] = [" ".join(line.split()) for line in lines[start:] if line.strip()]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--model", default="pva-tiny")
    p.add_argument("--size", choices=("default", "full"), default="full")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--json", help="write the timings here")
    p.add_argument("--stages", default="build,analyze,validate,steer,report")
    p.add_argument("--progress", action="store_true", help="show the stages' progress bars")
    p.add_argument("--profile", help="run each stage under cProfile; write DIR/<stage>.pstats and the top in the JSON")
    args = p.parse_args(argv)

    import torch

    from pva_sae.model.registry import load_once, resolve_for_model
    from pva_sae.rundir.atomic import read_json
    from pva_sae.rundir.paths import RunDir
    from pva_sae.stages.analyze import analyze
    from pva_sae.stages.build import build_dataset
    from pva_sae.stages.report import write_report
    from pva_sae.stages.steer import steer
    from pva_sae.stages.validate import validate

    meter = Meter()
    instrument(meter)
    items = [f"model.name={args.model}", f"output.run_dir={args.run_dir}", "checkpoint.resume=auto"]
    items += (FULL if args.size == "full" else []) + args.overrides
    cfg = resolve_for_model(None, items)
    run = RunDir.at(args.run_dir)
    model = load_once(cfg.model)
    show = args.progress
    stages = {"build": lambda: build_dataset(cfg, interactive=False, progress=show, loaded=model),
              "analyze": lambda: analyze(cfg, progress=show, loaded=model),
              "validate": lambda: validate(cfg, progress=show, loaded=model),
              "steer": lambda: steer(cfg, progress=show, loaded=model), "report": lambda: write_report(run.root)}
    cuda = torch.cuda.is_available()
    out = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "size": args.size, "overrides": items,
           "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
           "versions": {"torch": torch.__version__, "python": sys.version.split()[0],
                        "cuda": torch.version.cuda if cuda else None},
           "settings": {"batch_size": cfg.generation.batch_size, "backend": cfg.generation.backend,
                        "overlap": cfg.generation.overlap, "sandbox_workers": cfg.sandbox.workers,
                        "compile": cfg.generation.compile},
           "stages": {}}
    gpu = GpuSampler()
    started = time.perf_counter()
    try:
        for name in args.stages.split(","):
            before, t0 = meter.snapshot(), time.perf_counter()
            profiler = cProfile.Profile() if args.profile else None
            try:
                result = profiler.runcall(stages[name]) if profiler else stages[name]()
            except BaseException as stop:    # an interrupted stage (Ctrl+C, timeout -s INT) still gets its row
                t1 = time.perf_counter()
                row = stage_row(name, None, t1 - t0, before, meter.snapshot(), gpu.busy(t0, t1), cfg)
                row["interrupted"] = type(stop).__name__
                if profiler:
                    row["profile_top"] = profile_top(profiler, Path(args.profile) / f"{name}.pstats")
                out["stages"][name] = row
                print(f"{name:9s} interrupted after {row['seconds']:.1f} s: {row['samples']} samples "
                      f"({row['samples_per_s']}/s)", flush=True)
                if args.json:
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
                raise
            t1 = time.perf_counter()
            row = stage_row(name, result, t1 - t0, before, meter.snapshot(), gpu.busy(t0, t1), cfg)
            if profiler:
                row["profile_top"] = profile_top(profiler, Path(args.profile) / f"{name}.pstats")
            out["stages"][name] = row
            print(f"{name:9s} {row['seconds']:8.1f} s  {row['samples']:7d} samples ({row['samples_per_s']}/s)  "
                  f"generate {row['generate_fraction']}  gpu busy {row['gpu_busy_fraction']}  "
                  f"sandbox {row['programs']} programs ({row['programs_per_s']}/s)  {row['sandbox']}  "
                  f"rounds alone {row['rerun_rounds']} ({row['rerun_rounds_s']} s)", flush=True)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        total = time.perf_counter() - started
        out["total_seconds"] = round(total, 1)
        out["gpu_busy_fraction"] = gpu.busy(started, started + total)
    finally:
        gpu.close()
    if "steer" in out["stages"]:
        res = read_json(run.root / "steering" / "results.json")
        out["steering_summary"] = {n: {"rate": e["rate"], "rank_p": e["rank_p"]["p"],
                                       "permutation_p": e["permutation_p"]["p"], "holm_p": e["holm_p"]}
                                   for n, e in res["experiments"].items()}
        calls = run.root / "steering" / "calls.json"
        if calls.exists():      # where steering's time went, call by call
            out["steering_calls"] = read_json(calls)["calls"]
            for i, c in enumerate(out["steering_calls"], 1):
                print(f"steer call {i}: {c['conditions']} conditions, {c['rows']} rows: "
                      f"generation {c['generation_s']} s, then waited {c['label_wait_s']} s for "
                      f"{c['rows_pending']} rows in {c['chunks_pending']} chunks ({c['timeouts_pending']} timeouts)",
                      flush=True)
    print(f"total     {out['total_seconds']:8.1f} s  gpu busy {out['gpu_busy_fraction']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
