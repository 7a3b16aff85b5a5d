"""The label cache: keys, hits within and across pools, what is never stored, where it lives."""

from __future__ import annotations

import dataclasses
import sqlite3
from types import SimpleNamespace

import pytest

from pva_sae.config import Config, SandboxConfig
from pva_sae.errors import InputError
from pva_sae.execution.label import label_samples, labelling_pool
from pva_sae.execution.label_cache import LabelCache, label_environment
from pva_sae.execution.sandbox import BatchStats, ExecJob, Sandbox, run_jobs
from pva_sae.rundir.paths import RunDir, ValidationPaths

CFG = SandboxConfig(timeout_s=2.0, cpu_time_s=5, memory_limit_mb=512, max_processes=16)
GOOD = "def f(x):\n    return x + 1\n"
WRONG = "def f(x):\n    return x\n"
TESTS = ("assert f(1) == 2", "assert f(2) == 3")
# Prints the pid the host sees: a label served from the cache repeats the first run's output.
PID = "import os\nprint(os.readlink('/proc/self'))\n"
LOOP = "while True:\n    pass\n"


@pytest.fixture
def cache(tmp_path):
    with LabelCache(tmp_path / "labels.sqlite", label_environment(CFG)) as c:
        yield c


def test_the_key_covers_the_job_and_only_the_settings_that_change_a_label(tmp_path, cache):
    job = ExecJob("a", GOOD, TESTS)
    assert cache.key(job) == cache.key(ExecJob("other key", GOOD, TESTS))
    assert len({cache.key(j) for j in [job, ExecJob("a", WRONG, TESTS), ExecJob("a", GOOD, TESTS[:1]),
                                       ExecJob("a", GOOD, TESTS[::-1]), ExecJob("a", GOOD, TESTS, "x = 1")]}) == 5
    same = dataclasses.replace(CFG, workers=7, start_method="spawn", label_cache=False, uid_pool_start=62000)
    other = dataclasses.replace(CFG, timeout_s=3.0)
    with LabelCache(tmp_path / "a.sqlite", label_environment(same)) as a, \
            LabelCache(tmp_path / "b.sqlite", label_environment(other)) as b:
        assert a.key(job) == cache.key(job) != b.key(job)
    environment = label_environment(CFG)
    assert {"protections", "interpreter", "python", "code"} <= set(environment)
    assert environment["settings"]["memory_limit_mb"] == 512


def test_a_second_batch_is_served_from_the_cache_and_survives_reopening(tmp_path, cache):
    jobs = [ExecJob(i, PID + program, TESTS) for i, program in enumerate([GOOD, WRONG, "def f(x):\n    return y\n"])]
    stats = BatchStats()
    first = run_jobs(jobs, CFG, stats=stats, cache=cache)
    assert [r.status for r in first] == ["passed", "failed", "error"] and not any(r.cached for r in first)
    assert len(cache) == 3
    with LabelCache(tmp_path / "labels.sqlite", label_environment(CFG)) as reopened:
        seen = []
        again = run_jobs(jobs, CFG, progress=seen.append, stats=stats, cache=reopened)
    assert all(r.cached for r in again) and len(seen) == 3
    assert [dataclasses.replace(r, cached=False) for r in again] == first  # the same output: not run again
    assert stats.as_dict() == {"jobs": 6, "reruns": 0, "rerun_timeouts": 0, "timeouts": 0, "cache_hits": 3}


def test_identical_jobs_of_a_batch_run_once(cache):
    jobs = [ExecJob(i, PID + GOOD, TESTS) for i in range(4)] + [ExecJob("other", PID + WRONG, TESTS)]
    stats = BatchStats()
    results = run_jobs(jobs, dataclasses.replace(CFG, workers=2), stats=stats, cache=cache)
    assert [r.cached for r in results] == [False, True, True, True, False]
    assert len({r.stdout_tail for r in results[:4]}) == 1 and results[4].stdout_tail != results[0].stdout_tail
    assert stats.cache_hits == 3 and stats.jobs == 5
    assert len(results) == len({id(r) for r in results})


def test_without_a_cache_identical_jobs_all_run():
    results = run_jobs([ExecJob(i, PID + GOOD, TESTS) for i in range(3)], dataclasses.replace(CFG, workers=2))
    assert len({r.stdout_tail for r in results}) == 3 and not any(r.cached for r in results)


def test_a_timeout_is_never_cached(cache):
    cfg = dataclasses.replace(CFG, timeout_s=0.5)
    with LabelCache(cache.path, label_environment(cfg)) as timed:
        stats = BatchStats()
        for _ in range(2):
            [result] = run_jobs([ExecJob(0, LOOP, TESTS)], cfg, stats=stats, cache=timed)
            assert result.status == "timeout" and not result.cached
        assert len(timed) == 0
    assert stats.as_dict()["cache_hits"] == 0 and stats.timeouts == 2


def test_a_pool_serves_hits_across_batches_and_submit(cache):
    stats = BatchStats()
    with Sandbox(CFG, cache=cache, stats=stats, workers=2) as sandbox:
        baseline = sandbox.map([ExecJob(("base", i), GOOD if i % 2 else WRONG, TESTS) for i in range(4)])
        steered = sandbox.submit([ExecJob(("steer", i), GOOD, TESTS) for i in range(4)]).result()
    assert [r.passed for r in baseline] == [False, True, False, True]
    assert all(r.passed for r in steered) and all(r.cached for r in steered)
    assert stats.as_dict() == {"jobs": 8, "reruns": 0, "rerun_timeouts": 0, "timeouts": 0, "cache_hits": 6}


def test_a_program_two_batches_label_at_once_runs_once(cache):
    """Batches labelled beside each other in one pool (the background labeller's threads): a program the other
    batch is running is not run again; this batch takes that run's result, as a cache hit."""
    import threading

    slow = "import time\ntime.sleep(0.5)\n" + PID + GOOD
    out = {}
    with Sandbox(CFG, workers=4, cache=cache) as pool:
        threads = [threading.Thread(target=lambda n=n: out.__setitem__(n, pool.map([ExecJob(n, slow, TESTS)])[0]))
                   for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(r.passed for r in out.values())
    assert sorted(r.cached for r in out.values()) == [False, True]
    assert out[0].stdout_tail == out[1].stdout_tail          # the one run's pid, twice


def test_the_cache_lives_in_the_run_directory_and_sub_runs_share_it(tmp_path):
    cfg = Config()
    cfg.output.run_dir = str(tmp_path / "run")
    run = RunDir.at(cfg.output.run_dir)
    sub = RunDir.at(ValidationPaths.of(run).temperature_run(0.8, "abc"))
    assert run.label_cache == sub.label_cache == run.root / "cache" / "labels.sqlite"
    cache = LabelCache.for_run(cfg)
    assert cache is not None and cache.path == run.label_cache and run.label_cache.is_file()
    cache.close()
    cfg.sandbox.label_cache = False
    assert LabelCache.for_run(cfg) is None


def test_a_corrupt_cache_is_a_clear_error(tmp_path):
    path = tmp_path / "labels.sqlite"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(InputError, match="delete it"):
        LabelCache(path, label_environment(CFG))


def test_another_schema_is_refused(tmp_path):
    path = tmp_path / "labels.sqlite"
    LabelCache(path, label_environment(CFG)).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '0' WHERE name = 'schema'")
    with pytest.raises(InputError, match="schema 0"):
        LabelCache(path, label_environment(CFG))


def samples_of(programs):
    return [SimpleNamespace(task_id=1, sample_index=i, completion=p, temperature=0.0, prompt="", raw_completion=p,
                            n_prompt_tokens=1, n_new_tokens=1, gen_time_s=0.0, finish_reason="stop", batch_index=0)
            for i, p in enumerate(programs)]


def test_labelling_a_stage_reuses_the_labels_of_identical_programs(tmp_path):
    cfg = Config()
    cfg.output.run_dir = str(tmp_path / "run")
    cfg.sandbox = dataclasses.replace(CFG, workers=2)
    task = SimpleNamespace(task_id=1, test_list=list(TESTS), test_setup_code="", complexity=1, difficulty="easy")
    by_id, split_of = {1: task}, {1: "sae"}
    stats = BatchStats()
    with labelling_pool(cfg, stats) as pool:
        baseline = label_samples(samples_of([GOOD, WRONG]), by_id, split_of, cfg, sandbox=pool)
        steered = label_samples(samples_of([WRONG, GOOD, GOOD]), by_id, split_of, cfg, sandbox=pool)
    assert [r["passed"] for r in baseline] == [True, False] and [r["passed"] for r in steered] == [False, True, True]
    assert stats.as_dict()["cache_hits"] == 3 and stats.jobs == 5
    later = BatchStats()  # another stage of the run, without a pool of its own
    again = label_samples(samples_of([GOOD]), by_id, split_of, cfg, stats=later)
    assert again[0]["passed"] and later.cache_hits == 1
    assert RunDir.at(cfg.output.run_dir).label_cache.is_file()


def test_a_labeller_deferring_reruns_gives_every_batch_its_labels(tmp_path):
    """Steering's labeller: timeouts' re-runs deferred to shared rounds; waiting on a batch starts its round, so
    every batch comes back (endless loops as timeouts after two attempts, the rest labelled) well before the
    longest deferral."""
    import time

    from pva_sae.execution.dataset import BackgroundLabeller
    from pva_sae.execution.sandbox import DEFER_MAX_S

    cfg = Config()
    cfg.output.run_dir = str(tmp_path / "run")
    cfg.sandbox = dataclasses.replace(CFG, workers=4, timeout_s=1.0)
    task = SimpleNamespace(task_id=1, test_list=list(TESTS), test_setup_code="", complexity=1, difficulty="easy")
    endless = "def f(x):\n    while True:\n        pass\n"
    slow = "def f(x):\n    import time\n    time.sleep(0.15)\n    return x + 1\n"
    started = time.monotonic()
    with BackgroundLabeller({1: task}, {1: "sae"}, cfg, None, overlap=True, defer_reruns=True) as labeller:
        futures = [labeller.submit(samples_of([endless + f"# {n}\n", slow + f"# {n}\n"])) for n in range(3)]
        batches = [labeller.wait(f) for f in futures]
    assert time.monotonic() - started < DEFER_MAX_S
    for records in batches:
        assert [(r["status"], r["exec_attempts"]) for r in records] == [("timeout", 2), ("passed", 1)]
