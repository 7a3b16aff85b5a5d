"""Sharded builds: assignment by key, the merge's refusals, and on the embedded default model, two gloo
ranks (torchrun) and independent shards (--shard I/N) writing exactly the single-process dataset."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pva_sae import cli
from pva_sae.config import resolve_config
from pva_sae.errors import InputError
from pva_sae.rundir.paths import RunDir
from pva_sae.rundir.shards import (
    Shard,
    ShardMergeError,
    ShardsPending,
    assign,
    merge_parts,
    parse_shard,
    part_path,
    publish_once,
    read_parts,
    write_part,
)
from pva_sae.stages.build import build_dataset

TIMING_FIELDS = {"gen_time_s", "exec_time_s"}     # wall-clock measurements; every other field must be identical
N_TASKS = 4


def settings(run_dir, **extra) -> list[str]:
    """The embedded default model at a tiny size: 4 tasks, one sample each, one per batch (4 batches)."""
    items = {"output.run_dir": run_dir, "data.start_idx": 0, "data.end_idx": N_TASKS - 1,
             "generation.max_new_tokens": 8, "generation.batch_size": 1, "checkpoint.every_n_records": 1,
             "sandbox.timeout_s": 5, "sandbox.workers": 1, "checkpoint.resume": "auto", **extra}
    return [f"{k}={v}" for k, v in items.items()]


def set_args(run_dir, **extra) -> list[str]:
    return [arg for item in settings(run_dir, **extra) for arg in ("--set", item)]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def metadata_without_timing(metadata):
    """Without timing, without the sandbox counters of the session (a resumed build, sharded or not, counts
    only the jobs it ran itself) and without the process's torch thread count (torchrun sets OMP_NUM_THREADS=1
    in each rank; the records do not depend on it)."""
    out = {k: v for k, v in metadata.items() if k != "timing"}
    out["sandbox"] = {k: v for k, v in out["sandbox"].items() if k != "this_session"}
    if "model" in out:
        out["model"] = {k: v for k, v in out["model"].items() if k != "torch_threads"}
    return out


def assert_same_dataset(run_dir, reference_dir):
    """Records identical apart from timing fields, in the same order, in JSON and Parquet; metadata too."""
    got, want = (json.loads(RunDir.at(d).dataset_json.read_text()) for d in (run_dir, reference_dir))
    assert without_timing(got["records"]) == without_timing(want["records"])
    assert metadata_without_timing(got["metadata"]) == metadata_without_timing(want["metadata"])
    tables = [pq.read_table(RunDir.at(d).dataset_parquet) for d in (run_dir, reference_dir)]
    columns = [c for c in tables[1].column_names if c not in TIMING_FIELDS]
    assert tables[0].select(columns).equals(tables[1].select(columns))


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")


# --------------------------------------------------------------------------- assignment and merge (no model)

def test_parse_shard():
    assert parse_shard("1/4") == Shard(1, 4)
    assert str(parse_shard(" 0 / 2 ")) == "0/2"
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(InputError, match="I/N"):
            parse_shard(bad)


def test_assignment_is_a_function_of_the_keys_alone_and_balanced():
    keys = [(t, s) for t in (11, 3, 7, 5, 2) for s in range(3)]
    owner = assign(keys, 4)
    assert assign(list(reversed(keys)), 4) == owner                 # plan order does not matter
    sizes = [sum(1 for v in owner.values() if v == i) for i in range(4)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(keys)
    assert [owner[k] for k in sorted(keys)[:5]] == [0, 1, 2, 3, 0]
    with pytest.raises(InputError, match="task 3 sample 1 appears twice"):
        assign([(3, 1), (3, 1)], 2)


def test_publish_once_keeps_the_first_body(tmp_path):
    path = tmp_path / "plan.json"
    assert publish_once(path, {"batches": [[1, 0]]}) == {"batches": [[1, 0]]}
    assert publish_once(path, {"batches": [[2, 0]]}) == {"batches": [[1, 0]]}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]    # no temp file left behind


def _parts(tmp_path, units_of, count):
    run = RunDir(tmp_path / "run")
    for index, units in units_of.items():
        shard = Shard(index, count)
        write_part(run, "build", shard, units, [{"task_id": t, "sample_index": s} for t, s in units], {})
    return run


def test_merge_sorts_by_key_and_names_missing_and_duplicated_keys(tmp_path):
    plan = [(1, 0), (2, 0), (3, 0), (4, 0)]                          # shard 0: tasks 1, 3; shard 1: tasks 2, 4
    def key(r):
        return r["task_id"], r["sample_index"]

    run = _parts(tmp_path / "a", {1: [(4, 0), (2, 0)], 0: [(3, 0), (1, 0)]}, 2)
    merged = merge_parts(read_parts(run, "build"), plan, 2, key, "build --shard {shard}")
    assert [r["task_id"] for r in merged] == [1, 2, 3, 4]

    run = _parts(tmp_path / "b", {0: [(1, 0), (3, 0)]}, 2)
    with pytest.raises(ShardMergeError, match=r"task 2 sample 0 is missing .*shard 1/2 .*build --shard 1/2"):
        merge_parts(read_parts(run, "build"), plan, 2, key, "build --shard {shard}")

    run = _parts(tmp_path / "c", {0: [(1, 0), (3, 0)], 1: [(2, 0), (4, 0)]}, 2)
    write_part(run, "build", Shard(2, 3), [(3, 0)], [{"task_id": 3, "sample_index": 0}], {})
    with pytest.raises(ShardMergeError, match=r"task 3 sample 0 is duplicated: in .*shard_0_of_2.* and in .*shard_2_of_3"):
        merge_parts(read_parts(run, "build"), plan, 2, key, "build --shard {shard}")

    run = _parts(tmp_path / "d", {0: [(1, 0), (3, 0), (9, 0)], 1: [(2, 0), (4, 0)]}, 2)
    with pytest.raises(ShardMergeError, match="task 9 sample 0, which is not in the saved plan"):
        merge_parts(read_parts(run, "build"), plan, 2, key, "build --shard {shard}")


def test_torchrun_environment_joins_a_gloo_group(monkeypatch):
    from pva_sae.execution import distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    try:
        shard = distributed.shard_of(resolve_config(overrides=["model.device=cpu"]))
        assert shard == Shard(0, 1, group=True)
        assert distributed.dist.get_backend() == "gloo"
        distributed.barrier(shard)
    finally:
        distributed.leave_group()
    explicit = distributed.shard_of(resolve_config(overrides=["distributed.shard=1/3"]))
    assert explicit == Shard(1, 3, group=False)                      # --shard wins over the environment


# --------------------------------------------------------------------------- the embedded default model

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    records = build_dataset(resolve_config(overrides=settings(run_dir)), interactive=False, progress=False)
    assert len(records) == N_TASKS
    return run_dir


@pytest.fixture(scope="module")
def torchrun_run(reference, tmp_path_factory) -> Path:
    """Two gloo ranks of ``torchrun --standalone --nproc-per-node 2 -m pva_sae build``."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pva_sae", "build", "--quiet", *set_args(run_dir)],
                          env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_two_gloo_ranks_write_the_single_process_dataset(torchrun_run, reference):
    run = RunDir.at(torchrun_run)
    assert_same_dataset(torchrun_run, reference)
    counters = json.loads(run.dataset_metadata.read_text())["sandbox"]["this_session"]
    assert counters["jobs"] == N_TASKS                              # both ranks' counters, summed
    parts = read_parts(run, "build")
    assert [(p["shard"], p["count"], len(p["units"])) for p in parts] == [(0, 2, 2), (1, 2, 2)]
    plan = json.loads(run.batch_plan.read_text())["batches"]
    assert plan == json.loads(RunDir.at(reference).batch_plan.read_text())["batches"]
    assert json.loads(run.marker("build").read_text())["shards"]["count"] == 2


@pytest.mark.slow   # needs the two-rank torchrun build
def test_merge_refuses_a_duplicated_or_missing_shard_naming_its_key(torchrun_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(torchrun_run, run_dir)
    run = RunDir.at(run_dir)
    run.clear_done("build")
    first = read_parts(run, "build")[0]
    stray = Shard(2, 3)                                             # a part of another shard count, same unit
    write_part(run, "build", stray, [first["units"][0]], first["records"][:1], {})
    assert cli.main(["merge", str(run_dir)]) == cli.EXIT_USER_ERROR
    task, sample = first["units"][0]
    assert f"task {task} sample {sample} is duplicated" in capsys.readouterr().err
    assert not run.is_done("build")

    shutil.rmtree(part_path(run, "build", stray).parent)
    missing = read_parts(run, "build")[1]
    part_path(run, "build", Shard(1, 2)).unlink()
    assert cli.main(["merge", str(run_dir)]) == cli.EXIT_USER_ERROR
    task, sample = missing["units"][0]
    err = capsys.readouterr().err
    assert f"task {task} sample {sample} is missing" in err and "--shard 1/2" in err

    write_part(run, "build", Shard(1, 2), missing["units"], missing["records"], missing["info"])
    assert cli.main(["merge", str(run_dir)]) == 0
    assert_same_dataset(run_dir, torchrun_run)


@pytest.mark.slow   # three builds in their own processes
def test_a_killed_shard_resumes_and_the_last_shard_merges(reference, tmp_path):
    run_dir = tmp_path / "run"
    run = RunDir.at(run_dir)
    shard1 = RunDir(run.root / "shards" / "build" / "shard_1_of_2")
    args = [sys.executable, "-m", "pva_sae", "build", "--quiet", "--shard", "1/2", *set_args(run_dir)]
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (shard1.checkpoints.is_dir() and any(shard1.checkpoints.glob("checkpoint_*.json"))):
        assert time.monotonic() < deadline and proc.poll() is None, "shard 1/2 ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not part_path(run, "build", Shard(1, 2)).exists(), "shard 1/2 finished before it could be killed"

    cfg0 = resolve_config(overrides=settings(run_dir, **{"distributed.shard": "0/2"}))
    with pytest.raises(ShardsPending, match="shard 0/2 .* is done; shard\\(s\\) 1 of 2 are not"):
        build_dataset(cfg0, interactive=False, progress=False)
    part0 = part_path(run, "build", Shard(0, 2))
    stamp = part0.stat().st_mtime_ns
    with pytest.raises(ShardsPending):                              # a finished shard is never redone
        build_dataset(cfg0, interactive=False, progress=False)
    assert part0.stat().st_mtime_ns == stamp

    resumed = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert run.is_done("build")                                     # the last shard to finish merged
    assert_same_dataset(run_dir, reference)


@pytest.mark.gpu
def test_torchrun_on_every_gpu_writes_the_single_process_dataset(tmp_path):
    """NCCL, one rank per GPU (``--nproc-per-node 1`` on a one-GPU machine runs the same code path): the
    batches are the saved plan's, whole, so even in bfloat16 each is generated as in one process."""
    import torch

    single, ranks = tmp_path / "single", tmp_path / "ranks"
    build_dataset(resolve_config(overrides=settings(single, **{"model.device": "cuda"})), interactive=False,
                  progress=False)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(torch.cuda.device_count()), "-m", "pva_sae", "build", "--quiet",
                           *set_args(ranks, **{"model.device": "cuda"})],
                          env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nccl" in json.loads(RunDir.at(ranks).marker("build").read_text())["shards"]["backend"]
    assert_same_dataset(ranks, single)


@pytest.mark.slow   # the analysed run of test_steer, then steering in one process and on two ranks
def test_steering_conditions_spread_over_two_gloo_ranks_give_the_same_results(analysed, tmp_path_factory):
    from test_steer import SMALL_STEER, _steer_copy
    from test_validate import copy_run

    from pva_sae.rundir.paths import SteeringPaths
    from pva_sae.stages.validate import validate

    _, single, expected = _steer_copy(analysed, tmp_path_factory, "steer-single")
    dest = tmp_path_factory.mktemp("steer-ranks") / "run"
    validate(copy_run(analysed, dest), progress=False)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pva_sae", "steer", "--quiet", "--run-dir", str(dest),
                           *[arg for item in SMALL_STEER for arg in ("--set", item)]],
                          env=env(), capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = (json.loads(SteeringPaths.of(r).results.read_text()) for r in (RunDir.at(dest), single))
    assert expected["experiments"] and got["experiments"] == want["experiments"]
    assert got["directions"] == want["directions"]
    assert (pq.read_table(SteeringPaths.of(RunDir.at(dest)).tasks).to_pylist()
            == pq.read_table(SteeringPaths.of(single).tasks).to_pylist())
    logs = "".join(p.read_text() for p in RunDir.at(dest).logs.glob("steer_*.log"))
    shares = re.findall(r"rank (\d) of 2 generates (\d+) of (\d+) conditions", logs)
    assert {rank for rank, _, _ in shares} == {"0", "1"}               # both ranks generated conditions
    assert all(int(mine) < int(total) for _, mine, total in shares if int(total) > 1)


@pytest.mark.slow
def test_a_temperature_sub_build_of_validation_is_sharded_the_same_way(reference, tmp_path):
    """The validation stage's sub-builds call the build's function, so --shard splits and merges them too."""
    from pva_sae.rundir.artifacts import read_saved_records
    from pva_sae.rundir.paths import ValidationPaths
    from pva_sae.stages.validate import temperature_records

    runs = {name: tmp_path / name for name in ("single", "sharded")}
    for path in runs.values():
        shutil.copytree(reference, path)
    main_records = read_saved_records(RunDir.at(runs["single"]))
    ids = sorted({r["task_id"] for r in main_records})
    extra = {"validation.samples_per_temperature": 2}

    def sub(name, **more):
        cfg = resolve_config(overrides=settings(runs[name], **extra, **more))
        return temperature_records(cfg, ValidationPaths.of(RunDir.at(runs[name])), 0.8, ids, main_records, False)

    single, _ = sub("single")
    with pytest.raises(ShardsPending):
        sub("sharded", **{"distributed.shard": "1/2"})
    sharded, _ = sub("sharded", **{"distributed.shard": "0/2"})
    assert len(single) == 2 * len(ids) and without_timing(sharded) == without_timing(single)
    subs = [next((runs[name] / "validation" / "temperature").iterdir()) for name in ("single", "sharded")]
    assert subs[0].name == subs[1].name                             # the shard setting is no record field
    assert_same_dataset(subs[1], subs[0])
    assert (subs[1] / "shards" / "build" / "shard_1_of_2" / "part.json").is_file()
