"""End-to-end SAE analysis on CPU: tiny random Gemma-2, tiny GemmaScope-format SAEs, local general corpus."""

import json

from pva_sae.rundir.paths import AnalysisPaths
from pva_sae.stages.analyze import analyze


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
