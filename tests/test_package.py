import subprocess
import sys

import pytest


def test_import_is_cheap_and_silent():
    code = ("import sys, pva_sae, pva_sae.config, pva_sae.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert out.stderr == ""


def test_cli_help_lists_stages():
    out = subprocess.run([sys.executable, "-m", "pva_sae.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("run", "build", "config"):
        assert name in out.stdout


@pytest.mark.slow
def test_cli_config_typo_exits_2_with_message():
    out = subprocess.run([sys.executable, "-m", "pva_sae.cli", "config", "--set", "generation.temprature=1"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown config key(s) generation.temprature" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_cli_config_docs():
    out = subprocess.run([sys.executable, "-m", "pva_sae.cli", "config", "--docs"], capture_output=True, text=True,
                         check=True)
    assert "sandbox.timeout_s" in out.stdout and "Wall-clock limit" in out.stdout
