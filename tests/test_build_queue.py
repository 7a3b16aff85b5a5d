"""The build on the 'queue' schedule (continuous batching on the fast decoder) against the 'batches' schedule:
greedy records equal, sampled records keyed per sample, checkpoints and resume per planned batch, the schedule
saved with the plan and kept on resume. CPU, float32, the embedded default model (its rows end at different
steps, so slots really pass from ended rows to the next items)."""

import functools
import json
import os
import signal
import time
from collections import Counter

import pytest
from test_build import comparable

from pva_sae.config import ConfigError, resolve_config
from pva_sae.execution.dataset import BuildInterrupted
from pva_sae.rundir.checkpoint import CheckpointError, read_state
from pva_sae.rundir.paths import RunDir
from pva_sae.stages.build import build_dataset

N_TASKS = 12


def settings(run_dir, **extra):
    items = {"model.name": "pva-tiny", "model.device": "cpu", "model.dtype": "float32", "generation.backend": "fast",
             "output.run_dir": run_dir, "data.start_idx": 0, "data.end_idx": N_TASKS - 1,
             "generation.max_new_tokens": 96, "generation.batch_size": 2, "checkpoint.every_n_records": 2,
             "sandbox.timeout_s": 5, "checkpoint.resume": "auto"}
    items.update(extra)
    return resolve_config(overrides=[f"{k}={v}" for k, v in items.items()])


@functools.cache
def default_model():
    """The embedded default model on CPU in float32, loaded once for this module's builds."""
    from pva_sae.config import ModelConfig
    from pva_sae.model.registry import load_model

    return load_model(ModelConfig(name="pva-tiny", device="cpu", dtype="float32"))


def build(run_dir, **extra):
    cfg = settings(run_dir, **extra)
    loaded = default_model() if cfg.model.name == "pva-tiny" else None
    return build_dataset(cfg, interactive=False, progress=False, loaded=loaded)


def plan_of(run_dir) -> dict:
    return json.loads(RunDir.at(run_dir).batch_plan.read_text())


SAMPLED = {"generation.temperature": 0.8, "generation.n_samples": 2}


@pytest.fixture(scope="module")
def greedy(tmp_path_factory):
    """The same greedy build on both schedules (the queue in waves of 2 planned batches)."""
    import pva_sae.execution.dataset as dataset

    out = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(dataset, "QUEUE_WAVE_BATCHES", 2)
    try:
        for schedule in ("batches", "auto"):
            run_dir = tmp_path_factory.mktemp(f"greedy-{schedule}") / "run"
            out[schedule] = (run_dir, build(run_dir, **{"generation.schedule": schedule}))
    finally:
        mp.undo()
    return out


def test_greedy_queue_records_equal_the_batches_records(greedy):
    (batch_dir, batched), (queue_dir, queued) = greedy["batches"], greedy["auto"]
    assert plan_of(batch_dir)["schedule"] == "batches" and plan_of(queue_dir)["schedule"] == "queue"
    assert plan_of(batch_dir)["batches"] == plan_of(queue_dir)["batches"]
    assert comparable(queued) == comparable(batched)
    reasons = Counter(r["finish_reason"] for r in queued)
    assert reasons["eos"] >= 3 and len({r["n_new_tokens"] for r in queued}) >= 6    # rows end at different steps
    assert any(r["program"] for r in queued)
    # batch_index is the planned batch, whatever the order rows ended in
    where = {(t, s): i for i, batch in enumerate(plan_of(queue_dir)["batches"]) for t, s in batch}
    assert [r["batch_index"] for r in queued] == [where[r["task_id"], r["sample_index"]] for r in queued]
    run = RunDir.at(queue_dir)
    assert json.loads(run.marker("build").read_text())["schedule"] == "queue"
    assert json.loads(run.dataset_metadata.read_text())["schedule"] == "queue"
    assert json.loads(run.manifest.read_text())["generation"] == {"backend": "fast", "schedule": "queue"}
    assert json.loads(RunDir.at(batch_dir).dataset_metadata.read_text())["schedule"] == "batches"


def test_queue_journal_holds_whole_planned_batches(greedy):
    """Each save holds whole planned batches: its records are exactly the items of its done batches."""
    queue_dir, _ = greedy["auto"]
    run = RunDir.at(queue_dir)
    batches = plan_of(queue_dir)["batches"]
    saves = list(run.checkpoints.glob("checkpoint_*.json"))
    assert saves
    for save in saves:
        state, _ = read_state(save)
        keys = sorted((r["task_id"], r["sample_index"]) for r in state.records)
        assert keys == sorted((t, s) for i in state.done_batches for t, s in batches[i])


def test_sampled_queue_build_is_keyed_per_sample(tmp_path):
    """Sampling on the queue: the same seed gives the same records; the batch size (slots and plan) changes
    nothing but batch_index; another seed gives other samples."""
    first = build(tmp_path / "a", **SAMPLED)
    again = build(tmp_path / "b", **SAMPLED)
    wider = build(tmp_path / "c", **SAMPLED, **{"generation.batch_size": 3})
    reseeded = build(tmp_path / "d", **SAMPLED, **{"generation.seed": 7})
    assert plan_of(tmp_path / "a")["schedule"] == "queue" and len(first) == 2 * N_TASKS
    assert comparable(again) == comparable(first)

    def unbatched(records):
        return [{k: v for k, v in r.items() if k != "batch_index"} for r in comparable(records)]

    assert unbatched(wider) == unbatched(first)
    assert [r["raw_completion"] for r in reseeded] != [r["raw_completion"] for r in first]
    assert len({r["raw_completion"] for r in first}) > N_TASKS          # two samples of a task differ


def interrupt_after(monkeypatch, n_batches: int) -> list[int]:
    """Deliver SIGINT (what Ctrl+C does) to this process once ``n_batches`` planned batches were labelled; returns
    the batch indices labelled (appended as they are)."""
    import pva_sae.execution.dataset as dataset

    real = dataset.label_samples
    labelled: list[int] = []

    def label_then_interrupt(samples, *args, **kwargs):
        out = real(samples, *args, **kwargs)
        labelled.append(samples[0].batch_index)
        if len(labelled) == n_batches:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)                       # the handler raises in the main thread meanwhile
        return out

    monkeypatch.setattr(dataset, "label_samples", label_then_interrupt)
    return labelled


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_interrupted_queue_build_resumes_to_the_uninterrupted_records(tmp_path, monkeypatch, overlap):
    """Sampled, on the queue in waves of 2 batches: SIGINT while the third planned batch is labelled writes an
    emergency save of whole batches; the resumed build generates only the other batches, and its records equal
    an uninterrupted build's."""
    import pva_sae.execution.dataset as dataset
    from pva_sae.model.generation import Generator

    monkeypatch.setattr(dataset, "QUEUE_WAVE_BATCHES", 2)
    extra = {**SAMPLED, "generation.overlap": overlap}
    whole = build(tmp_path / "whole", **extra)
    run_dir = tmp_path / "run"
    interrupt_after(monkeypatch, 3)
    with pytest.raises(BuildInterrupted):
        build(run_dir, **extra)
    monkeypatch.undo()
    monkeypatch.setattr(dataset, "QUEUE_WAVE_BATCHES", 2)
    run = RunDir.at(run_dir)
    assert not run.is_done("build")
    saved, _ = read_state(next(run.checkpoints.glob("emergency_*.json")))
    batches = plan_of(run_dir)["batches"]
    assert 2 <= len(saved.done_batches) < len(batches)
    assert (sorted((r["task_id"], r["sample_index"]) for r in saved.records)
            == sorted((t, s) for i in saved.done_batches for t, s in batches[i]))
    generated = []
    real = Generator.generate_queue

    def counting(self, items, *args, **kwargs):
        generated.extend((t, s) for t, s, _ in items)
        return real(self, items, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate_queue", counting)
    resumed = build(run_dir, **extra)
    assert sorted(generated) == sorted((t, s) for i, b in enumerate(batches) if i not in saved.done_batches
                                       for t, s in b)
    assert comparable(resumed) == comparable(whole)


@pytest.mark.slow
def test_resume_keeps_the_saved_schedule(tmp_path, monkeypatch, capsys):
    """A sampled build started on 'batches' and resumed where the setting resolves to 'queue' (auto, or asked
    for) finishes on 'batches', so its records are the uninterrupted batches build's; a plan saved without a
    schedule ran 'batches'."""
    extra = {**SAMPLED, "generation.schedule": "batches"}
    whole = build(tmp_path / "whole", **extra)
    queued = build(tmp_path / "queued", **SAMPLED)
    assert comparable(queued) != comparable(whole)           # the two schedules sample differently
    for name, resume_with in (("auto", "auto"), ("asked", "queue"), ("unrecorded", "auto")):
        run_dir = tmp_path / name
        interrupt_after(monkeypatch, 2)
        with pytest.raises(BuildInterrupted):
            build(run_dir, **extra)
        monkeypatch.undo()
        run = RunDir.at(run_dir)
        if name == "unrecorded":                               # a plan written before schedules were recorded
            plan = plan_of(run_dir)
            del plan["schedule"]
            run.batch_plan.write_text(json.dumps(plan))
        capsys.readouterr()
        resumed = build(run_dir, **{**SAMPLED, "generation.schedule": resume_with})
        assert comparable(resumed) == comparable(whole), name
        assert json.loads(run.marker("build").read_text())["schedule"] == "batches"
        assert ("keeps that one" in capsys.readouterr().err) == (resume_with == "queue")


def test_a_saved_queue_plan_is_not_resumed_on_the_hf_backend(greedy, tmp_path):
    """Refused before anything is written: the hf backend cannot run the queue the plan was made for."""
    import shutil

    queue_dir, _ = greedy["auto"]
    run_dir = tmp_path / "run"
    shutil.copytree(queue_dir, run_dir)
    run = RunDir.at(run_dir)
    run.clear_done("build")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="'queue' schedule.*generation.backend=fast"):
        build(run_dir, **{"generation.backend": "hf"})
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_schedule_settings_are_checked(tiny_model_dir, tmp_path, capsys):
    from pva_sae.model.fastgen import FastGenError

    with pytest.raises(ConfigError, match="generation.schedule must be auto, batches or queue"):
        settings(tmp_path / "r", **{"generation.schedule": "waves"})
    with pytest.raises(ConfigError, match="schedule='queue'.*generation.backend=fast"):
        settings(tmp_path / "r", **{"generation.schedule": "queue", "generation.backend": "hf"})
    # 'auto' resolves to hf on CPU: a queue asked for there is refused by name
    with pytest.raises(FastGenError, match="generation.schedule='queue'.*resolved to 'hf'"):
        build(tmp_path / "auto", **{"model.name": tiny_model_dir, "generation.backend": "auto",
                                    "generation.schedule": "queue", "data.end_idx": 1})
    # the hf backend keeps the batches schedule, and the announce line says it
    build_dataset(settings(tmp_path / "hf", **{"model.name": tiny_model_dir, "generation.backend": "hf",
                                               "data.end_idx": 1, "generation.max_new_tokens": 4}),
                  interactive=False, progress=True)
    assert plan_of(tmp_path / "hf")["schedule"] == "batches"
    assert "batch by batch (schedule 'batches')" in capsys.readouterr().err
    build_dataset(settings(tmp_path / "fast", **{"model.name": tiny_model_dir, "data.end_idx": 1,
                                                 "generation.max_new_tokens": 4}), interactive=False, progress=True)
    err = capsys.readouterr().err
    assert "continuous batching (schedule 'queue'" in err and "schedule=queue" in err


@pytest.mark.gpu
def test_gpu_queue_build_equals_batches_build_in_float32_and_is_faster(tmp_path):
    """CUDA graphs, float32: the build's queue gives the batches schedule's greedy records exactly, in less
    generation time (rows that ended stop costing decode steps). Prints both times."""
    from pva_sae.config import ModelConfig
    from pva_sae.model.registry import load_model

    loaded = load_model(ModelConfig(name="pva-tiny", device="cuda", dtype="float32"))
    gen_s, records = {}, {}
    for schedule in ("batches", "queue"):
        for attempt in ("warm-up", "timed"):                     # the first builds the graphs of its shapes
            run_dir = tmp_path / f"{schedule}-{attempt}"
            cfg = settings(run_dir, **{"model.device": "cuda", "data.end_idx": 79, "generation.batch_size": 16,
                                       "generation.max_new_tokens": 256, "generation.schedule": schedule,
                                       "checkpoint.every_n_records": 1000})
            records[schedule] = build_dataset(cfg, interactive=False, progress=False, loaded=loaded)
            gen_s[schedule] = json.loads(RunDir.at(run_dir).dataset_metadata.read_text())["timing"]["generation_s"]
    print(f"generation of 80 tasks x 256 tokens at most, float32: batches {gen_s['batches']:.2f} s, "
          f"queue {gen_s['queue']:.2f} s")
    assert comparable(records["queue"]) == comparable(records["batches"])
    assert gen_s["queue"] < gen_s["batches"]
