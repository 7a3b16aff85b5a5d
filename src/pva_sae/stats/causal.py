"""Statistics of the steering experiments: does the target direction do more than control directions?

One experiment steers every arm on the same tasks under the same batch plan: the TARGET direction,
K CONTROL directions (latent and random unit directions, each with a ``kind``) and an alpha = 0
BASELINE. A task *flips* when the steered arm changes the baseline's outcome in the tested way
(correction: baseline failed, arm passes; corruption: baseline passed, arm fails), so every arm is
scored on the same *relevant* tasks, defined by the baseline. Inputs here are

* ``target_flips``: ``(n,)`` booleans or 0/1, the target's flips on the n relevant tasks;
* ``control_flips``: ``(K, n)`` booleans or 0/1, one row per control, same task order;
* ``kinds``: K strings naming each control's kind (e.g. "latent", "random").

An arm's *effect* is its flip rate on the relevant tasks. Two different nulls are tested, and every
p-value says which one (``NULL_TYPICAL`` / ``NULL_AVERAGE``):

* ``NULL_TYPICAL``: the target is one more draw from the population of directions the controls
  come from, i.e. its whole row of outcomes is exchangeable with the controls' rows. Rejecting it
  licenses "the target is atypically effective *as a direction*". Tests: ``rank_p`` (exact),
  ``prediction_p`` (equal to ``rank_p`` down to its floor 1/(K+1), parametric below it).
* ``NULL_AVERAGE``: on each of these tasks the target flips with the probability the controls flip
  with on average. Rejecting it licenses only "on these tasks the target flips more than the
  average control", which a typical-but-strong direction also does (directions differ in potency),
  so these tests reject ``NULL_TYPICAL``-true cases often; see docs/statistics.md. Tests:
  ``permutation_p`` and ``sign_test_p``; ``paired_difference`` gives the effect size.

Baseline comparisons over all tasks: ``mcnemar_p`` (does steering change outcomes at all),
``net_effect`` and ``net_effect_difference`` (change of pass@1 with task-bootstrap intervals).
``holm`` adjusts p-values across experiments.

Functions of one experiment take and return plain values; the ``*_batch`` cores take a leading axis
of R replications and are what the calibration simulation (``pva_sae.stats.calibration``) runs, so
the calibrated code is the shipped code. Undefined results (no relevant task, no control) are NaN
in float returns and None in dict returns (JSON-safe), never an exception or a warning.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

NULL_TYPICAL = "target is a typical direction (exchangeable with controls)"
NULL_AVERAGE = "target does what the controls do on average on these tasks"

_NAN = float("nan")
_TIE = 1e-12  # effects are means of 0/1 over the same tasks; ties are exact up to rounding


# --------------------------------------------------------------------------- inputs

def _bool01(x: ArrayLike, name: str) -> np.ndarray:
    """float64 copy of a 0/1 or boolean array; ValueError for anything else."""
    a = np.asarray(x)
    if a.dtype != bool and a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must be boolean or 0/1")
    return a.astype(np.float64)


def flips_arrays(target_flips: ArrayLike, control_flips: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(n,)`` target and ``(K, n)`` control flips as float64 0/1 (K may be 0)."""
    t = _bool01(target_flips, "target_flips").ravel()
    c = _bool01(control_flips, "control_flips")
    if c.size == 0 and c.ndim != 2:  # no controls; (K, 0) for K controls on no task stays as it is
        c = c.reshape(0, t.size)
    if c.ndim == 1:
        c = c[None, :]
    if c.ndim != 2 or c.shape[1] != t.size:
        raise ValueError(f"control_flips must be (K, {t.size}), got {c.shape}")
    return t, c


def _paired(before: ArrayLike, after: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    b = _bool01(before, "before").ravel()
    a = _bool01(after, "after").ravel()
    if a.shape != b.shape:
        raise ValueError(f"before ({b.size}) and after ({a.size}) differ in length")
    return b, a


def _none_if_nan(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# --------------------------------------------------------------------------- proportions

def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper & Pearson 1934) interval of a binomial proportion from beta quantiles.

    lo = Beta(a/2; k, n-k+1), hi = Beta(1-a/2; k+1, n-k) with a = 1 - level; lo = 0 at k = 0 and
    hi = 1 at k = n. Same as ``scipy.stats.binomtest(k, n).proportion_ci(level, method="exact")``.
    (nan, nan) when n = 0.
    """
    if n == 0:
        return _NAN, _NAN
    a = 1.0 - level
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson (1927) score interval of a binomial proportion; (nan, nan) when n = 0."""
    if n == 0:
        return _NAN, _NAN
    z = float(stats.norm.ppf((1 + level) / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# --------------------------------------------------------------------------- NULL_TYPICAL

def rank_p_batch(target_effect: np.ndarray, control_effects: np.ndarray) -> np.ndarray:
    """``rank_p`` of R experiments: ``target_effect (R,)``, ``control_effects (R, K)``, K >= 1."""
    at_least = (control_effects >= target_effect[:, None] - _TIE).sum(axis=1)
    return (1.0 + at_least) / (1.0 + control_effects.shape[1])


def rank_p(target_effect: float, control_effects: ArrayLike) -> float:
    """One-sided Monte Carlo rank p-value (1 + #{controls with effect >= target}) / (1 + K).

    Exact under ``NULL_TYPICAL``: if the target's effect is exchangeable with the K controls'
    effects, its rank among the K+1 is uniform, so P(p <= a) <= a for every a (ties count against
    the target, which keeps it valid). Its smallest value is 1/(K+1). NaN without controls.
    """
    c = np.asarray(control_effects, dtype=np.float64).ravel()
    if c.size == 0 or not math.isfinite(target_effect):
        return _NAN
    return float(rank_p_batch(np.array([float(target_effect)]), c[None, :])[0])


def logit_count(k: np.ndarray, n: int) -> np.ndarray:
    """Empirical logit log((k + 1/2) / (n - k + 1/2)) (Haldane/Anscombe), finite at k = 0 and n."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(k + 0.5) - np.log(n - k + 0.5)


def angular_count(k: np.ndarray, n: int) -> np.ndarray:
    """Anscombe (1948) angular transform arcsin sqrt((k + 3/8) / (n + 3/4)) of a binomial count."""
    return np.arcsin(np.sqrt(np.clip((k + 0.375) / (n + 0.75), 0.0, 1.0)))


def t_prediction_p(x: np.ndarray, xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-sided t prediction p of ``x (R,)`` against ``xc (R, K)`` and whether the controls' sd > 0."""
    K = xc.shape[1]
    sd = xc.std(axis=1, ddof=1)
    spread = sd > _TIE
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (x - xc.mean(axis=1)) / (np.where(spread, sd, 1.0) * math.sqrt(1.0 + 1.0 / K))
    return stats.t.sf(t, K - 1), spread


def prediction_p_batch(target_effect: np.ndarray, control_effects: np.ndarray,
                       n_tasks: int | None = None) -> np.ndarray:
    """``prediction_p`` of R experiments: ``target_effect (R,)``, ``control_effects (R, K)``."""
    K = control_effects.shape[1]
    if K < 2:
        return np.full(target_effect.shape, _NAN)
    rank = rank_p_batch(target_effect, control_effects)
    if n_tasks is None:
        p, spread = t_prediction_p(target_effect, control_effects)
        return np.where(spread, p, rank)
    k_target = np.rint(target_effect * n_tasks) - 0.5  # continuity correction: P(X >= k) ~ P(Z >= k - 1/2)
    k_controls = np.rint(control_effects * n_tasks)
    p_logit, spread = t_prediction_p(logit_count(k_target, n_tasks), logit_count(k_controls, n_tasks))
    p_angular, _ = t_prediction_p(angular_count(k_target, n_tasks), angular_count(k_controls, n_tasks))
    above_all = rank <= 1.0 / (K + 1) + _TIE
    return np.where(above_all & spread, np.minimum(rank, np.maximum(p_logit, p_angular)), rank)


def prediction_p(target_effect: float, control_effects: ArrayLike, n_tasks: int | None = None) -> float:
    """One-sided p of the target against a t prediction interval of the controls' effects.

    t = (x - mean) / (sd * sqrt(1 + 1/K)) with df = K - 1 is exactly t-distributed when the K + 1
    values are iid normal (the prediction interval of one new draw; e.g. Hahn & Meeker 1991), so it
    tests ``NULL_TYPICAL`` under a normality assumption and, unlike ``rank_p``, can go below the
    rank floor 1/(K+1).

    Flip rates are bounded, skewed and discrete: on raw rates (``n_tasks=None``, the plain formula)
    the t is anticalibrated (false-positive rate up to ~9% at a = 0.05 in the calibration,
    docs/statistics.md), so that form is descriptive only. With ``n_tasks`` (what
    ``experiment_tests`` passes) the effects are read as flip counts k of n_tasks tasks and:

    * the t is computed on two variance-stabilising scales, the empirical logit
      log((k + 1/2)/(n - k + 1/2)) and Anscombe's angular arcsin sqrt((k + 3/8)/(n + 3/4)), with the
      target evaluated at k - 1/2 (continuity correction); p_t = the larger of the two (each scale
      alone is liberal somewhere: logit at high flip rates, angular at low ones);
    * rank-based fallback: p = ``rank_p`` unless the target is above every control, and
      min(1/(K+1), p_t) when it is. So P(p <= a) = P(rank_p <= a) <= a exactly for every
      a >= 1/(K+1); only below the rank floor does the p rest on the t model (calibrated for
      log-normal potency, up to about twice nominal for heavy-tailed potency, docs/statistics.md).

    sd = 0 (all controls have the same effect): the t is undefined and the function returns
    ``rank_p`` (target above them: 1/(K+1); otherwise 1). NaN when K < 2.
    """
    c = np.asarray(control_effects, dtype=np.float64).ravel()
    if c.size < 2 or not math.isfinite(target_effect):
        return _NAN
    return float(prediction_p_batch(np.array([float(target_effect)]), c[None, :], n_tasks)[0])


# --------------------------------------------------------------------------- NULL_AVERAGE

def permutation_p_exact_batch(target_flips: np.ndarray, control_flips: np.ndarray) -> np.ndarray:
    """Exact arm-label permutation p of R experiments: ``target_flips (R, n)``, ``control_flips (R, K, n)``.

    Relabelling each task independently puts the target label on one of the K + 1 arms uniformly, so
    the permuted target outcome on task i is Bernoulli(m_i / (K + 1)) with m_i the task's number of
    flipping arms, and the permuted statistic S* = sum_i of those is Poisson-binomial. Its upper
    tail P(S* >= S) is computed exactly by the convolution recursion over tasks.
    """
    R, n = target_flips.shape
    K = control_flips.shape[1]
    share = (target_flips + control_flips.sum(axis=1)) / (K + 1.0)
    dist = np.zeros((R, n + 1))
    dist[:, 0] = 1.0
    for i in range(n):
        p = share[:, i:i + 1]
        nxt = dist * (1.0 - p)
        nxt[:, 1:] += dist[:, :-1] * p
        dist = nxt
    upper = np.cumsum(dist[:, ::-1], axis=1)[:, ::-1]  # upper[:, s] = P(S* >= s)
    observed = np.rint(target_flips.sum(axis=1)).astype(int)
    return np.clip(upper[np.arange(R), observed], 0.0, 1.0)


def permutation_p(target_flips: ArrayLike, control_flips: ArrayLike, n_permutations: int | None = 10000,
                  seed: int = 0) -> float:
    """One-sided per-task arm-label permutation test of ``NULL_AVERAGE``.

    Statistic: the mean per-task difference d_i = target_i - mean_k control_ki. Within a task the
    K + 1 arms' total m_i is fixed under relabelling, so d_i = (1 + 1/K) target_i - m_i / K and the
    test is equivalent to one on S = sum_i target_i. Null distribution: in every task independently
    the target's label is swapped with that of an arm drawn uniformly from the K + 1 (itself
    included). Assumed exchangeability: on each task, the target's outcome is exchangeable with the
    controls' outcomes; tasks are independent. This is exact when all arms share each task's flip
    probability and approximate when controls differ in potency and the target has their average
    flip probability (NULL_AVERAGE); the calibration shows it conservative there (type-I <= 0.05).
    It does NOT hold under NULL_TYPICAL with potency varying across directions: a direction's
    potency is shared across tasks, which per-task relabelling ignores.

    A naive sign flip of d_i assumes d_i symmetric about 0, which it is not (target 0/1, control
    mean in [0, 1], rare flips), hence the arm-label scheme.

    ``n_permutations=None`` returns the exact permutation p (``permutation_p_exact_batch``); an int
    draws that many relabellings with ``np.random.default_rng(seed)`` and returns
    (1 + #{S* >= S}) / (1 + n_permutations). NaN without tasks or controls.
    """
    t, c = flips_arrays(target_flips, control_flips)
    n, K = t.size, c.shape[0]
    if n == 0 or K == 0:
        return _NAN
    if n_permutations is None:
        return float(permutation_p_exact_batch(t[None, :], c[None, :, :])[0])
    arms = np.vstack([t[None, :], c])
    rng = np.random.default_rng(seed)
    observed = t.sum()
    at_least, done, cols = 0, 0, np.arange(n)
    while done < n_permutations:
        b = min(2048, n_permutations - done)
        pick = rng.integers(0, K + 1, size=(b, n))
        at_least += int((arms[pick, cols].sum(axis=1) >= observed - 0.5).sum())
        done += b
    return (1.0 + at_least) / (1.0 + n_permutations)


def sign_counts_batch(target_flips: np.ndarray, control_flips: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Discordant counts vs one control drawn per task: (#target-only, #comparator-only), each (R,)."""
    R, K, n = control_flips.shape
    pick = rng.integers(0, K, size=(R, n))
    comparator = np.take_along_axis(control_flips, pick[:, None, :], axis=1)[:, 0, :]
    target_only = ((target_flips > 0.5) & (comparator < 0.5)).sum(axis=1)
    comparator_only = ((target_flips < 0.5) & (comparator > 0.5)).sum(axis=1)
    return target_only, comparator_only


def binomial_half_greater(successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
    """P(Binomial(trials, 1/2) >= successes), vectorised; 1 for zero trials."""
    return stats.binom.sf(np.asarray(successes) - 1, np.asarray(trials), 0.5)


def sign_test(target_flips: ArrayLike, control_flips: ArrayLike, seed: int = 0,
              alternative: str = "greater") -> dict[str, Any]:
    """Exact sign (binomial) test of ``NULL_AVERAGE`` against one randomly drawn control per task.

    For every task one control j_i is drawn uniformly (``np.random.default_rng(seed)``). Under
    NULL_AVERAGE the target flips with probability pbar_i = mean_k p_ki, so with j_i independent of
    the outcomes P(t=1, c_j=0) = pbar_i - pbar_i^2 = P(t=0, c_j=1): each discordant task is
    "target only" or "comparator only" with probability 1/2, independently across tasks, and
    binomtest(#target only, #discordant, 0.5) is exact given the discordant set.

    Comparing instead with "most controls" (majority vote) is not balanced: with rare flips the
    majority rarely flips, so any single direction that flips sometimes looks better (the
    calibration shows false-positive rates near 1 for it). The p-value depends on the draw, hence
    the seed. Returns {"p", "target_only", "comparator_only"}; p is None without tasks or controls.
    """
    t, c = flips_arrays(target_flips, control_flips)
    if t.size == 0 or c.shape[0] == 0:
        return {"p": None, "target_only": 0, "comparator_only": 0}
    a, b = sign_counts_batch(t[None, :], c[None, :, :], np.random.default_rng(seed))
    a, b = int(a[0]), int(b[0])
    p = 1.0 if a + b == 0 else float(stats.binomtest(a, a + b, 0.5, alternative=alternative).pvalue)
    return {"p": p, "target_only": a, "comparator_only": b}


def sign_test_p(target_flips: ArrayLike, control_flips: ArrayLike, seed: int = 0,
                alternative: str = "greater") -> float:
    """p-value of ``sign_test`` (NaN without tasks or controls)."""
    p = sign_test(target_flips, control_flips, seed, alternative)["p"]
    return _NAN if p is None else p


# --------------------------------------------------------------------------- bootstrap intervals

def bootstrap_means_batch(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Task-bootstrap means ``(R, n_resamples)`` of ``values (R, n)``.

    A resample draws n tasks with replacement, represented by multinomial counts w (sum n); its mean
    is values @ w / n. The R rows share the resample counts (they are independent replications, so
    this only correlates their Monte Carlo errors).
    """
    n = values.shape[1]
    return values @ _resample_counts(n, n_resamples, rng).T / n


def _resample_counts(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Multinomial counts ``(n_resamples, n)`` of a task bootstrap, drawn from ``rng``."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)


@functools.lru_cache(maxsize=4)
def _seeded_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """``_resample_counts`` from a fresh ``default_rng(seed)``, remembered (read-only): the steering stage draws
    the same resamples for the target and each of its 120 controls (5 s of draws on the GPU host before)."""
    counts = _resample_counts(n, n_resamples, np.random.default_rng(seed))
    counts.flags.writeable = False
    return counts


def percentile_interval(means: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13) along the last axis."""
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=-1)
    return lo, hi


def _bootstrap_mean(values: np.ndarray, n_resamples: int, seed: int, level: float) -> dict[str, Any]:
    if values.size == 0:
        return {"estimate": None, "ci": [None, None]}
    n = values.size
    if isinstance(seed, (int, np.integer)):   # bootstrap_means_batch from default_rng(seed), its draws remembered
        means = values[None, :] @ _seeded_counts(n, n_resamples, int(seed)).T / n
    else:
        means = bootstrap_means_batch(values[None, :], n_resamples, np.random.default_rng(seed))
    lo, hi = percentile_interval(means, level)
    return {"estimate": float(values.mean()), "ci": [float(lo[0]), float(hi[0])]}


def paired_difference(target_flips: ArrayLike, control_flips: ArrayLike, n_resamples: int = 2000,
                      seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Mean per-task difference d_i = target_i - mean_k control_ki with a task-bootstrap interval.

    The estimate is target rate minus mean control rate on the same tasks; resampling tasks keeps
    the pairing (a fragile task moves all arms together). The percentile interval is an effect size,
    not a test: at n <= 60 with rare flips "0 outside the interval" rejects NULL_AVERAGE far more
    often than 5% (docs/statistics.md); ``permutation_p`` is the test. None without tasks or
    controls.
    """
    t, c = flips_arrays(target_flips, control_flips)
    if t.size == 0 or c.shape[0] == 0:
        return {"estimate": None, "ci": [None, None]}
    return _bootstrap_mean(t - c.mean(axis=0), n_resamples, seed, level)


# --------------------------------------------------------------------------- baseline comparisons

def mcnemar_p_batch(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Exact two-sided McNemar p of R paired tables ``(R, n)``: min(1, 2 P(Bin(b + c, 1/2) <= min(b, c)))."""
    b = ((before > 0.5) & (after < 0.5)).sum(axis=-1)
    c = ((before < 0.5) & (after > 0.5)).sum(axis=-1)
    return np.minimum(1.0, 2.0 * stats.binom.cdf(np.minimum(b, c), b + c, 0.5))


def mcnemar_p(before: ArrayLike, after: ArrayLike) -> float:
    """Exact two-sided McNemar test (McNemar 1947) of paired booleans over ALL tasks.

    before = baseline passed, after = steered arm passed. Both discordant cells count: b = passed ->
    failed (corruptions), c = failed -> passed (corrections); under "steering is as likely to correct
    as to corrupt a changed task" b ~ Binomial(b + c, 1/2). Equals
    ``scipy.stats.binomtest(b, b + c, 0.5).pvalue``; 1 when nothing changed (or no tasks).
    """
    b, a = _paired(before, after)
    return float(mcnemar_p_batch(b[None, :], a[None, :])[0])


def holm(pvalues: Sequence[float | None]) -> list[float]:
    """Holm (1979) step-down adjusted p-values, in input order.

    Sorted ascending p_(1) <= ... <= p_(m): adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)), which
    controls the family-wise error rate under any dependence. NaN/None entries are returned as NaN
    and do not count in m.
    """
    p = np.array([_NAN if x is None else float(x) for x in pvalues], dtype=np.float64)
    out = np.full(p.shape, _NAN)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return out.tolist()
    order = ok[np.argsort(p[ok], kind="mergesort")]
    m = order.size
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return out.tolist()


def net_effect(before: ArrayLike, after: ArrayLike, n_resamples: int = 2000, seed: int = 0,
               level: float = 0.95) -> dict[str, Any]:
    """Delta pass@1 = (corrections - corruptions) / n over all tasks, with a task-bootstrap interval.

    before = baseline passed, after = steered passed; the per-task change after_i - before_i is in
    {-1, 0, 1} and its mean is the change of pass@1. None estimate/interval for n = 0.
    """
    b, a = _paired(before, after)
    res = _bootstrap_mean(a - b, n_resamples, seed, level)
    res.update(corrections=int(((b < 0.5) & (a > 0.5)).sum()), corruptions=int(((b > 0.5) & (a < 0.5)).sum()),
               n=int(b.size))
    return res


def net_effect_difference(before: ArrayLike, after_a: ArrayLike, after_b: ArrayLike, n_resamples: int = 2000,
                          seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Paired difference of two arms' net effects (e.g. selective minus constant steering).

    net_a - net_b = mean_i(after_a_i - after_b_i) (the baseline cancels); resampling the per-task
    difference applies the same resample weights to both arms, which keeps their correlation.
    Returns {"estimate", "ci", "n", "net_a", "net_b"}.
    """
    b, a = _paired(before, after_a)
    _, a2 = _paired(before, after_b)
    res = _bootstrap_mean(a - a2, n_resamples, seed, level)
    res.update(n=int(b.size), net_a=_none_if_nan(float((a - b).mean()) if b.size else _NAN),
               net_b=_none_if_nan(float((a2 - b).mean()) if b.size else _NAN))
    return res


# --------------------------------------------------------------------------- one experiment

def _kinds(kinds: Sequence[str] | None, K: int) -> list[str]:
    ks = ["control"] * K if kinds is None else [str(k) for k in kinds]
    if len(ks) != K:
        raise ValueError(f"{len(ks)} kinds for {K} controls")
    return ks


def experiment_tests(target_flips: ArrayLike, control_flips: ArrayLike, kinds: Sequence[str] | None = None, *,
                     n_permutations: int | None = 10000, n_resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, Any]:
    """Every statistic of one experiment, in the layout the report reads.

    Rates are on the relevant tasks (defined by the alpha = 0 baseline); the rate interval is
    Clopper-Pearson. Each component uses ``seed`` as if called on its own, so a reviewer can
    reproduce any number with the single function. Undefined values are None.
    """
    t, c = flips_arrays(target_flips, control_flips)
    n, K = t.size, c.shape[0]
    ks = _kinds(kinds, K)
    k = int(t.sum())
    effect = k / n if n else _NAN
    control_effects = c.mean(axis=1) if n else np.full(K, _NAN)
    lo, hi = clopper_pearson(k, n, level)
    by_kind: dict[str, dict[str, Any]] = {}
    rank_by_kind: dict[str, float | None] = {}
    for kind in dict.fromkeys(ks):
        rows = np.array([x == kind for x in ks])
        by_kind[kind] = {"mean_rate": _none_if_nan(float(control_effects[rows].mean())) if n else None,
                         "n_controls": int(rows.sum())}
        rank_by_kind[kind] = _none_if_nan(rank_p(effect, control_effects[rows])) if n else None
    sign = sign_test(t, c, seed)
    return {
        "n": n,
        "n_controls": K,
        "level": level,
        "rate": {"estimate": _none_if_nan(effect), "ci": [_none_if_nan(lo), _none_if_nan(hi)], "successes": k,
                 "n": n, "method": "clopper-pearson"},
        "controls_summary": {"mean_rate": _none_if_nan(float(control_effects.mean())) if n and K else None,
                             "by_kind": by_kind},
        "rank_p": {"p": _none_if_nan(rank_p(effect, control_effects)) if n else None, "null": NULL_TYPICAL,
                   "by_kind": rank_by_kind},
        "prediction_p": {"p": _none_if_nan(prediction_p(effect, control_effects, n)) if n else None,
                         "null": NULL_TYPICAL},
        "paired_difference": {**paired_difference(t, c, n_resamples, seed, level), "null": NULL_AVERAGE},
        "permutation_p": {"p": _none_if_nan(permutation_p(t, c, n_permutations, seed)), "null": NULL_AVERAGE},
        "sign_test_p": {"p": sign["p"], "null": NULL_AVERAGE, "target_only": sign["target_only"],
                        "comparator_only": sign["comparator_only"]},
    }


# --------------------------------------------------------------------------- one experiment of arms

def outcome_flips(baseline: dict[int, dict], arm: dict[int, dict], ids: Sequence[int],
                  baseline_passed: bool) -> np.ndarray:
    """(n_relevant,) bool: on the tasks of ``ids`` whose baseline outcome is ``baseline_passed``, whether the
    arm's outcome differs from it. Outcomes are ``{task_id: {"passed": bool, ...}}``."""
    return np.array([arm[t]["passed"] != baseline_passed for t in ids if baseline[t]["passed"] == baseline_passed],
                    dtype=bool)


def arm_experiment(baseline: dict[int, dict], target: dict[int, dict], controls: Sequence[tuple[Any, dict[int, dict]]],
                   ids: Sequence[int], baseline_passed: bool, *, n_permutations: int, n_resamples: int, seed: int,
                   level: float, null: str) -> dict[str, Any]:
    """Target vs its controls on the relevant tasks (:func:`experiment_tests`), and McNemar of every arm against
    the baseline re-run over all of ``ids``; each control (an arm with ``label``, ``kind``, ``latent``) gets its
    flip rate with a Clopper-Pearson interval. ``null`` names what McNemar's null hypothesis is."""
    t = outcome_flips(baseline, target, ids, baseline_passed)
    c = (np.stack([outcome_flips(baseline, out, ids, baseline_passed) for _, out in controls])
         if controls else np.zeros((0, t.size), dtype=bool))
    res = experiment_tests(t, c, [arm.kind for arm, _ in controls], n_permutations=n_permutations,
                           n_resamples=n_resamples, seed=seed, level=level)
    before = [baseline[i]["passed"] for i in ids]
    res["mcnemar_p"] = {"p": mcnemar_p(before, [target[i]["passed"] for i in ids]), "null": null}
    res["controls"] = [{"label": arm.label, "kind": arm.kind, "latent": arm.latent,
                        "rate": float(row.mean()) if row.size else None, "successes": int(row.sum()), "n": int(row.size),
                        "ci": [None, None] if not row.size else
                        [float(x) for x in clopper_pearson(int(row.sum()), int(row.size), level)],
                        "mcnemar_p": mcnemar_p(before, [out[i]["passed"] for i in ids])}
                       for (arm, out), row in zip(controls, c)]
    return res
