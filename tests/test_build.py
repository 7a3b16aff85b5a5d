"""End-to-end dataset building on CPU with a tiny random Gemma-2 loaded through from_pretrained."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pva_sae.config import resolve_config
from pva_sae.rundir.artifacts import load_records
from pva_sae.rundir.paths import RunDir
from pva_sae.stages.build import build_dataset

# Wall-clock measurements differ between runs; every other field must be identical.
TIMING_FIELDS = {"gen_time_s", "exec_time_s"}


def overrides(model_dir, run_dir, n_tasks=12, **extra):
    items = {
        "model.name": model_dir, "output.run_dir": run_dir, "data.start_idx": 0, "data.end_idx": n_tasks - 1,
        "generation.max_new_tokens": 24, "generation.batch_size": 2, "checkpoint.every_n_records": 2,
        "sandbox.timeout_s": 5, "checkpoint.resume": "auto",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def cli(*args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "pva_sae.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, **kwargs)


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    cfg = resolve_config(overrides=overrides(tiny_model_dir, run_dir))
    records = build_dataset(cfg, interactive=False, progress=False)
    return run_dir, records


def test_outputs_are_complete(reference_run):
    run_dir, records = reference_run
    run = RunDir.at(run_dir)
    assert len(records) == 12
    assert [r["task_id"] for r in records] == list(range(1, 13))
    for path in (run.config, run.manifest, run.splits, run.dataset_json, run.dataset_parquet,
                 run.dataset_metadata, run.marker("build")):
        assert path.is_file(), path
    assert list(run.logs.glob("build_*.log"))
    manifest = json.loads(run.manifest.read_text())
    for key in ("pva_sae_version", "python", "versions", "model", "dataset", "seeds", "device"):
        assert key in manifest
    assert manifest["dataset"]["sha256"] and manifest["model"]["revision"].startswith("sha256:")
    meta = json.loads(run.dataset_metadata.read_text())
    assert meta["n_records"] == 12 and "by_split" in meta["pass_rate"] and "by_difficulty" in meta["pass_rate"]
    for record in records:
        assert record["prompt"].endswith("# Solution:")
        assert record["split"] in ("sae", "tuning", "validation")
        assert record["status"] in ("passed", "failed", "error", "timeout")
        assert record["finish_reason"] in ("stop", "eos", "length")
    import pyarrow.parquet as pq

    assert comparable(pq.read_table(run.dataset_parquet).to_pylist()) == comparable(records)
    assert comparable(load_records(str(run_dir))) == comparable(records)


def test_config_change_is_refused(reference_run, tiny_model_dir):
    run_dir, _ = reference_run
    cfg = resolve_config(overrides=overrides(tiny_model_dir, run_dir, **{"generation.max_new_tokens": 5}))
    with pytest.raises(RuntimeError, match="generation.max_new_tokens"):
        build_dataset(cfg, interactive=False, progress=False)


def wait_for(predicate, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("overlap, schedule", [("off", "batches"), ("on", "batches"), ("on", "queue")])
def test_sigkill_then_resume_gives_identical_records(reference_run, tiny_model_dir, tmp_path, overlap, schedule):
    """Killed after its first checkpoint, the build resumes to the uninterrupted records; on the fast backend's
    queue too (greedy: the same records as the reference's batches)."""
    _, expected = reference_run
    run_dir = tmp_path / "run"
    backend = {"generation.backend": "fast"} if schedule == "queue" else {}
    args = ["build", "--quiet", *sum((["--set", o] for o in overrides(
        tiny_model_dir, run_dir, **{"generation.overlap": overlap, "generation.schedule": schedule, **backend})), [])]
    proc = cli(*args)
    run = RunDir.at(run_dir)
    assert wait_for(lambda: any(run.checkpoints.glob("checkpoint_*.json")) if run.checkpoints.is_dir() else False)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not run.is_done("build"), "the build finished before it could be killed"
    assert not run.dataset_json.exists()
    resumed = cli(*args)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming from" in err
    assert comparable(load_records(str(run_dir))) == comparable(expected)
    assert json.loads(run.batch_plan.read_text())["schedule"] == schedule


@pytest.mark.slow
def test_sigterm_writes_emergency_save_and_exits_cleanly(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    # Enough work (80 tasks, every sample runs to 64 tokens) that the build is still going when the signal lands.
    args = ["build", "--quiet", *sum((["--set", o] for o in overrides(
        tiny_model_dir, run_dir, n_tasks=80, **{"checkpoint.every_n_records": 1000, "generation.max_new_tokens": 64,
                                                "generation.stop_strings": "[]"})), [])]
    proc = cli(*args)
    run = RunDir.at(run_dir)
    assert wait_for(lambda: run.manifest.is_file())
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if run.is_done("build"):
        pytest.fail("the build finished before SIGTERM arrived")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "emergency save" in err and "Traceback" not in err
    saves = list(run.checkpoints.glob("emergency_*.json"))
    assert len(saves) == 1


@pytest.mark.slow
def test_bad_model_path_is_a_clear_error(tmp_path):
    proc = cli("build", "--model", str(tmp_path / "no-such-model"), "--run-dir", str(tmp_path / "run"),
               "--end", "1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "no-such-model" in err and "Traceback" not in err


def test_python_api_matches_seed_quick_start(tiny_model_dir, tmp_path):
    import pva_sae

    records = pva_sae.build_dataset(model=str(tiny_model_dir), start_idx=0, end_idx=1, save_format="json",
                                    run_dir=str(tmp_path / "api"), overrides={"generation.max_new_tokens": 8},
                                    progress=False)
    assert [r["task_id"] for r in records] == [1, 2]
    run = RunDir.at(tmp_path / "api")
    assert run.dataset_json.is_file() and not run.dataset_parquet.exists()


def test_automatic_batch_size_is_kept_on_resume(tiny_model_dir, tmp_path, monkeypatch):
    import pva_sae.execution.dataset as generation  # the module that calls resolve_batch_size
    from pva_sae.config import resolve_config
    from pva_sae.stages.build import build_dataset

    run_dir = tmp_path / "run"
    cfg = resolve_config(overrides=[f"model.name={tiny_model_dir}", f"output.run_dir={run_dir}", "data.end_idx=5",
                                    "generation.max_new_tokens=2", "generation.batch_size=0",
                                    "checkpoint.resume=auto"])
    monkeypatch.setattr(generation, "resolve_batch_size", lambda gen, prompts: 4)
    build_dataset(cfg, progress=False)
    assert json.loads(RunDir.at(run_dir).batch_plan.read_text())["batch_size"] == 4
    RunDir.at(run_dir).clear_done("build")                  # as if interrupted before the end
    monkeypatch.setattr(generation, "resolve_batch_size", lambda gen, prompts: 7)
    records = build_dataset(cfg, progress=False)
    assert json.loads(RunDir.at(run_dir).batch_plan.read_text())["batch_size"] == 4
    assert max(r["batch_index"] for r in records) == 1      # 6 tasks in batches of 4


def test_resume_with_another_token_budget_uses_the_saved_plan(reference_run, tiny_model_dir, tmp_path):
    """The batch plan depends on the machine (token budget, backend); a resume on another machine runs the
    saved plan, so its records equal the uninterrupted run's."""
    from pva_sae.rundir.checkpoint import BuildState, write_state

    ref_dir, ref_records = reference_run
    run_dir = tmp_path / "run"
    cfg = resolve_config(overrides=overrides(tiny_model_dir, run_dir))
    build_dataset(cfg, interactive=False, progress=False)
    run = RunDir.at(run_dir)
    plan = json.loads(run.batch_plan.read_text())
    first = {tuple(k) for k in plan["batches"][0]}
    partial = [r for r in json.loads(run.dataset_json.read_text())["records"]
               if (r["task_id"], r["sample_index"]) in first]
    for folder in (run.checkpoints, run.autosaves):
        for f in folder.glob("*.json"):
            f.unlink()
    run.dataset_json.unlink()
    run.clear_done("build")
    write_state(run.checkpoints / "checkpoint_0_11_20260101_000000_00001.json",
                BuildState(partial, {0}, 1), json.loads(run.config.read_text()), "checkpoint")
    other = resolve_config(overrides=overrides(tiny_model_dir, run_dir, **{"generation.max_batch_tokens": 40}))
    records = build_dataset(other, interactive=False, progress=False)     # would plan other batches
    assert comparable(records) == comparable(ref_records)


def test_a_refused_resume_writes_nothing(reference_run, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "fresh"
    cfg = resolve_config(overrides=overrides(tiny_model_dir, run_dir, **{"checkpoint.resume_from": "/no/such.json"}))
    with pytest.raises(Exception, match="no/such.json"):
        build_dataset(cfg, interactive=False, progress=False)
    assert not run_dir.exists()


@pytest.mark.parametrize("setting, field", [("sandbox.timeout_s=0", "timeout_s"),
                                            ("sandbox.sandbox_user=no-such-user", "sandbox_user")])
def test_bad_sandbox_settings_fail_fast_and_write_nothing(tmp_path, setting, field):
    """Refused before the model loads (not after a batch), and the run directory is not created."""
    import time

    from pva_sae.errors import PvaSaeError

    started = time.perf_counter()
    with pytest.raises(PvaSaeError, match=field):
        build_dataset(resolve_config(overrides=[f"output.run_dir={tmp_path / 'r'}", setting]),
                      interactive=False, progress=False)
    assert time.perf_counter() - started < 2.0       # before the model loads (0.02 s measured idle)
    assert not (tmp_path / "r").exists()


def test_overlapped_labelling_gives_identical_records_in_plan_order(reference_run, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    """Batch k is labelled on the background thread while batch k+1 generates; a slow labelling of one batch
    must not let a later batch into the records or the checkpoint journal ahead of it."""
    import pva_sae.execution.dataset as dataset
    from pva_sae.rundir.checkpoint import read_state

    _, expected = reference_run
    real = dataset.label_samples
    threads = set()

    def slow_first_batch(samples, *args, **kwargs):
        import threading

        threads.add(threading.current_thread().name)
        if samples[0].batch_index == 0:
            time.sleep(0.5)
        return real(samples, *args, **kwargs)

    monkeypatch.setattr(dataset, "label_samples", slow_first_batch)
    run_dir = tmp_path / "run"
    cfg = resolve_config(overrides=overrides(tiny_model_dir, run_dir, **{"generation.overlap": "on"}))
    records = build_dataset(cfg, interactive=False, progress=False)
    assert comparable(records) == comparable(expected)
    assert all(name.startswith("label") for name in threads)           # labelled off the generating thread
    plan = json.loads(RunDir.at(run_dir).batch_plan.read_text())
    assert plan["overlap"] is True and plan["sandbox_workers"] >= 1
    latest = max(RunDir.at(run_dir).checkpoints.glob("checkpoint_*.json"), key=lambda p: p.stat().st_mtime_ns)
    journaled = [r["batch_index"] for r in read_state(latest)[0].records]
    assert journaled == sorted(journaled) and len(journaled) == 12       # appended in plan order


def test_progress_names_the_step_and_quiet_silences_it(tiny_model_dir, tmp_path, capsys):
    cfg = resolve_config(overrides=overrides(tiny_model_dir, tmp_path / "loud", n_tasks=4))
    build_dataset(cfg, interactive=False, progress=True)
    err = capsys.readouterr().err
    assert "[build] 4 samples (4 tasks x 1)" in err and "2 batches of up to 2" in err
    assert "sample/s" in err and "pass_rate=" in err
    build_dataset(cfg, interactive=False, progress=True)                 # already complete: says so
    assert "[build] already complete: 4 records" in capsys.readouterr().err
    quiet = resolve_config(overrides=overrides(tiny_model_dir, tmp_path / "quiet", n_tasks=4))
    build_dataset(quiet, interactive=False, progress=False)
    err = capsys.readouterr().err
    assert "[build]" not in err and "sample/s" not in err


def test_device_sized_defaults():
    """On CUDA the batch size comes from free memory and labelling overlaps generation; a CPU run keeps a batch
    of 16 and takes turns; the sandbox uses the cores this process may run on."""
    import torch

    from pva_sae.config import Config
    from pva_sae.execution.dataset import overlap_labelling, usable_cores, with_sandbox_workers

    cfg = Config()
    assert cfg.generation.batch_size == 0 and cfg.generation.overlap == "auto"
    assert overlap_labelling("auto", torch.device("cuda", 0)) and not overlap_labelling("auto", torch.device("cpu"))
    assert overlap_labelling("on", torch.device("cpu")) and not overlap_labelling("off", torch.device("cuda"))
    assert with_sandbox_workers(cfg).sandbox.workers == usable_cores() == len(os.sched_getaffinity(0))
    cfg.sandbox.workers = 3
    assert with_sandbox_workers(cfg).sandbox.workers == 3


def test_cpu_run_keeps_batches_of_16(tiny_loaded):
    from pva_sae.config import GenerationConfig
    from pva_sae.model.generation import Generator, resolve_batch_size

    assert resolve_batch_size(Generator(tiny_loaded, GenerationConfig()), ["def f():"]) == 16


@pytest.mark.gpu
def test_cuda_defaults_size_the_batch_keep_it_on_resume_and_overlap_exactly(tiny_model_dir, tmp_path, monkeypatch):
    import pva_sae.execution.dataset as dataset

    run_dir = tmp_path / "run"
    cfg = resolve_config(overrides=overrides(tiny_model_dir, run_dir, n_tasks=40, **{
        "generation.batch_size": 0, "model.device": "cuda", "generation.backend": "fast"}))
    build_dataset(cfg, interactive=False, progress=False)
    plan = json.loads(RunDir.at(run_dir).batch_plan.read_text())
    assert plan["configured_batch_size"] == 0 and plan["batch_size"] > 16 and plan["overlap"] is True
    assert len(plan["batches"]) == 1                                     # 40 rows fit at once on a GPU
    RunDir.at(run_dir).clear_done("build")
    monkeypatch.setattr(dataset, "resolve_batch_size", lambda gen, prompts: 3)
    build_dataset(cfg, interactive=False, progress=False)
    assert json.loads(RunDir.at(run_dir).batch_plan.read_text())["batch_size"] == plan["batch_size"]
    monkeypatch.undo()
    built = {}
    for overlap in ("on", "off"):                                        # 5 batches of 8: overlap has work to do
        built[overlap] = build_dataset(resolve_config(overrides=overrides(
            tiny_model_dir, tmp_path / overlap, n_tasks=40, **{"generation.batch_size": 8, "model.device": "cuda",
                                                               "generation.backend": "fast",
                                                               "generation.overlap": overlap})),
            interactive=False, progress=False)
    assert comparable(built["on"]) == comparable(built["off"])
