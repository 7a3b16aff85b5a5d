"""Transfer: the predictors one run froze, rebuilt to score another run's tasks unchanged.

A run that transfers (``validation.transfer_from``, e.g. the instruction-tuned model evaluated with
the base model's choices) selects nothing and fits nothing: every predictor keeps the other run's
latent, layer, threshold, sign, probe and difference-of-means weights and majority class, and only
its scores are recomputed on this run's residuals. :func:`weights_table` is what a validation stage
writes so that its probes can be rebuilt; :func:`frozen_predictors` rebuilds them;
:func:`compare_metrics` and :func:`pass_rates` put the two runs side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pva_sae.stats.causal import clopper_pearson, net_effect
from pva_sae.stats.predictors import Predictor

WEIGHTED = ("probe", "diff_means")
_LATENT_INFO = ("t_correct", "t_incorrect", "sep_correct", "sep_incorrect", "f_correct", "f_incorrect",
                "general_frequency", "neuronpedia", "of")


def weights_key(direction: str, name: str, layer: int | None) -> str:
    return f"{direction}/{name}/L{layer}"


def weights_table(predictors: Sequence[Predictor]) -> dict[str, dict[str, Any]]:
    """The weights and bias of every probe and difference-of-means predictor, by :func:`weights_key`."""
    return {weights_key(p.direction, p.name, p.layer): {"weights": [float(w) for w in p.weights], "bias": float(p.bias)}
            for p in predictors if p.name in WEIGHTED}


def frozen_predictors(rows: Sequence[dict[str, Any]], weights: dict[str, dict[str, Any]], seed: int,
                      d_model: int) -> list[Predictor]:
    """The predictors of another run (its ``choices.json`` rows and ``predictor_weights.json``), unchanged.

    ``seed`` is the random baseline's (it scores task ids, whatever the model); ``d_model`` is this run's
    residual width, which the frozen weights must have.
    """
    out = []
    for row in rows:
        name, direction = row["name"], row["direction"]
        p = Predictor(name, direction, row.get("layer"), row.get("latent"), threshold=float(row["threshold"]),
                      tuning_f1=row.get("tuning_f1"))
        if name in ("latent", "steered_latent", "latent_fires"):
            p.info = {k: row[k] for k in _LATENT_INFO if k in row}
        elif name in WEIGHTED:
            key = weights_key(direction, name, p.layer)
            if key not in weights:
                raise KeyError(f"the frozen weights hold no {key}")
            w = np.asarray(weights[key]["weights"], dtype=np.float64)
            if w.shape != (d_model,):
                raise ValueError(f"the frozen {key} has {w.size} weights, this run's residual has {d_model} dimensions")
            p.weights, p.bias = w, float(weights[key]["bias"])
            p.info = {k: row[k] for k in ("C", "cv_folds") if k in row}
        elif name == "majority":
            p.constant = float(row["majority_class"] == direction)
            p.info = {"majority_class": row["majority_class"]}
        elif name == "always_positive":
            p.constant = 1.0
        elif name == "random":
            p.seed = seed
        elif name == "confound":
            p.constant = float(row["sign"])
            p.info = {"feature": row["feature"], "sign": float(row["sign"])}
        else:
            raise ValueError(f"unknown predictor {name!r} in the frozen choices")
        out.append(p)
    return out


def compare_metrics(base: dict[str, list[dict[str, Any]]], this: dict[str, list[dict[str, Any]]],
                    metrics: Sequence[str] = ("auroc", "f1", "precision", "recall")) -> list[dict[str, Any]]:
    """Per frozen predictor (matched by direction and label): its validation metrics (estimate and
    interval) in the run it was chosen on and in this one."""
    def index(results):
        return {(r["direction"], r["label"]): r for rows in results.values() for r in rows}

    before, after = index(base), index(this)
    out = []
    for key, row in after.items():
        if key not in before:
            continue
        out.append({"direction": key[0], "label": key[1], "name": row["name"],
                    **{m: {"base": before[key]["metrics"].get(m), "this": row["metrics"].get(m)} for m in metrics}})
    return out


def pass_rates(base: dict[int, bool], this: dict[int, bool], splits: dict[str, Sequence[int]], level: float,
               n_resamples: int, seed: int) -> dict[str, Any]:
    """Pass@1 of each run on its own tasks of every split (and overall), with exact intervals, and the
    paired change (this minus base) with a task-bootstrap interval on the tasks both runs labelled
    (all of them when both built the same tasks; ``None`` when they share none)."""
    groups = {**{name: list(ids) for name, ids in splits.items()}, "all": sorted(set(base) | set(this))}
    out = {}
    for name, ids in groups.items():
        mine = [bool(this[t]) for t in ids if t in this]
        theirs = [bool(base[t]) for t in ids if t in base]
        shared = [t for t in ids if t in base and t in this]
        change = (net_effect([base[t] for t in shared], [this[t] for t in shared], n_resamples, seed, level)
                  if shared else None)
        out[name] = {"base": _rate(sum(theirs), len(theirs), level), "this": _rate(sum(mine), len(mine), level),
                     "n_shared": len(shared), "change": change}
    return out


def _rate(k: int, n: int, level: float) -> dict[str, Any]:
    if n == 0:
        return {"estimate": None, "ci": [None, None], "successes": 0, "n": 0}
    lo, hi = clopper_pearson(k, n, level)
    return {"estimate": k / n, "ci": [float(lo), float(hi)], "successes": k, "n": n}


def compare_experiments(base: dict[str, dict[str, Any]], this: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per steering experiment (correction, corruption...): the target's rate with its exact interval, the
    controls' mean rate and the target-vs-controls tests, in the base run and in this one."""
    def brief(e: dict[str, Any] | None) -> dict[str, Any] | None:
        if e is None:
            return None
        return {"target": e.get("target"), "rate": e["rate"], "controls_mean_rate": e["controls_summary"]["mean_rate"],
                "n_controls": e.get("n_controls"), "rank_p": e["rank_p"]["p"], "permutation_p": e["permutation_p"]["p"],
                "paired_difference": {k: e["paired_difference"].get(k) for k in ("estimate", "ci")}}

    return {name: {"base": brief(base.get(name)), "this": brief(e)} for name, e in this.items()}
