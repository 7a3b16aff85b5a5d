"""Stage 2, SAE analysis: which SAE latents separate correct from incorrect tasks?

Input: a finished build in the run directory. For every built task, the residual stream at the last
prompt token is captured at every analysed layer (one forward pass per batch) and saved; the
SAE-analysis split alone is then encoded with each layer's SAE and scored (firing frequencies,
separation scores and Welch t in both directions). Latents that fire on >= 2% of a general corpus are
excluded before ranking. The tuning and validation splits are captured but not read here.

Outputs under ``<run>/analysis/`` (paths in ``AnalysisPaths``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from pva_sae.config import DIRECTIONS, Config
from pva_sae.errors import InputError
from pva_sae.execution.dataset import announce
from pva_sae.hashing import sha256_json
from pva_sae.model.capture import capture_last_token
from pva_sae.model.generation import batch_token_budget
from pva_sae.model.registry import registry_entry, use_model
from pva_sae.plots import plot_analysis, plot_selection_landscape
from pva_sae.rundir.artifacts import (
    load_activations,
    load_records,
    read_splits,
    save_activations,
    save_ranked,
    save_scores,
    task_labels,
    task_prompts,
    write_neuronpedia_list,
)
from pva_sae.rundir.atomic import (
    atomic_write_json,
)
from pva_sae.rundir.fingerprints import (
    check_chain,
    check_run_config,
    file_digest,
    records_digest,
    sections_digest,
)
from pva_sae.rundir.logs import setup_logging
from pva_sae.rundir.paths import AnalysisPaths, RunDir
from pva_sae.sae.general_filter import general_frequencies, resolve_general_corpus
from pva_sae.sae.neuronpedia import layer_sharing, link_fn, neuronpedia_list, neuronpedia_source, quick_list_url
from pva_sae.sae.registry import LOCAL_RELEASE, load_layer_sae, release_entry, resolve_release
from pva_sae.stats.latents import rank_latents, score_layers, select_latents

log = logging.getLogger(__name__)

STAGE = "analyze"
UPSTREAM_FIELDS = ("model.name", "model.revision", "model.dtype", "data.source", "data.split_fractions",
                   "data.split_seed", "prompt")  # what the labels and splits were made with: must match the build


def capture_all(cfg: Config, loaded, records, layers, paths: AnalysisPaths, progress: bool):
    """Residuals at the last prompt token for every built task (cached in the run directory)."""

    prompts = task_prompts(records)
    task_ids = sorted(prompts)
    key = {"model": loaded.path_or_id, "revision": loaded.revision, "dtype": str(loaded.dtype),
           "prompts": sha256_json([prompts[t] for t in task_ids])}
    if paths.activations.is_file():
        acts, saved_ids, saved_layers, site, meta = load_activations(paths.activations)
        same = {k: meta.get(k) for k in key} == key
        if same and list(saved_ids) == task_ids and list(saved_layers) == list(layers) and site == cfg.analysis.site:
            log.info("reusing captured activations %s", paths.activations)
            return acts, task_ids
        log.info("captured activations %s are stale (another model, revision, dtype, prompts, tasks, layers or "
                 "site); capturing again", paths.activations)
    started = time.perf_counter()
    acts = capture_last_token(loaded.model, loaded.tokenizer, [prompts[t] for t in task_ids], layers=layers,
                              site=cfg.analysis.site, batch_size=cfg.analysis.batch_size, progress=progress,
                              max_batch_tokens=token_budget(cfg, loaded))
    save_activations(paths.activations, acts, task_ids, layers, cfg.analysis.site,
                     {**key, "seconds": f"{time.perf_counter() - started:.2f}"})
    return acts, task_ids


def token_budget(cfg: Config, loaded) -> int | None:
    return batch_token_budget(cfg.generation.max_batch_tokens, loaded.device)


def analyze(cfg: Config, progress: bool = True, *, loaded=None) -> dict[str, Any]:
    """Run the stage; returns the summary written to ``analysis/summary.json``. ``loaded`` reuses a model
    already in memory (a LoadedModel, or a callable returning one)."""

    run = RunDir.at(cfg.output.run_dir)
    records = load_records(str(run.root))
    check_run_config(run, STAGE, cfg.to_dict(), UPSTREAM_FIELDS)
    check_chain(run, STAGE)
    paths = AnalysisPaths.of(run)
    paths.root.mkdir(parents=True, exist_ok=True)
    setup_logging(run.log_file(STAGE))
    atomic_write_json(paths.config, cfg.to_dict())
    announce(STAGE, f"{len(task_prompts(records))} tasks: residuals at the last prompt token, SAE encoding, "
                    f"general-text filter ({cfg.analysis.general_n_docs} documents), ranking", progress)

    loaded = use_model(loaded, cfg.model)
    layers = list(cfg.analysis.layers) if cfg.analysis.layers is not None else list(range(loaded.n_layers))
    bad = [layer for layer in layers if not 0 <= layer < loaded.n_layers]
    if bad:
        raise InputError(f"analysis.layers {bad} out of range: the model has layers 0..{loaded.n_layers - 1}")
    entry = registry_entry(cfg.model.name)
    release = resolve_release(cfg, entry["key"] if entry else cfg.model.name)
    saes = {layer: load_layer_sae(cfg, release, layer, loaded.d_model) for layer in layers}
    sae_entry = None if release == LOCAL_RELEASE else release_entry(release)

    acts, task_ids = capture_all(cfg, loaded, records, layers, paths, progress)
    splits = read_splits(run)
    labels = task_labels(records)
    sae_ids = [t for t in task_ids if t in set(splits["sae"])]
    if not sae_ids:
        raise InputError("the build holds no task of the SAE-analysis split; build more tasks (data.start_idx/end_idx)")
    rows = [task_ids.index(t) for t in sae_ids]
    y = torch.tensor([labels[t] for t in sae_ids])
    if y.all() or not y.any():
        raise InputError(f"the SAE-analysis split has only {'correct' if y.all() else 'incorrect'} tasks "
                         f"({len(sae_ids)} tasks): separation needs both classes")

    corpus = resolve_general_corpus(cfg, entry)
    general, general_info = general_frequencies(
        loaded, saes, corpus, n_docs=cfg.analysis.general_n_docs, seed=cfg.analysis.general_seed,
        site=cfg.analysis.site, batch_size=cfg.analysis.batch_size, max_tokens=cfg.analysis.general_max_tokens,
        cache_dir=cfg.analysis.cache_dir, progress=progress, max_batch_tokens=token_budget(cfg, loaded))
    scores = score_layers(saes, acts[rows], y, layers)
    table = rank_latents(scores, general, cfg.analysis.general_max_frequency, cfg.analysis.top_k,
                         link=link_fn(sae_entry, {layer: saes[layer].meta for layer in layers}))
    # The general-text frequency of every latent is kept beside its scores: steering's control latents must
    # pass the same filter as the target.
    general = {layer: torch.as_tensor(general[layer]).float().cpu() for layer in layers}
    save_scores(paths, {layer: {**per, "general_frequency": general[layer]} for layer, per in scores.items()})
    save_ranked(paths, table)
    chosen = {role: select_latents(table, metric) for role, metric in
              (("predictor", cfg.validation.selection_metric), ("steering", cfg.steering.selection_metric))}
    if cfg.analysis.plots:
        plot_analysis(paths.plots, scores, table, saes, acts[rows], y, layers)
        plot_selection_landscape(paths.plots / "selection_landscape.png", scores, general,
                                 cfg.analysis.general_max_frequency, chosen)
    summary = {
        "release": release, "layers": layers, "site": cfg.analysis.site,
        "n_tasks": len(sae_ids), "n_correct": int(y.sum()), "n_incorrect": int((~y).sum()),
        "general": general_info, "general_max_frequency": cfg.analysis.general_max_frequency,
        "excluded_general": {str(layer): int((general[layer] >= cfg.analysis.general_max_frequency).sum())
                             for layer in layers},
        "saes": {str(layer): saes[layer].meta for layer in layers},
        "sharing": {str(layer): layer_sharing(sae_entry, saes[layer].meta) for layer in layers},
        "top": {d: [r for r in table if r["direction"] == d and r["scope"] == "overall"
                    and r["metric"] == "separation"][:5] for d in DIRECTIONS},
        "top_by_t": {d: [r for r in table if r["direction"] == d and r["scope"] == "overall"
                         and r["metric"] == "t"][:5] for d in DIRECTIONS},
        "chosen": chosen,
        "n_latents_scored": int(sum(int(per["t_correct"].numel()) for per in scores.values())),
        "filter_sensitivity": filter_sensitivity(scores, general),
    }
    summary["neuronpedia_list"] = export_neuronpedia(paths, cfg, release, sae_entry, saes, summary)
    atomic_write_json(paths.summary, summary)
    run.mark_done(STAGE, {"release": release, "n_tasks": len(sae_ids),
                          "inputs": {"records": records_digest(run), "model_revision": loaded.revision,
                                     "config": sections_digest(cfg.to_dict(), ("model", "prompt", "analysis")),
                                     "sae": {str(layer): saes[layer].meta.get("sha256") for layer in layers}},
                          "outputs": {name: file_digest(path) for name, path in
                                      (("activations", paths.activations), ("scores", paths.scores),
                                       ("ranked", paths.ranked_json))}})
    return summary


SENSITIVITY_CUTS = (0.01, 0.02, 0.05)


def filter_sensitivity(scores, general) -> dict[str, dict[str, dict[str, list[str]]]]:
    """The top 3 latents per (metric, direction) under general-filter cuts of 1%, 2% and 5%: does the
    choice hinge on the threshold?"""
    out = {}
    for cut in SENSITIVITY_CUTS:
        table = rank_latents(scores, general, cut, 3)
        out[f"{cut:g}"] = {m: {d: [f"L{r['layer']}:{r['latent']}" for r in table if r["scope"] == "overall"
                                   and r["metric"] == m and r["direction"] == d] for d in DIRECTIONS}
                           for m in ("t", "separation")}
    return out


def export_neuronpedia(paths: AnalysisPaths, cfg: Config, release: str, entry, saes, summary) -> dict[str, Any]:
    """The chosen and top latents as a Neuronpedia list (``analysis/neuronpedia.json``); empty when the
    release has no Neuronpedia pages (the embedded default, 'local' SAEs, non-canonical GemmaScope L0s)."""
    rows = [{**row, "role": f"{role} ({direction})"} for role, per in summary["chosen"].items()
            for direction, row in per.items()]
    rows += [row for key in ("top", "top_by_t") for direction in DIRECTIONS for row in summary[key][direction]]
    sources = {layer: neuronpedia_source(entry, sae.meta) for layer, sae in saes.items()}
    body = neuronpedia_list(f"pva-sae {cfg.model.name} {release}",
                            f"Latents separating correct from incorrect programs ({summary['n_tasks']} tasks, "
                            f"site {cfg.analysis.site}): the chosen predictor and steering latents, then the top "
                            f"{len(summary['top'][DIRECTIONS[0]])} per direction by separation and by Welch t.",
                            rows, sources)
    write_neuronpedia_list(paths, body)
    return {"file": paths.neuronpedia.name, "n_features": len(body["features"]), "quick_list": quick_list_url(body),
            "why_empty": None if body["features"] else f"release {release!r} has no Neuronpedia pages"}
