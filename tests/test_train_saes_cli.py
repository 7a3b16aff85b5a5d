"""`pva-sae train-saes`: SAEs for a model without published ones, in the layout the 'local' release reads."""

import json

import pytest

from pva_sae.cli import main
from pva_sae.config import resolve_config
from pva_sae.sae.registry import load_layer_sae


def test_train_saes_writes_local_release_files_the_analysis_loads(tmp_path, capsys):
    out = tmp_path / "saes"
    rc = main(["train-saes", "--quiet", "--layers", "1,3", "--out", str(out), "--d-sae", "32", "--steps", "4",
               "--max-docs", "60", "--max-tokens", "32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "analysis.sae_release=local" in printed and str(out) in printed
    summary = json.loads((out / "training.json").read_text())
    assert summary["layers"] == [1, 3] and summary["sae"]["d_sae"] == 32 and summary["n_documents"] == 60
    cfg = resolve_config(overrides=["analysis.sae_release=local", f"analysis.sae_local_dir={out}"])
    sae = load_layer_sae(cfg, "local", 3, d_model=256)
    assert tuple(sae.W_dec.shape) == (32, 256)


def test_train_saes_refuses_a_layer_the_model_does_not_have(tmp_path, capsys):
    assert main(["train-saes", "--quiet", "--layers", "0,99", "--out", str(tmp_path / "s"), "--steps", "1"]) == 2
    assert "layers [99] do not exist" in capsys.readouterr().err


def test_train_saes_refuses_to_overwrite_saes(tmp_path, capsys):
    (tmp_path / "layer_0").mkdir()
    (tmp_path / "layer_0" / "params.npz").write_bytes(b"x")
    assert main(["train-saes", "--quiet", "--layers", "0", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "already holds SAEs" in capsys.readouterr().err


@pytest.mark.parametrize("layers", ["a,b", "1;2"])
def test_train_saes_names_a_malformed_layer_list(tmp_path, capsys, layers):
    assert main(["train-saes", "--quiet", "--layers", layers, "--out", str(tmp_path / "s")]) == 2
    assert "--layers" in capsys.readouterr().err
