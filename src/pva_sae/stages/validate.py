"""Stage 3, statistical validation: do the chosen latents predict correctness on held-out tasks?

Order of work, so that nothing is chosen on the validation split:

1. the correct- and incorrect-predicting latents come from the analysis stage (SAE-analysis split,
   ``validation.selection_metric``); baselines are fitted on the same split; every threshold is
   F1-optimal on the tuning split; all of it is written to ``choices.json`` (frozen);
2. only then are the validation labels unsealed and every predictor scored on the validation split,
   with bootstrap intervals over tasks;
3. robustness: the validation split (or a seeded subset) is regenerated at every temperature with
   the build stage's machinery (batched, checkpointed, resumable: one sub-run directory per
   temperature), each sample labelled by execution; metrics use a cluster bootstrap over tasks
   (all samples of a task share one prompt activation); and metrics per difficulty bucket.

Outputs under ``<run>/validation/`` (paths in ``ValidationPaths``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from pva_sae.config import BUILD_SECTIONS, DIRECTIONS, Config, config_from_dict
from pva_sae.data import benchmarks
from pva_sae.data.mbpp import seeded_subset
from pva_sae.errors import InputError, MissingInputError
from pva_sae.execution.dataset import announce, build_labelled_dataset
from pva_sae.model.registry import load_once
from pva_sae.plots import plot_validation
from pva_sae.rundir.artifacts import (
    load_activations,
    load_ranked,
    load_records,
    read_splits,
    task_labels,
    write_choices,
    write_predictor_weights,
    write_validation_scores,
)
from pva_sae.rundir.atomic import atomic_write_json, read_json
from pva_sae.rundir.fingerprints import (
    SAE_FIELDS,
    check_chain,
    check_run_config,
    file_digest,
    sections_digest,
)
from pva_sae.rundir.logs import setup_logging
from pva_sae.rundir.paths import AnalysisPaths, RunDir, ValidationPaths
from pva_sae.rundir.transfer import transfer_base
from pva_sae.sae.registry import load_layer_sae
from pva_sae.stats.classify import bootstrap_metrics, paired_differences
from pva_sae.stats.latents import select_latents
from pva_sae.stats.predictors import Features, SealedLabels, fit_predictors, positive
from pva_sae.stats.transfer import compare_metrics, frozen_predictors, pass_rates, weights_table

log = logging.getLogger(__name__)

STAGE = "validate"
UPSTREAM_FIELDS = ("model.name", "model.revision", "model.dtype", "data.dataset", "data.source",
                   "data.split_fractions", "data.split_seed", "prompt", "generation.max_new_tokens",
                   "generation.stop_strings", "generation.top_p",
                   "generation.seed")  # what labels and splits were made with: as the build
ROBUST_PREDICTORS = ("latent", "probe", "majority")


# --------------------------------------------------------------------------- inputs

def load_features(run: RunDir, cfg: Config, layers_needed: list[int]):
    """Captured residuals of the analysis stage, and each needed layer's SAE."""

    apaths = AnalysisPaths.of(run)
    if not run.is_done("analyze"):
        raise MissingInputError(f"{run.root} has no finished analysis stage; run `pva-sae analyze --run-dir {run.root}`")
    acts, task_ids, layers, site, _ = load_activations(apaths.activations)
    summary = read_json(apaths.summary)
    feats = Features(acts.numpy().astype(np.float32), list(task_ids), list(layers))
    saes = {layer: load_layer_sae(cfg, summary["release"], layer, acts.shape[-1]) for layer in layers_needed}
    return feats, saes, summary


def _split_ids(run: RunDir, labels: dict[int, bool]) -> dict[str, list[int]]:
    splits = read_splits(run)
    out = {name: [t for t in ids if t in labels] for name, ids in splits.items()}
    for name, ids in out.items():
        if not ids:
            raise InputError(f"the build holds no task of the {name} split; build the full task range")
    return out


# --------------------------------------------------------------------------- evaluation

def evaluate(predictor, feats, task_ids, correct: np.ndarray, cfg: Config, clusters=None,
             scores: np.ndarray | None = None) -> dict[str, Any]:
    """Bootstrap metrics of one frozen predictor on labelled items (tasks, or samples with ``clusters``)."""

    v = cfg.validation
    s = predictor.score(feats, task_ids) if scores is None else scores
    y = positive(correct, predictor.direction)
    ci = bootstrap_metrics(s, y, predictor.threshold, clusters=clusters, n_resamples=v.bootstrap_resamples,
                           seed=v.bootstrap_seed, level=v.ci_level)
    return {**predictor.as_dict(), "n": int(len(y)), "n_positive": int(y.sum()),
            "metrics": {k: iv.as_dict() for k, iv in ci.items()}}


def _by_direction(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {d: [r for r in rows if r["direction"] == d] for d in DIRECTIONS}


def difficulty_results(predictors, feats, val_ids, y_val, difficulty: dict[int, str], cfg: Config):
    out = {}
    for bucket in ("easy", "medium", "hard"):
        ids = [t for t in val_ids if difficulty[t] == bucket]
        if not ids:
            out[bucket] = {"n": 0, "n_correct": 0, "rows": {}}
            continue
        y = y_val[[val_ids.index(t) for t in ids]]
        rows = [evaluate(p, feats, ids, y, cfg) for p in predictors if p.name in ROBUST_PREDICTORS]
        out[bucket] = {"n": len(ids), "n_correct": int(y.sum()), "rows": _by_direction(rows)}
    return out


def temperature_results(cfg: Config, run: RunDir, paths: ValidationPaths, predictors, feats, val_ids,
                        main_records, progress: bool, *, loaded=None) -> dict[str, Any]:

    v = cfg.validation

    ids = seeded_subset(val_ids, v.robustness_max_tasks, v.robustness_seed)
    out = {}
    for temperature in v.temperatures:
        records, source = temperature_records(cfg, paths, temperature, ids, main_records, progress, loaded=loaded)
        tasks = [r["task_id"] for r in records]
        correct = np.array([bool(r["passed"]) for r in records])
        rate = bootstrap_metrics(np.ones(len(correct)), correct, 0.5, clusters=tasks,  # precision = pass rate
                                 n_resamples=v.bootstrap_resamples, seed=v.bootstrap_seed, level=v.ci_level)["precision"]
        rows = []
        for p in predictors:
            if p.name not in ROBUST_PREDICTORS:
                continue
            per_task = dict(zip(ids, p.score(feats, ids)))
            rows.append(evaluate(p, feats, tasks, correct, cfg, clusters=tasks,
                                 scores=np.array([per_task[t] for t in tasks])))
        out[f"{temperature:g}"] = {"temperature": temperature, "n_tasks": len(set(tasks)), "n_samples": len(records),
                                   "pass_rate": rate.as_dict(), "source": source, "rows": _by_direction(rows)}
    return out


def temperature_records(cfg: Config, paths: ValidationPaths, temperature: float, ids: list[int], main_records,
                        progress: bool, *, loaded=None) -> tuple[list[dict[str, Any]], str]:
    """Labelled samples of ``ids`` at ``temperature``: the main build's own when it already is that greedy
    run, else a sub-run of the build stage under ``validation/temperature/t<T>`` (resumable)."""

    g = cfg.generation
    if temperature == 0 and g.temperature == 0:
        wanted = set(ids)
        return [r for r in main_records if r["task_id"] in wanted], "build stage (greedy)"
    import hashlib
    import json

    sub = cfg.to_dict()
    n = 1 if temperature == 0 else cfg.validation.samples_per_temperature
    sub["data"] = {**sub["data"], "task_ids": list(ids)}
    sub["generation"] = {**sub["generation"], "temperature": temperature, "n_samples": n}
    key = hashlib.sha256(json.dumps({k: sub[k] for k in BUILD_SECTIONS}, sort_keys=True).encode()).hexdigest()[:10]
    sub["output"] = {**sub["output"], "run_dir": str(paths.temperature_run(temperature, key))}
    if sub["checkpoint"]["resume"] == "ask":
        sub["checkpoint"] = {**sub["checkpoint"], "resume": "auto"}
    log.info("temperature %g: generating %d tasks x %d samples", temperature, len(ids), n)
    records = build_labelled_dataset(config_from_dict(sub), interactive=False, progress=progress, loaded=loaded,
                                     label=f"build t={temperature:g}")
    return records, f"regenerated ({n} sample(s) per task)"


def confounds(cfg: Config, records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Single-feature baselines a latent could be a proxy for: prompt length in tokens, description length
    in characters, cyclomatic complexity of the reference solution."""
    first = [r for r in records if r["sample_index"] == 0]
    text = {t.task_id: t.text for t in benchmarks.load_tasks(cfg.data.dataset, cfg.data.source)}
    return {"prompt tokens": {r["task_id"]: float(r["n_prompt_tokens"]) for r in first},
            "description length": {r["task_id"]: float(len(text[r["task_id"]])) for r in first},
            "cyclomatic complexity": {r["task_id"]: float(r["complexity"]) for r in first}}


LATENT_ROWS = ("latent", "steered_latent", "latent_fires")


def add_paired_differences(rows: list[dict[str, Any]], predictors, feats, val_ids, y_val, cfg: Config) -> None:
    """For every latent predictor, paired bootstrap differences (same resample weights) against every other
    predictor of its direction, and a verdict that follows from whether each interval excludes 0."""
    v = cfg.validation
    by_key = {(p.direction, p.name, p.layer, p.latent, p.info.get("feature")): p for p in predictors}
    for row, p in zip(rows, predictors):
        if p.name not in LATENT_ROWS:
            continue
        y = positive(y_val, p.direction)
        s = p.score(feats, val_ids)
        row["paired"] = []
        for q in by_key.values():
            if q.direction != p.direction or q is p or q.name in LATENT_ROWS:
                continue
            d = paired_differences(s, p.threshold, q.score(feats, val_ids), q.threshold, y,
                                   n_resamples=v.bootstrap_resamples, seed=v.bootstrap_seed, level=v.ci_level)
            row["paired"].append({"against": q.label, "name": q.name,
                                  **{f"delta_{m}": d[m].as_dict() for m in ("auroc", "f1", "mcc")},
                                  "verdict": verdict(d)})


def verdict(d) -> str:
    """'better' / 'worse' when the AUROC difference's interval excludes 0, else 'no different'."""
    iv = d["auroc"]
    if iv.low is None or np.isnan(iv.low):
        return "undefined"
    return "better" if iv.low > 0 else "worse" if iv.high < 0 else "no different"


# --------------------------------------------------------------------------- stage

def validate(cfg: Config, progress: bool = True, *, loaded=None) -> dict[str, Any]:
    """Run the stage; returns the results written to ``validation/results.json``. ``loaded`` (a LoadedModel, or
    a callable returning one) serves the temperature sub-builds; without it the first one that generates loads
    the model for all of them."""

    started = time.perf_counter()
    run = RunDir.at(cfg.output.run_dir)
    records = load_records(str(run.root))
    check_run_config(run, STAGE, cfg.to_dict(), UPSTREAM_FIELDS)
    check_run_config(run, STAGE, cfg.to_dict(), SAE_FIELDS, against=AnalysisPaths.of(run).config)
    digests = check_chain(run, STAGE) if run.is_done("analyze") else {}
    paths = ValidationPaths.of(run)
    paths.root.mkdir(parents=True, exist_ok=True)
    setup_logging(run.log_file(STAGE))
    atomic_write_json(paths.config, cfg.to_dict())
    announce(STAGE, "predictors frozen on the SAE and tuning splits, scored on the validation split; robustness "
                    f"at temperatures {', '.join(f'{t:g}' for t in cfg.validation.temperatures)}", progress)
    loaded = load_once(cfg.model) if loaded is None else loaded

    labels = task_labels(records)
    ids = _split_ids(run, labels)
    split_of = {t: name for name, group in ids.items() for t in group}
    sealed = SealedLabels(labels, split_of, sealed=("validation",))
    base = (transfer_base(cfg.validation.transfer_from, run, cfg.to_dict()) if cfg.validation.transfer_from
            else None)  # transfer: another run's frozen choices, nothing is selected or fitted here
    if base is None:
        table = load_ranked(AnalysisPaths.of(run))
        selection = select_latents(table, cfg.validation.selection_metric)
        steering_selection = select_latents(table, cfg.steering.selection_metric)  # validated too: one latent identity
    else:
        selection, steering_selection = base.choices["selection"], base.choices["steering_selection"]
    chosen = list(selection.values()) + list(steering_selection.values())
    feats, saes, analysis = load_features(run, cfg, sorted({int(r["layer"]) for r in chosen}))
    for row in chosen:
        feats.add_latent(saes[int(row["layer"])], int(row["layer"]), int(row["latent"]))
    feats.scalars.update(confounds(cfg, records))

    if base is None:
        predictors = fit_predictors(selection, feats, sealed, ids["sae"], ids["tuning"],
                                    folds=cfg.validation.probe_folds, n_cs=cfg.validation.probe_cs,
                                    seed=cfg.validation.bootstrap_seed, steering_selection=steering_selection)
    else:
        predictors = frozen_predictors(base.choices["predictors"], base.weights, cfg.validation.bootstrap_seed,
                                       feats.acts.shape[-1])
    write_choices(paths, {"selection_metric": cfg.validation.selection_metric, "selection": selection,
                          "steering_selection_metric": cfg.steering.selection_metric,
                          "steering_selection": steering_selection,
                          "predictors": [p.as_dict() for p in predictors],
                          "label_reads": sorted(set(sealed.reads)),
                          **({"transfer": base.describe()} if base else {})})
    write_predictor_weights(paths, weights_table(predictors))
    sealed.unseal("validation")  # choices are frozen on disk: the validation labels may now be read

    val_ids = ids["validation"]
    y_val = sealed(val_ids)
    rows = [evaluate(p, feats, val_ids, y_val, cfg) for p in predictors]
    add_paired_differences(rows, predictors, feats, val_ids, y_val, cfg)
    difficulty = {r["task_id"]: r["difficulty"] for r in records}
    results = {
        "selection_metric": cfg.validation.selection_metric,
        "selection": selection,
        "steering_selection": steering_selection,
        "splits": {name: {"n": len(group), "n_correct": int(sum(labels[t] for t in group))}
                   for name, group in ids.items()},
        "validation": _by_direction(rows),
        "difficulty": difficulty_results(predictors, feats, val_ids, y_val, difficulty, cfg),
        "temperature": temperature_results(cfg, run, paths, predictors, feats, val_ids, records, progress,
                                           loaded=loaded),
        "bootstrap": {"resamples": cfg.validation.bootstrap_resamples, "seed": cfg.validation.bootstrap_seed,
                      "level": cfg.validation.ci_level, "unit": "task"},
        "analysis_release": analysis["release"],
    }
    if base is not None:  # the frozen predictors and pass@1 beside the run they were chosen on
        v = cfg.validation
        base_labels = task_labels(load_records(str(base.run.root)))
        results["transfer"] = {**base.describe(),
                               "pass_rate": pass_rates(base_labels, labels, read_splits(run), v.ci_level,
                                                       v.bootstrap_resamples, v.bootstrap_seed),
                               "predictors": compare_metrics(base.validation["validation"], results["validation"])}
    _save_scores(paths, predictors, feats, val_ids, y_val, difficulty)
    if cfg.validation.plots:

        results["plots"] = [str(p.relative_to(run.root)) for p in
                            plot_validation(paths.plots, results, predictors, feats, val_ids, y_val, cfg)]
    results["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(paths.results, results)
    run.mark_done(STAGE, {"n_validation": len(val_ids),
                          "inputs": {**{k: digests.get(k) for k in ("records", "activations", "scores", "ranked")},
                                     "config": sections_digest(cfg.to_dict(), ("validation", "steering"))},
                          "outputs": {"choices": file_digest(paths.choices), "results": file_digest(paths.results)}})
    return results


def _save_scores(paths: ValidationPaths, predictors, feats, val_ids, y_val, difficulty) -> None:
    """Per validation task: label, difficulty and every predictor's score (for re-analysis and steering)."""

    columns: dict[str, Any] = {"task_id": val_ids, "correct": y_val.tolist(),
                               "difficulty": [difficulty[t] for t in val_ids]}
    for p in predictors:
        columns[f"{p.direction}/{p.name}"] = p.score(feats, val_ids).tolist()
    write_validation_scores(paths, columns)

