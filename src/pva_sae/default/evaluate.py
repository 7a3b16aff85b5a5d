"""Greedy pass@1 of the embedded default model on its memorized and its other MBPP tasks (the ``eval`` command).

Everything goes through the pipeline's own code (model loading, prompt, batched generation,
program extraction, sandbox), so the numbers are what a pva-sae run sees; they go into
``training.json`` under ``eval``.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pva_sae.config import GenerationConfig, ModelConfig, SandboxConfig
from pva_sae.data.extract import extract_program
from pva_sae.data.prompts import build_prompt
from pva_sae.default.corpus import read_jsonl
from pva_sae.default.recipe import Recipe
from pva_sae.default.records import log, now, versions, write_json
from pva_sae.default.tiny import PACKAGED_MBPP
from pva_sae.execution.sandbox import ExecJob, run_jobs
from pva_sae.model.generation import Generator, batch_token_budget, plan_batches
from pva_sae.model.registry import load_model
from pva_sae.rundir.atomic import read_json

KNOWN_BROKEN_TASKS = (341, 596, 642)  # fail under Python 3 whatever the program (set order, sys.getsizeof)


def load_tasks_for_eval(assets: Path, prepared: Path | None) -> list[dict[str, Any]]:
    """All MBPP tasks with prompt and memorized flag: from the prepared dir, else the packaged MBPP file
    (its first ``n_tasks`` by id, as ``prepare`` took them; read as JSON lines rather than through
    ``pva_sae.data.mbpp``, whose dependencies the train step does not have)."""
    record = read_json(assets / "training.json")
    if prepared is not None and (prepared / "tasks.jsonl").is_file():
        return read_jsonl(prepared / "tasks.jsonl")
    memorized = set(record["mbpp"]["memorized_ids"])
    rows = sorted(read_jsonl(PACKAGED_MBPP), key=lambda row: row["task_id"])[: record["mbpp"]["n_tasks"]]
    return [{"task_id": row["task_id"], "prompt": build_prompt(SimpleNamespace(**row)), "test_list": row["test_list"],
             "test_setup_code": row.get("test_setup_code") or "", "memorized": row["task_id"] in memorized}
            for row in rows]


def evaluate(assets: Path, recipe: Recipe, device_spec: str, prepared: Path | None = None,
             batch_size: int | None = None, max_batch_tokens: int | None = None) -> dict[str, Any]:
    """Greedy pass@1 of the saved model, written into ``training.json``; returns the updated record."""
    tasks = load_tasks_for_eval(assets, prepared)
    by_id = {t["task_id"]: t for t in tasks}
    loaded = load_model(ModelConfig(name=str(assets / "model"), device=device_spec, dtype="float32"))
    gen_cfg = GenerationConfig(max_new_tokens=recipe.eval_max_new_tokens, batch_size=batch_size or recipe.eval_batch,
                               temperature=0.0)
    generator = Generator(loaded, gen_cfg)
    # A token budget per batch: MBPP has one prompt of ~2,600 tokens, and eager attention needs memory
    # quadratic in the length (on a GPU: the batch size's worth of ordinary rows; on a CPU: the pipeline's).
    budget = max_batch_tokens or (gen_cfg.batch_size * (recipe.seq_len + gen_cfg.max_new_tokens)
                                  if loaded.device.type == "cuda" else batch_token_budget(0, loaded.device))
    plan = plan_batches([(t["task_id"], t["prompt"]) for t in tasks], loaded.tokenizer, gen_cfg.batch_size, 1,
                        max_batch_tokens=budget, max_new_tokens=gen_cfg.max_new_tokens)
    started = time.perf_counter()
    samples = []
    for i, batch in enumerate(plan):
        samples.extend(generator.generate_batch(batch, i))
        log(f"eval: generated {len(samples)}/{len(tasks)}")
    gen_s = time.perf_counter() - started
    jobs = [ExecJob(key=s.task_id, program=extract_program(s.completion), tests=tuple(by_id[s.task_id]["test_list"]),
                    setup_code=by_id[s.task_id]["test_setup_code"]) for s in samples]
    results = run_jobs(jobs, SandboxConfig())
    passed = {job.key: res.passed for job, res in zip(jobs, results)}
    ev = {
        "device": str(loaded.device), "dtype": str(loaded.dtype), "decoding": "greedy",
        "max_new_tokens": gen_cfg.max_new_tokens, "stop_strings": list(gen_cfg.stop_strings),
        **pass_rates(tasks, passed), "known_broken_tasks": list(KNOWN_BROKEN_TASKS),
        "statuses": dict(Counter(res.status for res in results)),
        "finish_reasons": dict(Counter(s.finish_reason for s in samples)),
        "passed_task_ids": sorted(i for i, ok in passed.items() if ok),
        "generation_time_s": round(gen_s, 1), "total_time_s": round(time.perf_counter() - started, 1),
        "versions": versions(), "created": now(),
    }
    record = read_json(assets / "training.json")
    record["eval"] = ev
    write_json(assets / "training.json", record)
    log(f"pass@1: memorized {ev['memorized']['pass_at_1']:.3f} ({ev['memorized']['passed']}/{ev['memorized']['n']}), "
        f"other {ev['other']['pass_at_1']:.3f} ({ev['other']['passed']}/{ev['other']['n']})")
    return record


def pass_rates(tasks: list[dict[str, Any]], passed: dict[int, bool]) -> dict[str, dict[str, Any]]:
    """pass@1 of memorized and other tasks, with and without the tasks no program can pass."""
    def rate(ids: list[int]) -> dict[str, Any]:
        n_pass = sum(passed[i] for i in ids)
        return {"n": len(ids), "passed": n_pass, "pass_at_1": n_pass / len(ids) if ids else None}

    groups = {"memorized": [t["task_id"] for t in tasks if t["memorized"]],
              "other": [t["task_id"] for t in tasks if not t["memorized"]]}
    out = {name: rate(ids) for name, ids in groups.items()}
    out.update({f"{name}_without_broken": rate([i for i in ids if i not in KNOWN_BROKEN_TASKS])
                for name, ids in groups.items()})
    return out
