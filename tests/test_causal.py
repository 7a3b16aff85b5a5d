"""Steering statistics agree with scipy and hand-checked values, survive degenerate inputs, and are calibrated."""

import itertools
import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from pva_sae.stats import calibration as cal
from pva_sae.stats import causal as cs


def random_flips(rng, n=30, K=8, rate=0.2):
    return rng.random(n) < rate, rng.random((K, n)) < rate


# --------------------------------------------------------------------------- intervals

@pytest.mark.parametrize("k,n,level", [(0, 10, 0.95), (3, 10, 0.95), (10, 10, 0.9), (7, 389, 0.99), (1, 1, 0.95)])
def test_clopper_pearson_matches_scipy(k, n, level):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    assert cs.clopper_pearson(k, n, level) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_hand_value_and_empty():
    assert cs.wilson(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert cs.wilson(0, 10)[0] == 0.0
    assert all(math.isnan(x) for x in cs.wilson(0, 0) + cs.clopper_pearson(0, 0))


# --------------------------------------------------------------------------- typical-direction tests

def test_rank_p_counts_ties_against_the_target():
    assert cs.rank_p(0.3, [0.1, 0.3, 0.5]) == pytest.approx(3 / 4)
    assert cs.rank_p(0.9, [0.1, 0.3, 0.5]) == pytest.approx(1 / 4)
    assert cs.rank_p(0.0, [0.0, 0.0]) == 1.0
    assert math.isnan(cs.rank_p(0.5, []))


def test_prediction_p_raw_matches_hand_t():
    controls = np.array([0.1, 0.2, 0.3, 0.4])
    t = (0.6 - 0.25) / (np.std(controls, ddof=1) * math.sqrt(1 + 1 / 4))
    assert cs.prediction_p(0.6, controls) == pytest.approx(stats.t.sf(t, 3), rel=1e-12)


def _hand_t_p(x, xc):
    t = (x - xc.mean()) / (xc.std(ddof=1) * math.sqrt(1 + 1 / xc.size))
    return stats.t.sf(t, xc.size - 1)


def test_prediction_p_on_counts_is_the_larger_of_logit_and_angular():
    n, counts, k = 20, np.array([1, 2, 2, 3, 5]), 8
    logit = _hand_t_p(np.log((k - 0.5 + 0.5) / (n - k + 0.5 + 0.5)), np.log((counts + 0.5) / (n - counts + 0.5)))
    angular = _hand_t_p(np.arcsin(np.sqrt((k - 0.5 + 0.375) / (n + 0.75))),
                        np.arcsin(np.sqrt((counts + 0.375) / (n + 0.75))))
    assert cs.prediction_p(k / n, counts / n, n_tasks=n) == pytest.approx(min(1 / 6, max(logit, angular)), rel=1e-12)
    assert cs.prediction_p(17 / n, counts / n, n_tasks=n) < 1 / 6  # far above the controls: below the rank floor
    assert cs.prediction_p(0.0, counts / n, n_tasks=n) == 1.0  # no flip is no evidence


def test_prediction_p_on_counts_is_rank_p_unless_the_target_tops_every_control():
    n, counts = 20, np.array([1, 2, 2, 3, 5, 9])
    for k in (2, 5, 9):
        assert cs.prediction_p(k / n, counts / n, n_tasks=n) == cs.rank_p(k / n, counts / n)


def test_prediction_p_zero_spread_falls_back_to_rank():
    assert cs.prediction_p(0.2, [0.1] * 5) == pytest.approx(1 / 6)
    assert cs.prediction_p(0.1, [0.1] * 5, n_tasks=10) == 1.0
    assert math.isnan(cs.prediction_p(0.2, [0.1]))


# --------------------------------------------------------------------------- average-of-controls tests

def brute_force_permutation_p(t, c):
    """P(S* >= S) by enumerating every per-task choice of the arm that carries the target label."""
    arms = np.vstack([t, c]).astype(float)
    observed, hits, total = t.sum(), 0, 0
    for pick in itertools.product(range(arms.shape[0]), repeat=t.size):
        hits += arms[list(pick), range(t.size)].sum() >= observed - 0.5
        total += 1
    return hits / total


def test_permutation_p_exact_matches_enumeration_and_monte_carlo():
    rng = np.random.default_rng(3)
    for _ in range(5):
        t, c = random_flips(rng, n=5, K=2, rate=0.4)
        exact = cs.permutation_p(t, c, n_permutations=None)
        assert exact == pytest.approx(brute_force_permutation_p(t, c), abs=1e-12)
        mc = cs.permutation_p(t, c, n_permutations=20000, seed=1)
        assert mc == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 20000) + 1e-4)
    assert cs.permutation_p(t, c, 500, seed=7) == cs.permutation_p(t, c, 500, seed=7)


def test_sign_test_hand_counts_and_scipy():
    t = [1, 1, 1, 0, 1]
    c = [[0, 0, 1, 1, 0]]  # K = 1: the drawn comparator is always this control
    res = cs.sign_test(t, c)
    assert (res["target_only"], res["comparator_only"]) == (3, 1)
    assert res["p"] == pytest.approx(5 / 16)
    assert cs.sign_test_p(t, c, alternative="two-sided") == pytest.approx(stats.binomtest(3, 4).pvalue)
    a = np.arange(1, 12)
    assert cs.binomial_half_greater(a, a + 4) == pytest.approx(
        [stats.binomtest(int(x), int(x) + 4, 0.5, alternative="greater").pvalue for x in a], rel=1e-10)


def test_sign_test_is_seeded():
    t, c = random_flips(np.random.default_rng(0), n=40, K=10, rate=0.3)
    assert cs.sign_test(t, c, seed=5) == cs.sign_test(t, c, seed=5)
    assert len({cs.sign_test(t, c, seed=s)["target_only"] for s in range(10)}) > 1


def test_paired_difference_estimate_and_seed():
    t, c = random_flips(np.random.default_rng(1), n=50, K=6, rate=0.3)
    res = cs.paired_difference(t, c, n_resamples=500, seed=2)
    assert res["estimate"] == pytest.approx(t.mean() - c.mean())
    assert res["ci"][0] <= res["estimate"] <= res["ci"][1]
    assert res == cs.paired_difference(t, c, n_resamples=500, seed=2)


# --------------------------------------------------------------------------- baseline comparisons and Holm

def test_mcnemar_hand_value_and_scipy():
    before = [1] * 3 + [0] * 7
    after = [1, 1, 0] + [1] * 5 + [0, 0]  # b = 1 corruption, c = 5 corrections
    assert cs.mcnemar_p(before, after) == pytest.approx(2 * 7 / 64)
    assert cs.mcnemar_p(before, after) == pytest.approx(stats.binomtest(1, 6, 0.5).pvalue)
    assert cs.mcnemar_p(before, before) == 1.0
    assert cs.mcnemar_p([], []) == 1.0
    rng = np.random.default_rng(4)
    b, a = rng.random((50, 30)) < 0.4, rng.random((50, 30)) < 0.5
    assert cs.mcnemar_p_batch(b, a) == pytest.approx([cs.mcnemar_p(x, y) for x, y in zip(b, a)], rel=1e-12)


def test_holm_hand_example():
    assert cs.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = cs.holm([0.01, float("nan"), None, 0.04])
    assert out[0] == pytest.approx(0.02) and out[3] == pytest.approx(0.04)
    assert math.isnan(out[1]) and math.isnan(out[2])
    assert cs.holm([0.6, 0.7]) == [1.0, 1.0]
    assert cs.holm([]) == []


def test_net_effect_and_difference():
    before = [1, 1, 0, 0, 0]
    after = [1, 0, 1, 1, 0]
    res = cs.net_effect(before, after, n_resamples=300, seed=0)
    assert (res["corrections"], res["corruptions"], res["n"]) == (2, 1, 5)
    assert res["estimate"] == pytest.approx(0.2)
    assert res["ci"][0] <= 0.2 <= res["ci"][1]
    diff = cs.net_effect_difference(before, after, before, n_resamples=300, seed=0)
    assert diff["estimate"] == pytest.approx(0.2) and diff["net_b"] == 0.0
    assert diff["ci"] == res["ci"]  # same resample weights as net_effect on the same per-task change
    assert cs.net_effect([], [])["estimate"] is None


# --------------------------------------------------------------------------- one experiment

def test_experiment_tests_layout_and_json():
    rng = np.random.default_rng(6)
    t, c = random_flips(rng, n=40, K=6, rate=0.25)
    kinds = ["latent"] * 3 + ["random"] * 3
    res = cs.experiment_tests(t, c, kinds, n_permutations=2000, n_resamples=300, seed=1, level=0.95)
    assert res["n"] == 40 and res["rate"]["successes"] == int(t.sum())
    assert set(res["controls_summary"]["by_kind"]) == {"latent", "random"}
    assert res["rank_p"]["null"] == res["prediction_p"]["null"] == cs.NULL_TYPICAL
    for key in ("permutation_p", "sign_test_p", "paired_difference"):
        assert res[key]["null"] == cs.NULL_AVERAGE
    assert res["rank_p"]["p"] == cs.rank_p(t.mean(), c.mean(axis=1))
    assert res["permutation_p"]["p"] == cs.permutation_p(t, c, 2000, seed=1)
    assert res["sign_test_p"]["p"] == cs.sign_test_p(t, c, seed=1)
    assert res["rank_p"]["by_kind"]["latent"] == cs.rank_p(t.mean(), c[:3].mean(axis=1))
    json.dumps(res, allow_nan=False)
    assert res == cs.experiment_tests(t, c, kinds, n_permutations=2000, n_resamples=300, seed=1, level=0.95)


@pytest.mark.parametrize("t,c", [
    (np.zeros(0, bool), np.zeros((5, 0), bool)),   # no relevant task
    (np.ones(10, bool), np.zeros((0, 10), bool)),  # no control
    (np.zeros(10, bool), np.zeros((4, 10), bool)),  # nothing flips
])
def test_degenerate_inputs_do_not_crash_or_warn(t, c):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = cs.experiment_tests(t, c, n_permutations=200, n_resamples=100)
        json.dumps(res, allow_nan=False)
    if t.size == 0 or c.shape[0] == 0:
        assert res["rank_p"]["p"] is None and res["permutation_p"]["p"] is None and res["sign_test_p"]["p"] is None
    else:
        assert res["permutation_p"]["p"] == 1.0 and res["sign_test_p"]["p"] == 1.0 and res["rank_p"]["p"] == 1.0
        assert res["prediction_p"]["p"] == 1.0 and res["paired_difference"]["ci"] == [0.0, 0.0]


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        cs.experiment_tests([0, 1, 2], [[0, 1, 1]])
    with pytest.raises(ValueError):
        cs.experiment_tests([0, 1], [[0, 1, 1]])
    with pytest.raises(ValueError):
        cs.experiment_tests([0, 1], [[0, 1]], kinds=["latent", "random"])


# --------------------------------------------------------------------------- legacy tests and calibration

def test_legacy_batch_matches_scipy_functions():
    rng = np.random.default_rng(8)
    t, c = rng.random((20, 15)) < 0.3, rng.random((20, 4, 15)) < 0.2
    batch = cal.legacy_batch(t.astype(float), c.astype(float))
    for r in range(20):
        k, kc = int(t[r].sum()), int(c[r].sum())
        assert batch["legacy: binomial vs pooled control rate"][r] == pytest.approx(
            cal.legacy_pooled_binomial_p(k, 15, kc / 60), rel=1e-9)
        assert batch["legacy: Fisher vs pooled controls"][r] == pytest.approx(
            cal.legacy_pooled_fisher_p(k, 15, kc, 60), rel=1e-9)
        assert batch["legacy: one-cell McNemar"][r] == pytest.approx(cal.legacy_one_cell_mcnemar_p(k), rel=1e-12)


def _setting(design: str, experiment: str, rate: float) -> cal.Setting:
    d = next(x for x in cal.DESIGNS if x.name == design)
    return cal.Setting(d, experiment, rate, cal.POTENCY_MODELS[0])


def test_calibration_reported_tests_hold_their_null_and_legacy_binomial_does_not():
    """Small seeded simulation: a reported test over its own null by > 3 MC SE fails the suite."""
    reps = 1000
    limit = 0.05 + 3 * math.sqrt(0.05 * 0.95 / reps)
    high_rate = cal.Setting(cal.DESIGNS[3], "corruption", 0.60, cal.POTENCY_MODELS[1])  # 116 tasks, K = 60
    for setting in (_setting("cpu-24", "correction", 0.10), _setting("cpu-24", "corruption", 0.30), high_rate):
        for scenario, null in cal.NULL_OF_SCENARIO.items():
            cell = cal.run_direction_cell(setting, scenario, reps, seed=11, n_resamples=200, n_signflips=200)
            for spec in cal.TESTS:
                if spec.reported_null == null:
                    assert cell["rejection"][spec.name]["0.05"] <= limit, (spec.name, setting.label, scenario)
    base = cal.run_baseline_cell(cal.BASELINE_DESIGNS[0], 0.10, "balanced", reps, seed=11, n_resamples=200)
    assert base["rejection"]["mcnemar_p"]["0.05"] <= limit
    strong = cal.run_direction_cell(_setting("cpu-60", "corruption", 0.30), "typical", reps, seed=11,
                                    n_resamples=200, n_signflips=200)
    assert strong["rejection"]["legacy: binomial vs pooled control rate"]["0.05"] > limit
    assert strong["rejection"]["rank_p"]["0.05"] <= limit


def test_calibration_cells_are_deterministic():
    s = _setting("cpu-24", "correction", 0.05)
    assert cal.run_direction_cell(s, "average", 50, seed=3) == cal.run_direction_cell(s, "average", 50, seed=3)
