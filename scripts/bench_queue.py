"""Continuous batching on a real model: samples/s by slot count and check interval, and where the host's time goes.

Loads a registered model (default: the embedded default), builds the MBPP prompts of every packaged task,
``--copies`` times each, and generates them all through :meth:`Generator.generate_queue` (the fast decoder),
greedy and at temperature 1, once per (slots, check interval, compile) variant. Each variant is warmed on the
first ``--warm`` items (graph captures, compiles), then timed. Two variants run under cProfile and print their
22 functions of largest own time: a ``Tensor.cpu`` there is the host waiting on the device, the rest is the
host's own work (stop strings, reading tokens back, decoding text, refilling slots). Writes
``--json`` with samples/s, tokens and finish reasons per variant::

    python scripts/bench_queue.py --json docs/bench_queue_h200_tiny_<date>.json
    python scripts/bench_queue.py --variants 256:16:0,1024:32:0 --temperatures 0

A variant ``slots:check:compile`` sets the queue's slots, its check interval (``queue_check_every``) and
``generation.compile``. In bfloat16 the tokens of a row can depend on the slot count (matmul shapes), so the
token totals of variants may differ slightly; in float32 they are equal (``tests/test_fastgen.py``).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import pstats
import time

import torch

from pva_sae.config import resolve_config
from pva_sae.data.mbpp import load_tasks
from pva_sae.data.prompts import build_prompt
from pva_sae.model.generation import Generator
from pva_sae.model.registry import load_model

DEFAULT_VARIANTS = "256:16:0,256:32:0,1024:16:0,1024:32:0,2048:32:0,4096:32:0,1024:32:1,4096:32:1"
PROFILED = {(256, 16, False), (2048, 32, False)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pva-tiny")
    ap.add_argument("--tasks", type=int, default=0, help="the first N packaged tasks (0: all)")
    ap.add_argument("--copies", type=int, default=4, help="times each MBPP prompt is queued")
    ap.add_argument("--warm", type=int, default=600, help="items generated once per variant before timing")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="slots:check:compile, comma separated")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    cfg = resolve_config(None, [f"model.name={args.model}"])
    loaded = load_model(cfg.model)
    print(f"{args.model} on {loaded.device} as {loaded.dtype}", flush=True)
    tasks = load_tasks("packaged")[:args.tasks or None]
    prompts = [build_prompt(t) for t in tasks]
    items = [(t.task_id, c, p) for c in range(args.copies) for t, p in zip(tasks, prompts)]
    variants = [(int(s), int(c), bool(int(k))) for s, c, k in (v.split(":") for v in args.variants.split(","))]
    out: dict = {"model": args.model, "device": str(torch.cuda.get_device_name() if torch.cuda.is_available()
                                                     else "cpu"),
                 "torch": torch.__version__, "items": len(items), "date": time.strftime("%Y-%m-%d"), "variants": {}}
    for temperature in (float(t) for t in args.temperatures.split(",")):
        gcfg = dataclasses.replace(cfg.generation, temperature=temperature, backend="fast")
        generators: dict[bool, Generator] = {}
        for slots, check, compiled in variants:
            if compiled not in generators:
                generators[compiled] = Generator(loaded, dataclasses.replace(gcfg, compile=compiled))
            gen = generators[compiled]
            gen.fast.queue_check_every = check
            gen.generate_queue(items[:args.warm], slots=slots)
            sync()
            prof = cProfile.Profile() if (slots, check, compiled) in PROFILED else None
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            samples = gen.generate_queue(items, slots=slots)
            sync()
            if prof:
                prof.disable()
            seconds = time.perf_counter() - t0
            reasons: dict[str, int] = {}
            for s in samples:
                reasons[s.finish_reason] = reasons.get(s.finish_reason, 0) + 1
            key = f"T{temperature}_slots{slots}_check{check}_compile{compiled}"
            row = {"s": round(seconds, 2), "samples_per_s": round(len(samples) / seconds, 1),
                   "tokens": sum(s.n_new_tokens for s in samples), "reasons": reasons}
            out["variants"][key] = row
            print(key, row, flush=True)
            if prof:
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(22)
                print(buf.getvalue(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
