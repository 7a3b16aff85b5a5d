"""Predictors of correctness from the prompt's residual stream: the chosen SAE latents and their baselines.

Every predictor gives each task a score (higher = more likely its *positive* class, which is
``direction``: 'correct' or 'incorrect') and predicts positive when ``score >= threshold``.

- ``latent``: the activation of one SAE latent (chosen on the SAE-analysis split by the analysis stage).
- ``probe``: logistic regression on the full residual vector at the latent's layer, standardised,
  regularisation chosen by stratified k-fold cross-validation on the SAE-analysis split.
- ``diff_means``: projection on the difference of the class means (SAE-analysis split) at that layer.
- ``majority``: the SAE-analysis split's majority class for every task (constant score).
- ``always_positive``: the predicted class for every task; its F1 is the bar an F1 must clear
  (with 70% failures, always answering "incorrect" scores F1 = 0.82).
- ``random``: a seeded uniform score per task id.

Fitting reads the SAE-analysis split, thresholds are F1-optimal on the tuning split; the
validation split is never read here (:class:`SealedLabels` enforces it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold

from pva_sae.config import DIRECTIONS
from pva_sae.stats.classify import best_f1_threshold

BASELINES = ("probe", "diff_means", "majority", "always_positive", "random")


class LeakageError(RuntimeError):
    """Labels of a sealed split were read before the choices made on other splits were frozen."""


class SealedLabels:
    """Task labels (True = correct) by task id; labels of a sealed split raise until it is unsealed."""

    def __init__(self, labels: dict[int, bool], split_of: dict[int, str], sealed: Sequence[str] = ("validation",)):
        self._labels = dict(labels)
        self._split_of = dict(split_of)
        self._sealed = set(sealed)
        self.reads: list[str] = []  # splits read, in order (for audits and tests)

    def __call__(self, task_ids: Sequence[int]) -> np.ndarray:
        splits = {self._split_of.get(t) for t in task_ids}
        blocked = splits & self._sealed
        if blocked:
            raise LeakageError(f"labels of the sealed split(s) {sorted(blocked)} were requested before the choices "
                               "were frozen")
        self.reads.extend(sorted(s for s in splits if s))
        missing = [t for t in task_ids if t not in self._labels]
        if missing:
            raise KeyError(f"no label for task ids {missing[:10]}")
        return np.array([self._labels[t] for t in task_ids], dtype=bool)

    def unseal(self, split: str) -> None:
        self._sealed.discard(split)


@dataclass
class Features:
    """Prompt residuals of every task: ``acts`` (n_tasks, n_layers, d_model) float32, rows by ``task_ids``."""

    acts: np.ndarray
    task_ids: list[int]
    layers: list[int]
    latent_acts: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (layer, latent) -> (n_tasks,)
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)  # confound name -> {task id: value}

    def __post_init__(self) -> None:
        self._index = {t: i for i, t in enumerate(self.task_ids)}

    def rows(self, task_ids: Sequence[int]) -> np.ndarray:
        index = self._index
        missing = [t for t in task_ids if t not in index]
        if missing:
            raise KeyError(f"no captured activations for task ids {missing[:10]}; rerun the analysis stage")
        return np.array([index[t] for t in task_ids], dtype=np.int64)

    def residual(self, layer: int, task_ids: Sequence[int]) -> np.ndarray:
        return self.acts[self.rows(task_ids), self.layers.index(layer)]          # (n, d_model)

    def add_latent(self, sae: Any, layer: int, latent: int) -> None:
        x = torch.from_numpy(self.acts[:, self.layers.index(layer)])
        with torch.no_grad():
            values = sae.encode(x.to(sae.W_enc.device))[:, latent]
        self.latent_acts[(layer, latent)] = values.float().cpu().numpy()


@dataclass
class Predictor:
    name: str                          # 'latent', 'steered_latent', 'latent_fires', 'confound' or one of BASELINES
    direction: str                     # the positive class
    layer: int | None = None
    latent: int | None = None
    threshold: float = 0.0
    tuning_f1: float | None = None
    weights: np.ndarray | None = None  # (d_model,) for probe / diff_means (in raw residual units)
    bias: float = 0.0
    constant: float | None = None      # majority
    seed: int | None = None            # random
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.name in ("latent", "steered_latent"):
            return f"latent L{self.layer}:{self.latent}"
        if self.name == "latent_fires":
            return f"latent L{self.layer}:{self.latent} fires"
        if self.name == "confound":
            return f"confound: {self.info['feature']}"
        return {"probe": f"logistic probe L{self.layer}", "diff_means": f"difference of means L{self.layer}",
                "majority": "majority class", "always_positive": f"always '{self.direction}'",
                "random": "random"}[self.name]

    def score(self, feats: Features, task_ids: Sequence[int]) -> np.ndarray:
        if self.name in ("latent", "steered_latent", "latent_fires"):
            return feats.latent_acts[(self.layer, self.latent)][feats.rows(task_ids)].astype(np.float64)
        if self.name == "confound":
            values = feats.scalars[self.info["feature"]]
            return self.constant * np.array([values[t] for t in task_ids], dtype=np.float64)
        if self.name in ("probe", "diff_means"):
            return feats.residual(self.layer, task_ids).astype(np.float64) @ self.weights + self.bias
        if self.name in ("majority", "always_positive"):
            return np.full(len(task_ids), self.constant, dtype=np.float64)
        if self.name == "random":
            return random_scores(self.seed, task_ids)
        raise ValueError(f"unknown predictor {self.name!r}")

    def as_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "label": self.label, "direction": self.direction, "layer": self.layer,
               "latent": self.latent, "threshold": self.threshold, "tuning_f1": self.tuning_f1, **self.info}
        if self.weights is not None:
            out["weights_norm"] = float(np.linalg.norm(self.weights))
        return out


def random_scores(seed: int, task_ids: Sequence[int]) -> np.ndarray:
    """One uniform score per task id, the same for a task wherever it appears."""
    return np.array([np.random.default_rng([seed, int(t)]).random() for t in task_ids])


def positive(correct: np.ndarray, direction: str) -> np.ndarray:
    """Labels of the positive class: ``correct`` itself or its negation."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    return correct if direction == "correct" else ~correct


def fit_probe(x: np.ndarray, y: np.ndarray, folds: int, n_cs: int) -> tuple[np.ndarray, float, dict[str, Any]]:
    """Logistic regression on standardised features, C by stratified k-fold CV (AUROC); weights in raw units."""

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    folds = max(2, min(folds, int(y.sum()), int((~y).sum())))
    model = LogisticRegressionCV(Cs=np.logspace(-4, 4, n_cs), cv=StratifiedKFold(folds), scoring="roc_auc",
                                 max_iter=5000, l1_ratios=(0.0,), use_legacy_attributes=False)
    model.fit(z, y)
    w = model.coef_[0] / scale
    b = float(model.intercept_[0] - (mean / scale) @ model.coef_[0])
    return w, b, {"C": float(np.ravel(model.C_)[0]), "cv_folds": folds}


def _latent(name: str, direction: str, row: dict[str, Any]) -> Predictor:
    return Predictor(name, direction, int(row["layer"]), int(row["latent"]),
                     info={k: row.get(k) for k in (f"t_{direction}", f"sep_{direction}", "f_correct", "f_incorrect",
                                                    "general_frequency", "neuronpedia")})


# The natural JumpReLU rule: a latent "fires" when its activation is > 0 (the smallest positive float).
FIRES = float(np.nextafter(0.0, 1.0))


def fit_predictors(selection: dict[str, dict[str, Any]], feats: Features, labels: SealedLabels,
                   sae_ids: Sequence[int], tuning_ids: Sequence[int], *, folds: int, n_cs: int,
                   seed: int, steering_selection: dict[str, dict[str, Any]] | None = None) -> list[Predictor]:
    """Fit every predictor on the SAE-analysis split and tune its threshold on the tuning split.

    ``selection[direction]`` is the analysis stage's chosen latent row (layer, latent, scores);
    ``steering_selection`` the latent the steering stage will steer, validated too when it differs
    (one latent identity across the run). Confound baselines are single features of
    ``feats.scalars`` (their sign fitted on the SAE-analysis split). The natural rule "the latent
    fires" is kept beside the tuned threshold. Reads labels of the SAE-analysis and tuning splits only.
    """
    y_sae, y_tune = labels(sae_ids), labels(tuning_ids)
    majority_correct = bool(y_sae.mean() >= 0.5)
    out = []
    for direction in DIRECTIONS:
        row = selection[direction]
        layer = int(row["layer"])
        pos_sae, pos_tune = positive(y_sae, direction), positive(y_tune, direction)
        x_sae = feats.residual(layer, sae_ids).astype(np.float64)
        w, b, info = fit_probe(x_sae, pos_sae, folds, n_cs)
        diff = x_sae[pos_sae].mean(axis=0) - x_sae[~pos_sae].mean(axis=0)
        made = [
            _latent("latent", direction, row),
            Predictor("probe", direction, layer, weights=w, bias=b, info=info),
            Predictor("diff_means", direction, layer, weights=diff),
            Predictor("majority", direction, constant=float(majority_correct == (direction == "correct")),
                      info={"majority_class": "correct" if majority_correct else "incorrect"}),
            Predictor("always_positive", direction, constant=1.0),
            Predictor("random", direction, seed=seed),
        ]
        steered = (steering_selection or {}).get(direction)
        if steered and (int(steered["layer"]), int(steered["latent"])) != (layer, int(row["latent"])):
            made.insert(1, _latent("steered_latent", direction, steered))
        for name, values in feats.scalars.items():
            v = np.array([values[t] for t in sae_ids], dtype=np.float64)
            sign = 1.0 if v[pos_sae].mean() >= v[~pos_sae].mean() else -1.0
            made.append(Predictor("confound", direction, constant=sign, info={"feature": name, "sign": sign}))
        for p in made:
            if p.name in ("majority", "always_positive"):
                p.threshold = 0.5  # predicts positive iff the majority class is the positive class
                continue
            p.threshold, p.tuning_f1 = best_f1_threshold(p.score(feats, tuning_ids), pos_tune)
        for p in [p for p in made if p.name in ("latent", "steered_latent")]:
            fires = Predictor("latent_fires", direction, p.layer, p.latent, threshold=FIRES,
                              info={**p.info, "of": p.name})
            made.insert(made.index(p) + 1, fires)
        out.extend(made)
    return out
