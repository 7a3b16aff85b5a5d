"""scripts/bench_study.py: per-stage rows, the profile of each stage, and a row for an interrupted stage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_study.py"
SMALL = ["--set", "data.end_idx=3", "--set", "generation.max_new_tokens=12", "--set", "generation.batch_size=2",
         "--set", "sandbox.timeout_s=5"]


def bench(tmp_path, *args, code=None):
    """Run the script in its own process (it wraps the stages' functions for timing)."""
    if code is None:
        argv = [sys.executable, str(SCRIPT), *args]
    else:       # a stage replaced before main() runs, to exercise the interrupted path
        argv = [sys.executable, "-c", code, str(SCRIPT), *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)


@pytest.mark.slow
def test_a_profiled_build_writes_its_row_pstats_and_top_functions(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    done = bench(tmp_path, "--run-dir", str(tmp_path / "run"), "--model", str(tiny_model_dir), "--size", "default",
                 "--stages", "build", "--profile", str(tmp_path / "prof"), "--json", str(out), *SMALL)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(out.read_text())["stages"]["build"]
    assert row["samples"] == 4 and row["programs"] == 4 and row["seconds"] > 0
    assert 1 <= row["sandbox"]["runs"] <= 4 and row["sandbox"]["reruns"] <= row["sandbox"]["runs"]
    assert row["sandbox"]["timeouts"] <= 4
    assert row["rerun_rounds"] >= 0 and row["rerun_rounds_s"] >= 0
    assert (tmp_path / "prof" / "build.pstats").stat().st_size > 0
    top = row["profile_top"]
    assert top["cumulative"][0].startswith("ncalls") and len(top["cumulative"]) > 10
    assert any("(build_dataset)" in line for line in top["cumulative"])
    assert top["tottime"][0].startswith("ncalls")


@pytest.mark.slow
def test_an_interrupted_stage_still_gets_a_row_and_the_script_fails(tiny_model_dir, tmp_path):
    code = ("import runpy, sys; import pva_sae.stages.build as b\n"
            "def stop(*a, **k): raise KeyboardInterrupt\n"
            "b.build_dataset = stop\n"
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    out = tmp_path / "sub" / "bench.json"
    done = bench(tmp_path, "--run-dir", str(tmp_path / "run"), "--model", str(tiny_model_dir), "--size", "default",
                 "--stages", "build,analyze", "--json", str(out), *SMALL, code=code)
    assert done.returncode != 0
    assert "build     interrupted after" in done.stdout
    stages = json.loads(out.read_text())["stages"]
    assert list(stages) == ["build"] and stages["build"]["interrupted"] == "KeyboardInterrupt"
