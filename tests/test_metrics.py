"""Metrics agree with scikit-learn / scipy; bootstrap is seeded and survives one-class resamples."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from pva_sae.stats import classify as m


def random_case(rng, n=None, ties=True):
    n = n or int(rng.integers(4, 80))
    s = rng.integers(0, 6, n).astype(float) if ties else rng.normal(size=n)
    y = rng.random(n) < rng.uniform(0.2, 0.8)
    y[0], y[1] = True, False
    return s, y


def test_auroc_and_ap_match_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s, y = random_case(rng)
        w = rng.integers(1, 4, len(s)).astype(float)
        assert m.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert m.auroc(s, y, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)
        assert m.average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert m.average_precision(s, y, w) == pytest.approx(average_precision_score(y, s, sample_weight=w), abs=1e-12)


def test_threshold_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    for _ in range(200):
        s, y = random_case(rng)
        thr = float(rng.integers(0, 7))
        pred = s >= thr
        got = m.threshold_metrics(s, y, thr)
        assert got["f1"] == pytest.approx(f1_score(y, pred, zero_division=0))
        assert got["precision"] == pytest.approx(precision_score(y, pred, zero_division=0))
        assert got["recall"] == pytest.approx(recall_score(y, pred, zero_division=0))


def test_hand_checked_values():
    s = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([False, False, True, True])
    assert m.auroc(s, y) == pytest.approx(0.75)              # 3 of 4 pos-neg pairs ordered right
    assert m.average_precision(s, y) == pytest.approx(0.8333333333)
    # tp 2, fp 1, fn 0, tn 1: MCC = (2*1 - 1*0) / sqrt(3*2*2*1), balanced accuracy = (1 + 1/2) / 2
    assert m.threshold_metrics(s, y, 0.35) == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "mcc": 2 / 12 ** 0.5, "balanced_accuracy": 0.75})
    from sklearn.metrics import balanced_accuracy_score, matthews_corrcoef

    assert m.threshold_metrics(s, y, 0.35)["mcc"] == pytest.approx(matthews_corrcoef(y, s >= 0.35))
    assert m.threshold_metrics(s, y, 0.35)["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, s >= 0.35))
    assert m.threshold_metrics(s, y, -1.0)["mcc"] == 0.0                 # always positive: no correlation


def test_paired_differences_share_resamples():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    good, noise = y + rng.normal(0, 0.5, 200), rng.normal(0, 1, 200)
    d = m.paired_differences(good, 0.5, noise, 0.0, y, n_resamples=300, seed=1)
    a, b = m.bootstrap_metrics(good, y, 0.5, n_resamples=300, seed=1), m.bootstrap_metrics(noise, y, 0.0, n_resamples=300, seed=1)
    assert d["auroc"].estimate == pytest.approx(a["auroc"].estimate - b["auroc"].estimate)
    assert d["auroc"].low > 0                                              # the informative score is better
    same = m.paired_differences(good, 0.5, good, 0.5, y, n_resamples=300, seed=1)
    assert same["auroc"].low == same["auroc"].high == 0.0                  # identical predictors: no spread


def test_best_threshold_is_the_brute_force_maximum_and_prefers_high_thresholds():
    rng = np.random.default_rng(2)
    for _ in range(100):
        s, y = random_case(rng)
        thr, f1 = m.best_f1_threshold(s, y)
        brute = max(m.threshold_metrics(s, y, t)["f1"] for t in np.unique(s))
        assert f1 == pytest.approx(brute)
        assert m.threshold_metrics(s, y, thr)["f1"] == pytest.approx(f1)
        better_higher = [t for t in np.unique(s) if t > thr and m.threshold_metrics(s, y, t)["f1"] >= f1 - 1e-12]
        assert not better_higher
    with pytest.raises(ValueError, match="no positive"):
        m.best_f1_threshold([0.1, 0.2], [False, False])


def test_batched_equals_scalar():
    rng = np.random.default_rng(3)
    for _ in range(100):
        s, y = random_case(rng)
        w = rng.integers(0, 3, (5, len(s))).astype(float)
        thr = float(rng.integers(0, 6))
        batched = m.batched_metrics(s, y, thr, w)
        for i in range(5):
            ref = m.all_metrics(s, y, thr, w[i])
            for k, v in ref.items():
                assert (math.isnan(v) and math.isnan(batched[k][i])) or batched[k][i] == pytest.approx(v, abs=1e-12)


def test_bootstrap_same_seed_same_result_and_seed_matters():
    rng = np.random.default_rng(4)
    s, y = random_case(rng, n=60, ties=False)
    a = m.bootstrap_metrics(s, y, 0.0, n_resamples=200, seed=7)
    b = m.bootstrap_metrics(s, y, 0.0, n_resamples=200, seed=7)
    c = m.bootstrap_metrics(s, y, 0.0, n_resamples=200, seed=8)
    assert {k: v.as_dict() for k, v in a.items()} == {k: v.as_dict() for k, v in b.items()}
    assert a["auroc"].low != c["auroc"].low or a["auroc"].high != c["auroc"].high
    assert a["auroc"].low <= a["auroc"].estimate <= a["auroc"].high
    assert a["auroc"].estimate == pytest.approx(m.auroc(s, y))


def test_one_class_resamples_are_counted_not_fatal():
    s = np.array([0.9, 0.1, 0.2, 0.3, 0.4])
    y = np.array([True, False, False, False, False])       # one positive: many resamples lack it
    out = m.bootstrap_metrics(s, y, 0.5, n_resamples=300, seed=0)
    assert 0 < out["auroc"].n_valid < 300
    assert out["f1"].n_valid == 300                         # F1 is defined (0) without positives
    only_neg = m.bootstrap_metrics(s, np.zeros(5, bool), 0.5, n_resamples=50, seed=0)
    assert only_neg["auroc"].as_dict()["estimate"] is None and only_neg["auroc"].n_valid == 0


def test_cluster_bootstrap_moves_whole_clusters():
    clusters = np.array([5, 5, 5, 9, 9, 2])
    w = m.cluster_weights(clusters, 100, np.random.default_rng(0))
    assert w.shape == (100, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 3] == w[:, 4]).all()
    assert (w[:, [0, 3, 5]].sum(axis=1) == 3).all()         # 3 clusters drawn per resample


def test_curve_band_contains_estimate():
    rng = np.random.default_rng(5)
    s, y = random_case(rng, n=80, ties=False)
    band = m.curve_band(s, y, np.arange(80), "roc", 100, 0)
    assert (band["low"] <= band["estimate"] + 1e-9).mean() > 0.95
    assert (band["high"] >= band["estimate"] - 1e-9).mean() > 0.95


def test_exact_tests_match_scipy():
    assert m.wilson_interval(0, 10) == pytest.approx((0.0, 3.8415 / 13.8415), abs=1e-4)
    lo, hi = m.wilson_interval(11, 272)
    assert lo < 11 / 272 < hi
    assert m.binomial_test(7, 40, 0.05) == pytest.approx(stats.binomtest(7, 40, 0.05, alternative="greater").pvalue)
    assert m.fisher_test(7, 40, 3, 80) == pytest.approx(
        stats.fisher_exact([[7, 33], [3, 77]], alternative="greater").pvalue)
    assert m.mcnemar_exact(8, 1) == pytest.approx(stats.binomtest(8, 9, 0.5).pvalue)
    assert m.mcnemar_exact(0, 0) == 1.0
    assert math.isnan(m.binomial_test(0, 0, 0.1))
