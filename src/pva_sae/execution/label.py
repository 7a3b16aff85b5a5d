"""Labelling: extract a program from each completion, run its task's tests in the sandbox, make the record.

MBPP: the program, the task's ``test_setup_code``, then its three asserts. HumanEval: the prompt's
imports and helpers, the program, then HumanEval's ``check`` run on the entry point (see
:mod:`pva_sae.data.humaneval`). Under ``prompt.style='signature'`` the program is extracted from
HumanEval's prompt followed by the completion (the model wrote the function's body).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pva_sae.config import Config
from pva_sae.data import humaneval
from pva_sae.data.extract import extract_program
from pva_sae.execution.label_cache import LabelCache
from pva_sae.execution.sandbox import BatchStats, ExecJob, Sandbox, run_jobs


@contextmanager
def labelling_pool(cfg: Config, stats: BatchStats | None = None) -> Iterator[Sandbox]:
    """One sandbox pool for a whole stage: its fork server stays warm across batches and it uses the
    run directory's label cache (``sandbox.label_cache``); ``stats`` is added to by every batch."""
    cache = LabelCache.for_run(cfg)
    try:
        with Sandbox(cfg.sandbox, cache=cache, stats=stats) as sandbox:
            yield sandbox
    finally:
        if cache is not None:
            cache.close()


def label_samples(samples, by_id, split_of, cfg: Config, stats: BatchStats | None = None,
                  sandbox: Sandbox | None = None, defer_reruns: bool = False) -> list[dict[str, Any]]:
    """Extract each sample's program, run its task's tests in the sandbox, and make the records.

    ``sandbox`` (from :func:`labelling_pool`) runs them in a pool that outlives this batch (its stats
    and cache are the pool's; ``defer_reruns`` as in :meth:`Sandbox.map`); without it a pool is made for
    this batch, with the run's label cache, and ``stats`` counts jobs, cache hits, timeouts and re-runs.
    """
    programs = [program_of(s.completion, by_id[s.task_id], cfg) for s in samples]
    jobs = [exec_job((s.task_id, s.sample_index), by_id[s.task_id], p) for s, p in zip(samples, programs)]
    if sandbox is not None:
        results = sandbox.map(jobs, defer_reruns=defer_reruns)
    else:
        cache = LabelCache.for_run(cfg)
        try:
            results = run_jobs(jobs, cfg.sandbox, stats=stats, cache=cache)
        finally:
            if cache is not None:
                cache.close()
    return [make_record(s, p, r, by_id[s.task_id], split_of.get(s.task_id))
            for s, p, r in zip(samples, programs, results)]


def program_of(completion: str, task, cfg: Config) -> str:
    """The program a completion holds: the new text alone, or HumanEval's prompt plus it ('signature')."""
    if cfg.prompt.style == "signature":
        return extract_program(humaneval.signature_program(task, completion), prompt_end="")
    return extract_program(completion, prompt_end=cfg.prompt.initiator)


def exec_job(key, task, program: str) -> ExecJob:
    """The sandbox job that labels ``program`` for ``task`` (an MBPP or a HumanEval task)."""
    if isinstance(task, humaneval.HumanEvalTask):
        return ExecJob(key=key, program=humaneval.program_to_run(task, program), tests=humaneval.check_tests(task))
    return ExecJob(key=key, program=program, tests=tuple(task.test_list), setup_code=task.test_setup_code)


def make_record(sample, program: str, result, task, split: str | None) -> dict[str, Any]:
    return {
        "task_id": sample.task_id,
        "sample_index": sample.sample_index,
        "split": split,
        "complexity": task.complexity,
        "difficulty": task.difficulty,
        "temperature": sample.temperature,
        "prompt": sample.prompt,
        "raw_completion": sample.raw_completion,
        "completion": sample.completion,
        "program": program,
        "n_prompt_tokens": sample.n_prompt_tokens,
        "n_new_tokens": sample.n_new_tokens,
        "gen_time_s": sample.gen_time_s,
        "finish_reason": sample.finish_reason,
        "batch_index": sample.batch_index,
        "status": result.status,
        "error_type": result.error_type,
        "error_detail": result.detail,
        "exec_time_s": result.duration_s,
        "exec_attempts": result.attempts,
        "stderr_tail": result.stderr_tail,
        "passed": result.passed,
    }
