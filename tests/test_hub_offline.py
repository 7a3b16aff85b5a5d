"""The real-model path without the hub: `pva-sae run --model gemma-2-2b` offline against a tiny-scale hub
fixture (model through from_pretrained, SAEs through hf_hub_download, pile-10k through datasets), and the
errors a user meets when the cache lacks something.

Each command runs in a fresh process, because the hub clients read HF_HUB_OFFLINE and the cache paths
once, at import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from pva_sae.default.hub_fixture.build import build_hub_fixture
from pva_sae.default.hub_fixture.cache import repo_folder
from pva_sae.default.hub_fixture.gemmascope import repo_path

pytest.importorskip("datasets", reason="the pile-10k path goes through `datasets` (requirements.txt installs it)")

SMALL = ["data.end_idx=29", "generation.max_new_tokens=4", "analysis.general_n_docs=60", "model.device=cpu",
         "validation.temperatures=[0.0, 1.0]", "validation.robustness_max_tasks=3", "validation.samples_per_temperature=1",
         "validation.bootstrap_resamples=100", "validation.probe_cs=2", "steering.alpha_grid=[1.0]",
         "steering.refine_steps=0", "steering.tuning_max_tasks=3", "steering.max_tasks=3", "steering.n_controls=2",
         "steering.tuning_controls=1", "steering.n_permutations=100", "steering.bootstrap_resamples=100",
         "steering.control_max_separation=0.5"]

# build, plant labels (random weights solve nothing), then `run`, which resumes after the finished build
RUN = """
import sys
import types
from pva_sae.cli import main
from pva_sae.default.hub_fixture.labels import plant_labels
run_dir, args = sys.argv[1], sys.argv[2:]
if main(["build", "--quiet", "--run-dir", run_dir, *args]) != 0:
    sys.exit(1)
print("planted", plant_labels(run_dir))
sys.exit(main(["run", "--quiet", "--run-dir", run_dir, *args, "--set", "checkpoint.resume=auto"]))
"""

# several CLI calls in one process: [(argv, exit code, stderr tail)] as JSON on the last line of stdout
MANY = """
import contextlib, io, json, sys
from pva_sae.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    out.append([argv, code, err.getvalue()])
print(json.dumps(out))
"""


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _env(summary, root: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}  # no token, no user cache
    env.update(summary.environment())
    if root is not None:  # a copy of the fixture
        env.update({k: v.replace(str(summary.root), str(root)) for k, v in summary.environment().items()})
    env.update({"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    return env


def _python(code: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], check=False, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return build_hub_fixture(tmp_path_factory.mktemp("hubfix"), scale="tiny")


@pytest.fixture(scope="module")
def offline_run(hub, tmp_path_factory):
    work = tmp_path_factory.mktemp("offline_run")
    run_dir = work / "run"
    proc = _python(RUN, [str(run_dir), "--model", "gemma-2-2b", *_sets(SMALL + [f"analysis.cache_dir={work / 'c'}"])],
                   _env(hub), work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_fixture_has_the_hub_layout(hub):
    folder = repo_folder(hub.root / "hub", "google/gemma-2-2b")
    commit = (folder / "refs" / "main").read_text()
    assert commit == hub.commits["google/gemma-2-2b"] and len(commit) == 40
    snapshot = folder / "snapshots" / commit
    config = json.loads((snapshot / "config.json").read_text())
    assert (config["attn_logit_softcapping"], config["final_logit_softcapping"], config["sliding_window"]) == (
        50.0, 30.0, 4096)
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    assert "model.layers.3.mlp.down_proj.weight" in index["weight_map"] and "lm_head.weight" not in index["weight_map"]
    for shard in set(index["weight_map"].values()):  # every file is a relative link into blobs/
        link = snapshot / shard
        assert link.is_symlink() and link.resolve().parent == (folder / "blobs").resolve()
    sae = repo_folder(hub.root / "hub", "google/gemma-scope-2b-pt-res") / "snapshots" / hub.commits[
        "google/gemma-scope-2b-pt-res"] / repo_path(2, 141)
    with np.load(sae) as params:
        assert {k: params[k].shape for k in params} == {"W_enc": (64, 256), "W_dec": (256, 64), "b_enc": (256,),
                                                         "b_dec": (64,), "threshold": (256,)}
        assert all(params[k].dtype == np.float32 for k in params)
    # thresholds give the planned average L0 on calibration tokens: N * 256 / 1024 (141 -> ~35 latents)
    assert 0.5 * 141 / 4 < hub.mean_l0[2] < 2 * 141 / 4


def test_same_seed_same_fixture_other_seed_other_weights(hub, tmp_path):
    again = build_hub_fixture(tmp_path / "again", scale="tiny", n_docs=100)
    assert again.commits["google/gemma-2-2b"] == hub.commits["google/gemma-2-2b"]
    assert again.commits["google/gemma-scope-2b-pt-res"] == hub.commits["google/gemma-scope-2b-pt-res"]
    other = build_hub_fixture(tmp_path / "other", scale="tiny", seed=1, layers=[0], n_docs=100)
    assert other.commits["google/gemma-2-2b"] != hub.commits["google/gemma-2-2b"] and list(other.mean_l0) == [0]


def test_tokenizer_has_gemmas_special_ids_and_tokenizes_code(hub):
    from transformers import AutoTokenizer

    snapshot = repo_folder(hub.root / "hub", "google/gemma-2-2b") / "snapshots" / hub.commits["google/gemma-2-2b"]
    tok = AutoTokenizer.from_pretrained(snapshot)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, len(tok)) == (0, 1, 2, 1024)
    text = "def remove_Occ(s, ch):\n    return s.replace(ch, '')"
    ids = tok(text)["input_ids"]
    assert ids[0] == 2 and ids.count(2) == 1 and len(ids) < len(text) / 2  # merges, not bytes
    assert tok.decode(ids[1:]) == text


@pytest.mark.slow
def test_run_gemma_2_2b_offline_end_to_end(hub, offline_run):
    run_dir, proc = offline_run
    for stage in ("build:", "analyze:", "validate:", "steer:", "report:"):
        assert stage in proc.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert hub.commits["google/gemma-2-2b"] in json.dumps(manifest)  # from_pretrained resolved refs/main
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    assert summary["release"] == "gemma-scope-2b-pt-res" and summary["layers"] == [0, 1, 2, 3]
    sae = summary["saes"]["3"]  # hf_hub_download resolved the canonical file inside the fixture's snapshot
    assert sae["repo_path"] == repo_path(3, 59) and sae["path"].startswith(str(hub.root / "hub"))
    assert (sae["d_model"], sae["d_sae"]) == (64, 256)
    assert summary["general"]["source"] == "pile-10k" and summary["general"]["n_docs"] == 60  # via datasets
    # the override declares the fixture's shapes, so the registry's n_layers/d_model check is silent
    assert "registry override" in proc.stderr and "registry entry" not in proc.stderr


def _defective_copy(hub, base: Path) -> Path:
    """A copy of the fixture whose layer-1 SAE is missing, layer-2 SAE has 128 latents, layer-3 SAE d_model 32."""
    root = base / "fix"
    shutil.copytree(hub.root, root, symlinks=True)
    snapshot = repo_folder(root / "hub", "google/gemma-scope-2b-pt-res") / "snapshots" / hub.commits[
        "google/gemma-scope-2b-pt-res"]
    (snapshot / repo_path(1, 102)).unlink()
    rng = np.random.default_rng(0)
    for layer, l0, (d_model, d_sae) in ((2, 141, (64, 128)), (3, 59, (32, 256))):
        link = snapshot / repo_path(layer, l0)
        blob = link.resolve()
        link.unlink()
        blob.unlink()
        arrays = {"W_enc": rng.normal(size=(d_model, d_sae)), "W_dec": rng.normal(size=(d_sae, d_model)),
                  "b_enc": np.zeros(d_sae), "b_dec": np.zeros(d_model), "threshold": np.ones(d_sae)}
        with open(link, "wb") as f:
            np.savez(f, **{k: v.astype(np.float32) for k, v in arrays.items()})
    return root


@pytest.mark.slow
def test_errors_a_user_meets_offline(hub, offline_run, tmp_path):
    run_dir, _ = offline_run
    root = _defective_copy(hub, tmp_path)
    work = tmp_path / "runs"
    shutil.copytree(run_dir, work)
    common = ["--quiet", "--run-dir", str(work), *_sets(SMALL + [f"analysis.cache_dir={tmp_path / 'c'}"])]
    calls = [
        ["download", "--check", "--model", "gemma-2-2b", *_sets(["analysis.layers=[0]"])],  # complete for layer 0
        ["download", "--check", "--model", "gemma-2-2b"],
        ["analyze", *common, *_sets(["analysis.layers=[1]"])],
        ["analyze", *common, *_sets(["analysis.layers=[2]"])],
        ["analyze", *common, *_sets(["analysis.layers=[3]"])],
        ["build", "--quiet", "--run-dir", str(tmp_path / "r9"), "--model", "gemma-2-9b"],
        ["build", "--quiet", "--run-dir", str(tmp_path / "rv"), "--model", "gemma-2-2b",
         *_sets(["model.revision=" + "0" * 40])],
    ]
    proc = _python(MANY, [json.dumps(calls)], _env(hub, root), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    codes = [code for _, code, _ in results]
    assert codes == [0, 2, 2, 2, 2, 2, 2], results
    errors = [err for _, _, err in results]
    assert "layer_1/width_16k/average_l0_102/params.npz is not in the cached snapshot" in errors[1]
    assert "pva-sae download --model gemma-2-2b" in errors[1]
    # a missing SAE file: what is missing, why the hub was not asked, how to get it
    assert ("layer_1/width_16k/average_l0_102/params.npz is not in the cached snapshot" in errors[2]
            and "HF_HUB_OFFLINE" in errors[2] and "pva-sae download" in errors[2])
    assert "has 128 latents but release 'gemma-scope-2b-pt-res' at width 16k has 256" in errors[3]
    assert "download it again" in errors[3]
    assert "SAE expects d_model 32 but the model has 64" in errors[4]
    # a gated model that was never downloaded: licence, login/token, then the download command
    gated = errors[5]
    assert "google/gemma-2-9b is not in the Hugging Face cache" in gated
    assert "licence" in gated and "huggingface-cli login" in gated and "HF_TOKEN" in gated
    assert "pva-sae download --model gemma-2-9b" in gated
    # a revision that is not cached names the cached one
    revision = errors[6]
    assert f"revision '{'0' * 40}' of google/gemma-2-2b is not in the Hugging Face cache" in revision
    assert f"main -> {hub.commits['google/gemma-2-2b'][:12]}" in revision
    assert all("Traceback" not in err for err in errors)


class FakeApi:
    """The three HfApi calls `pva-sae download` makes, answering as the hub does for these repositories."""

    def __init__(self):
        self.calls = []

    def model_info(self, repo_id, revision, files_metadata):
        self.calls.append(("model_info", repo_id, revision))
        names = ["config.json", "generation_config.json", "model-00001-of-00003.safetensors",
                 "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "README.md", ".gitattributes"]
        siblings = [types.SimpleNamespace(rfilename=n, size=1000 + i) for i, n in enumerate(names)]
        return types.SimpleNamespace(sha="a" * 40, siblings=siblings)

    def get_paths_info(self, repo_id, paths, revision):
        self.calls.append(("get_paths_info", repo_id, revision))
        return [types.SimpleNamespace(path=p, size=302_000_000) for p in paths]

    def dataset_info(self, repo_id, files_metadata):
        self.calls.append(("dataset_info", repo_id))
        return types.SimpleNamespace(sha="b" * 40, siblings=[types.SimpleNamespace(rfilename=n, size=s) for n, s in (
            ("README.md", 500), ("data/train-00000-of-00001-4746b8785c874cc7.parquet", 33_000_000))])


def test_download_lists_every_file_a_run_needs():
    from pva_sae.config import resolve_config
    from pva_sae.model.download import format_files, needed_files
    from pva_sae.model.registry import registry_entry

    api = FakeApi()
    cfg = resolve_config(overrides=["model.name=gemma-2-2b", "analysis.layers=[0, 12, 25]"])
    files = needed_files(cfg, registry_entry("gemma-2-2b"), api=api)
    model = [f.filename for f in files if f.role == "model"]
    assert "README.md" not in model and ".gitattributes" not in model and len(model) == 10
    assert all(f.revision == "a" * 40 for f in files if f.role == "model")  # pinned to the resolved commit
    assert [f.filename for f in files if f.role == "sae"] == [repo_path(0, 105), repo_path(12, 82), repo_path(25, 116)]
    assert [f.repo_id for f in files if f.role == "corpus"] == ["NeelNanda/pile-10k"] * 2
    lines = format_files(files)
    assert "sae: 3 files, 0.91 GB" in lines and lines[-1].startswith("total: 15 files")
    assert ("model_info", "google/gemma-2-2b", "main") in api.calls


def test_download_refuses_the_embedded_model():
    from pva_sae.config import resolve_config
    from pva_sae.errors import InputError
    from pva_sae.model.download import needed_files
    from pva_sae.model.registry import registry_entry

    with pytest.raises(InputError, match="embedded model"):
        needed_files(resolve_config(overrides=["model.name=pva-tiny"]), registry_entry("pva-tiny"), api=FakeApi())
