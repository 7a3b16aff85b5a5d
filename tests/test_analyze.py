"""End-to-end SAE analysis on CPU: tiny random Gemma-2, tiny GemmaScope-format SAEs, local general corpus."""

import json

import numpy as np
import pytest

from pva_sae.analyze import AnalysisPaths, analyze
from pva_sae.build import build_dataset
from pva_sae.config import resolve_config
from pva_sae.rundir import RunDir, atomic_write_json
from pva_sae.sae import save_gemmascope_npz

D_SAE = 96


def make_saes(folder, n_layers, d_model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in range(n_layers):
        w_dec = rng.normal(size=(D_SAE, d_model)).astype(np.float32)
        w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
        save_gemmascope_npz(folder / f"layer_{layer}" / "params.npz", W_enc=w_dec.T.copy(), W_dec=w_dec,
                            b_enc=np.zeros(D_SAE, np.float32), b_dec=np.zeros(d_model, np.float32),
                            threshold=np.full(D_SAE, 0.05, np.float32))


@pytest.fixture(scope="module")
def analysed(tiny_model_dir, tmp_path_factory):
    from transformers import AutoConfig

    base = tmp_path_factory.mktemp("analyze")
    run_dir = base / "run"
    common = [f"model.name={tiny_model_dir}", f"output.run_dir={run_dir}", "checkpoint.resume=auto"]
    build_dataset(resolve_config(overrides=common + ["data.end_idx=29", "generation.max_new_tokens=4",
                                                     "generation.batch_size=10"]), progress=False)
    run = RunDir.at(run_dir)
    dataset = json.loads(run.dataset_json.read_text())
    for record in dataset["records"]:  # a random model solves nothing: plant labels to exercise both classes
        record["passed"] = record["task_id"] % 3 == 0
    atomic_write_json(run.dataset_json, dataset)

    hf = AutoConfig.from_pretrained(tiny_model_dir)
    make_saes(base / "saes", hf.num_hidden_layers, hf.hidden_size)
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}  # doc {i}"}) + "\n"
                              for i in range(25)))
    cfg = resolve_config(overrides=common + [
        "analysis.sae_release=local", f"analysis.sae_local_dir={base / 'saes'}",
        f"analysis.general_corpus={corpus}", f"analysis.cache_dir={base / 'cache'}", "analysis.top_k=5",
        "analysis.general_max_frequency=0.5"])
    summary = analyze(cfg, progress=False)
    return cfg, run, summary, hf


def test_outputs_exist(analysed):
    cfg, run, summary, hf = analysed
    paths = AnalysisPaths.of(run)
    for path in (paths.activations, paths.scores, paths.ranked_parquet, paths.ranked_json, paths.summary,
                 paths.plots / "frequency_scatter.png", paths.plots / "top_latent_histograms.png"):
        assert path.is_file() and path.stat().st_size > 0, path
    assert run.is_done("analyze")
    assert summary["layers"] == list(range(hf.num_hidden_layers))
    assert summary["n_correct"] + summary["n_incorrect"] == summary["n_tasks"]
    assert summary["n_correct"] > 0 and summary["n_incorrect"] > 0
    assert summary["general"]["n_docs"] == 25


def test_only_sae_split_is_scored(analysed):
    cfg, run, summary, _ = analysed
    splits = json.loads(run.splits.read_text())["splits"]
    built = {r["task_id"] for r in json.loads(run.dataset_json.read_text())["records"]}
    assert summary["n_tasks"] == len(built & set(splits["sae"]))


def test_ranked_table_respects_filter_and_order(analysed):
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    cfg, run, summary, hf = analysed
    table = pq.read_table(AnalysisPaths.of(run).ranked_parquet).to_pylist()
    assert {r["direction"] for r in table} == {"correct", "incorrect"}
    assert all(r["general_frequency"] < 0.5 for r in table)
    overall = [r for r in table if r["scope"] == "overall" and r["metric"] == "separation"
               and r["direction"] == "correct"]
    assert [r["rank"] for r in overall] == list(range(1, len(overall) + 1))
    values = [r["sep_correct"] for r in overall]
    assert values == sorted(values, reverse=True)
    scores = load_file(str(AnalysisPaths.of(run).scores))
    best = max(float(scores[f"sep_correct/layer_{layer}"].max()) for layer in range(hf.num_hidden_layers))
    assert overall[0]["sep_correct"] <= best + 1e-6


def test_rerun_uses_general_cache(analysed):
    cfg, run, summary, _ = analysed
    again = analyze(cfg, progress=False)
    assert again["general"]["cached"] is True
    assert again["top"] == summary["top"]
