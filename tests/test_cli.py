"""The command line: help on a bare call, one-line errors for the project's own error types, tracebacks
for bugs, silence under --quiet, and messages that name the file, line or field to fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pva_sae.cli import EXIT_USER_ERROR, main
from pva_sae.config import resolve_config
from pva_sae.data.mbpp import DataError, load_tasks
from pva_sae.errors import PvaSaeError
from pva_sae.execution.dataset import prepare_run


def test_bare_command_prints_help_and_starts_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == EXIT_USER_ERROR
    assert "usage: pva-sae" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []                      # no run directory was made


def test_end_before_start_names_both_fields(capsys, tmp_path):
    assert main(["build", "--start", "10", "--end", "5", "--run-dir", str(tmp_path / "r")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "end_idx (--end, inclusive) must be >= data.start_idx (--start)" in err and "start 10, end 5" in err


def test_a_truncated_config_json_names_the_file_and_the_recovery(tmp_path):
    cfg = resolve_config(overrides=[f"output.run_dir={tmp_path / 'run'}"])
    run = prepare_run(cfg)
    run.config.write_text(run.config.read_text()[:40])
    with pytest.raises(PvaSaeError, match=r"config\.json is not readable JSON.*damaged.*rerun"):
        prepare_run(cfg)


def test_a_bad_jsonl_line_is_named_with_its_number(tmp_path):
    rows = [json.dumps({"task_id": 1}), "", "{not json"]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"tasks\.jsonl, line 3: not valid JSON"):
        load_tasks(str(path))


def test_a_bug_keeps_its_traceback(monkeypatch):
    import pva_sae.cli as cli

    def broken(args):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setitem(cli.COMMANDS, "models", (broken, "x", []))
    with pytest.raises(ZeroDivisionError):
        main(["models"])


def test_user_errors_are_one_line_with_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pva_sae.cli", "report", "--run-dir", str(tmp_path / "none"),
                          "--set", "steering.target=nonsense"], capture_output=True, text=True)
    assert out.returncode == EXIT_USER_ERROR
    assert out.stderr.startswith("pva-sae: error:") and "Traceback" not in out.stderr


def test_quiet_silences_every_progress_bar(tmp_path, tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "pva_sae.cli", "build", "--quiet", "--model", str(tiny_model_dir),
                          "--run-dir", str(tmp_path / "r"), "--end", "2", "--set", "generation.max_new_tokens=2"],
                         capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "Loading weights" not in out.stderr and "it/s" not in out.stderr and "sample/s" not in out.stderr


def test_version_flag(capsys):
    import pva_sae

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"pva-sae {pva_sae.__version__}"
