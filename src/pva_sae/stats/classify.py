"""Classification metrics, thresholds, bootstrap intervals and exact tests: pure math on numpy arrays.

Conventions: ``labels`` are booleans with True = the positive class (the class a predictor predicts);
``scores`` are floats, higher = more positive; a threshold ``thr`` predicts positive when
``score >= thr``. Optional ``weights`` are non-negative integer-like multiplicities, which is how a
(cluster) bootstrap resample is represented: weight w_i = how often item i was drawn.

Definitions match scikit-learn (``roc_auc_score``, ``average_precision_score``, ``f1_score``,
``precision_score``, ``recall_score`` with ``zero_division=0``); the tests check it. Undefined values
(AUROC or AP without both classes) are NaN, never an exception, so a one-class bootstrap resample is
counted and skipped rather than crashing the run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest, fisher_exact, norm

METRIC_NAMES = ("auroc", "f1", "precision", "recall", "average_precision", "mcc", "balanced_accuracy")


def _arrays(scores, labels, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be boolean or 0/1")
        y = y.astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.shape[0]}) and labels ({y.shape[0]}) differ in length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != s.shape or (w < 0).any():
        raise ValueError("weights must be non-negative, one per score")
    return s, y, w


# --------------------------------------------------------------------------- ranking metrics

def auroc(scores, labels, weights=None) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney); NaN without both classes."""
    s, y, w = _arrays(scores, labels, weights)
    w_pos, w_neg = w[y].sum(), w[~y].sum()
    if w_pos == 0 or w_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], w[order]
    # Group tied scores: each positive beats every negative of a lower score and ties half of its own group.
    uniq, start = np.unique(s, return_index=True)
    neg_in_group = np.add.reduceat(np.where(~y, w, 0.0), start)
    pos_in_group = np.add.reduceat(np.where(y, w, 0.0), start)
    neg_below = np.cumsum(neg_in_group) - neg_in_group
    wins = (pos_in_group * (neg_below + 0.5 * neg_in_group)).sum()
    return float(wins / (w_pos * w_neg))


def roc_curve(scores, labels, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending, starting at (0, 0) with threshold +inf."""
    s, y, w = _arrays(scores, labels, weights)
    thr, tp, fp = _cumulative_counts(s, y, w)
    p, n = w[y].sum(), w[~y].sum()
    tpr = tp / p if p > 0 else np.full_like(tp, np.nan)
    fpr = fp / n if n > 0 else np.full_like(fp, np.nan)
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thr]


def _cumulative_counts(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (descending) and the weighted TP / FP counts when predicting score >= threshold."""
    order = np.argsort(-s, kind="mergesort")
    s, y, w = s[order], y[order], w[order]
    tp = np.cumsum(np.where(y, w, 0.0))
    fp = np.cumsum(np.where(~y, w, 0.0))
    last_of_group = np.r_[s[1:] != s[:-1], True]
    return s[last_of_group], tp[last_of_group], fp[last_of_group]


def pr_curve(scores, labels, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) for every distinct threshold, thresholds descending."""
    s, y, w = _arrays(scores, labels, weights)
    thr, tp, fp = _cumulative_counts(s, y, w)
    p = w[y].sum()
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    recall = tp / p if p > 0 else np.full_like(tp, np.nan)
    return precision, recall, thr


def average_precision(scores, labels, weights=None) -> float:
    """Sum over thresholds of (R_k - R_{k-1}) P_k, as scikit-learn; NaN without positives or negatives."""
    s, y, w = _arrays(scores, labels, weights)
    if w[y].sum() == 0 or w[~y].sum() == 0:
        return float("nan")
    precision, recall, _ = pr_curve(s, y, w)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# --------------------------------------------------------------------------- threshold metrics

def confusion(scores, labels, threshold: float, weights=None) -> tuple[float, float, float, float]:
    """(tp, fp, fn, tn), weighted, for the rule score >= threshold."""
    s, y, w = _arrays(scores, labels, weights)
    pred = s >= threshold
    return (float(w[pred & y].sum()), float(w[pred & ~y].sum()), float(w[~pred & y].sum()),
            float(w[~pred & ~y].sum()))


def threshold_metrics(scores, labels, threshold: float, weights=None) -> dict[str, float]:
    """precision, recall and F1 at ``threshold`` (0 where a denominator is 0, as sklearn's zero_division=0)."""
    tp, fp, fn, tn = confusion(scores, labels, threshold, weights)
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, **_mcc_balanced(tp, fp, fn, tn)}


def _mcc_balanced(tp, fp, fn, tn):
    """Matthews correlation (0 when a margin is empty, as sklearn) and balanced accuracy (mean of TPR and TNR).

    Works on floats or arrays; unlike F1 neither rewards predicting every task positive: both are 0 / 0.5 then.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1.0), 0.0)
        tpr = np.where(tp + fn > 0, tp / np.where(tp + fn > 0, tp + fn, 1.0), np.nan)
        tnr = np.where(tn + fp > 0, tn / np.where(tn + fp > 0, tn + fp, 1.0), np.nan)
    out = {"mcc": mcc, "balanced_accuracy": (tpr + tnr) / 2}
    return {k: float(v) for k, v in out.items()} if np.ndim(mcc) == 0 else out


def best_f1_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, F1) maximising F1 over every distinct score used as a threshold.

    Ties go to the highest threshold (the fewest positive predictions). The lowest candidate predicts
    every task positive, so the result is never below the always-positive F1: check it against the
    majority baseline before reading anything into it.
    """
    s, y, w = _arrays(scores, labels)
    if not y.any():
        raise ValueError("the tuning data hold no positive example: an F1-optimal threshold is undefined")
    thr, tp, fp = _cumulative_counts(s, y, w)
    f1 = 2 * tp / (tp + fp + w[y].sum())
    best = int(np.argmax(f1))  # thresholds descend, so the first maximum is the highest threshold
    return float(thr[best]), float(f1[best])


def all_metrics(scores, labels, threshold: float, weights=None) -> dict[str, float]:
    """Every metric of METRIC_NAMES at once."""
    out = {"auroc": auroc(scores, labels, weights), "average_precision": average_precision(scores, labels, weights)}
    out.update(threshold_metrics(scores, labels, threshold, weights))
    return {k: out[k] for k in METRIC_NAMES}


# --------------------------------------------------------------------------- bootstrap

@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    n_valid: int        # resamples where the metric was defined
    n_resamples: int

    def as_dict(self) -> dict[str, Any]:
        return {"estimate": _clean(self.estimate), "low": _clean(self.low), "high": _clean(self.high),
                "n_valid": self.n_valid, "n_resamples": self.n_resamples}


def _clean(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def cluster_weights(clusters: Sequence[Any], n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n_items) multiplicities of a cluster bootstrap: clusters are drawn with replacement
    and every item of a drawn cluster comes along (items = samples, clusters = tasks). With one item
    per cluster this is the ordinary bootstrap."""
    _, index = np.unique(np.asarray(clusters), return_inverse=True)
    n_clusters = int(index.max()) + 1 if index.size else 0
    if n_clusters == 0:
        raise ValueError("nothing to resample: no items")
    draws = rng.integers(0, n_clusters, size=(n_resamples, n_clusters))
    counts = np.zeros((n_resamples, n_clusters))
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1.0)
    return counts[:, index]


def batched_metrics(scores, labels, threshold: float, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of METRIC_NAMES for many weight vectors at once: ``weights`` (B, n) -> {name: (B,)}.

    Same definitions as the scalar functions (tests check they agree): AUROC as the trapezoid under
    the ROC points, which equals the Mann-Whitney form with ties counted half; AP as sklearn's step sum.
    """
    s, y, _ = _arrays(scores, labels)
    W = np.atleast_2d(np.asarray(weights, dtype=np.float64))             # (B, n)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted, W = s[order], y[order], W[:, order]
    tp = np.cumsum(np.where(y_sorted, W, 0.0), axis=1)                  # (B, n)
    fp = np.cumsum(np.where(~y_sorted, W, 0.0), axis=1)
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]                   # one point per distinct score
    tp, fp = tp[:, last], fp[:, last]                                   # (B, k)
    pos, neg = tp[:, -1], fp[:, -1]                                     # (B,)
    both = (pos > 0) & (neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.hstack([np.zeros((len(W), 1)), tp / pos[:, None]])
        fpr = np.hstack([np.zeros((len(W), 1)), fp / neg[:, None]])
        auc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1.0), 0.0)
        ap = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
    pred = s >= threshold
    Wu = np.asarray(weights, dtype=np.float64).reshape(len(W), -1)
    tp_t, fp_t, fn_t, tn_t = Wu @ (pred & y), Wu @ (pred & ~y), Wu @ (~pred & y), Wu @ (~pred & ~y)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tp_t + fp_t > 0, tp_t / np.maximum(tp_t + fp_t, 1e-300), 0.0)
        rec = np.where(tp_t + fn_t > 0, tp_t / np.maximum(tp_t + fn_t, 1e-300), 0.0)
        f1 = np.where(tp_t > 0, 2 * tp_t / np.maximum(2 * tp_t + fp_t + fn_t, 1e-300), 0.0)
    nan = np.full(len(W), np.nan)
    return {"auroc": np.where(both, auc, nan), "f1": f1, "precision": prec, "recall": rec,
            "average_precision": np.where(both, ap, nan), **_mcc_balanced(tp_t, fp_t, fn_t, tn_t)}


def bootstrap_metrics(scores, labels, threshold: float, clusters: Sequence[Any] | None = None,
                      n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Interval]:
    """Bootstrap intervals of every metric in METRIC_NAMES for one predictor at a fixed threshold.

    ``clusters`` (one id per item, e.g. the task of each sample) makes it a cluster bootstrap; by
    default every item is its own cluster. Same seed, same data -> identical intervals.
    """
    s, y, _ = _arrays(scores, labels)
    clusters = np.arange(s.size) if clusters is None else np.asarray(clusters)
    if clusters.shape != s.shape:
        raise ValueError("clusters must give one cluster id per score")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    weights = cluster_weights(clusters, n_resamples, np.random.default_rng(seed))
    point = {k: float(v[0]) for k, v in batched_metrics(s, y, threshold, np.ones((1, s.size))).items()}
    values = batched_metrics(s, y, threshold, weights)
    out = {}
    for name in METRIC_NAMES:
        v = values[name][~np.isnan(values[name])]
        lo, hi = (np.quantile(v, [(1 - level) / 2, (1 + level) / 2]) if v.size >= 2 else (np.nan, np.nan))
        out[name] = Interval(point[name], float(lo), float(hi), int(v.size), n_resamples)
    return out


def paired_differences(scores_a, threshold_a: float, scores_b, threshold_b: float, labels,
                       clusters: Sequence[Any] | None = None, n_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict[str, Interval]:
    """Bootstrap intervals of metric(a) - metric(b) for two predictors of the same items, with the SAME
    resample weights for both (a paired comparison): {metric: Interval of the difference}.

    The weights are drawn exactly as :func:`bootstrap_metrics` draws them for the same seed, so each
    predictor's own interval and the difference come from one set of resamples. A predictor is better
    than another at ``level`` when the interval of the difference excludes 0.
    """
    s_a, y, _ = _arrays(scores_a, labels)
    s_b, _, _ = _arrays(scores_b, labels)
    clusters = np.arange(s_a.size) if clusters is None else np.asarray(clusters)
    weights = cluster_weights(clusters, n_resamples, np.random.default_rng(seed))
    ones = np.ones((1, s_a.size))
    pa, pb = batched_metrics(s_a, y, threshold_a, ones), batched_metrics(s_b, y, threshold_b, ones)
    va, vb = batched_metrics(s_a, y, threshold_a, weights), batched_metrics(s_b, y, threshold_b, weights)
    out = {}
    for name in METRIC_NAMES:
        d = va[name] - vb[name]
        d = d[~np.isnan(d)]
        lo, hi = (np.quantile(d, [(1 - level) / 2, (1 + level) / 2]) if d.size >= 2 else (np.nan, np.nan))
        out[name] = Interval(float(pa[name][0] - pb[name][0]), float(lo), float(hi), int(d.size), n_resamples)
    return out


def curve_band(scores, labels, clusters, kind: str, n_resamples: int, seed: int, level: float = 0.95,
               grid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Pointwise bootstrap band of an ROC curve (TPR at a grid of FPR) or PR curve (precision at a
    grid of recall): {'grid', 'estimate', 'low', 'high'}."""
    s, y, _ = _arrays(scores, labels)
    grid = np.linspace(0, 1, 101) if grid is None else grid
    weights = cluster_weights(clusters, n_resamples, np.random.default_rng(seed))
    curves = [c for c in (_curve_on_grid(s, y, w, kind, grid) for w in weights) if c is not None]
    est = _curve_on_grid(s, y, None, kind, grid)
    if not curves:
        nan = np.full_like(grid, np.nan)
        return {"grid": grid, "estimate": est if est is not None else nan, "low": nan, "high": nan}
    stack = np.vstack(curves)
    low, high = np.quantile(stack, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return {"grid": grid, "estimate": est, "low": low, "high": high}


def _curve_on_grid(s, y, w, kind: str, grid: np.ndarray) -> np.ndarray | None:
    ww = np.ones_like(s) if w is None else w
    if ww[y].sum() == 0 or ww[~y].sum() == 0:
        return None
    if kind == "roc":
        fpr, tpr, _ = roc_curve(s, y, ww)
        return np.interp(grid, fpr, tpr)
    if kind == "pr":
        precision, recall, _ = pr_curve(s, y, ww)
        # Interpolated precision: the best precision at recall >= r (monotone, as usually plotted).
        best = np.maximum.accumulate(precision[::-1])[::-1]
        idx = np.searchsorted(recall, grid, side="left").clip(max=len(best) - 1)
        return best[idx]
    raise ValueError(f"kind must be 'roc' or 'pr', not {kind!r}")


# --------------------------------------------------------------------------- rates and exact tests

def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (NaN, NaN) when n == 0."""

    if n == 0:
        return float("nan"), float("nan")
    z = float(norm.ppf((1 + level) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_test(successes: int, n: int, p: float, alternative: str = "greater") -> float:
    """Exact binomial test p-value of ``successes`` out of ``n`` against rate ``p``."""

    if n == 0:
        return float("nan")
    return float(binomtest(successes, n, min(max(p, 0.0), 1.0), alternative=alternative).pvalue)


def fisher_test(a_success: int, a_n: int, b_success: int, b_n: int, alternative: str = "greater") -> float:
    """Fisher's exact test on [[a_success, a_fail], [b_success, b_fail]] (a = target, b = control)."""

    if a_n == 0 or b_n == 0:
        return float("nan")
    table = [[a_success, a_n - a_success], [b_success, b_n - b_success]]
    return float(fisher_exact(table, alternative=alternative).pvalue)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact (binomial) McNemar test, two-sided: b = pairs that changed one way, c = the other way."""

    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
