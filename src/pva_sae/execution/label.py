"""Labelling: extract a program from each completion, run its task's tests in the sandbox, make the record."""

from __future__ import annotations

from typing import Any

from pva_sae.config import Config
from pva_sae.data.extract import extract_program
from pva_sae.execution.sandbox import BatchStats, ExecJob, run_jobs


def label_samples(samples, by_id, split_of, cfg: Config, stats: BatchStats | None = None) -> list[dict[str, Any]]:
    """Extract each sample's program, run its task's tests in the sandbox, and make the records
    (``stats`` counts jobs, timeouts and re-runs over a whole build)."""

    programs = [extract_program(s.completion, prompt_end=cfg.prompt.initiator) for s in samples]
    jobs = [ExecJob(key=(s.task_id, s.sample_index), program=p, tests=tuple(by_id[s.task_id].test_list),
                    setup_code=by_id[s.task_id].test_setup_code) for s, p in zip(samples, programs)]
    results = run_jobs(jobs, cfg.sandbox, stats=stats)
    return [make_record(s, p, r, by_id[s.task_id], split_of.get(s.task_id))
            for s, p, r in zip(samples, programs, results)]


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
