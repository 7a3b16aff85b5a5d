"""Monte Carlo calibration of ``pva_sae.stats.causal``: false-positive rates under both nulls, and power.

Outcome tables are drawn with the structure of a steering experiment (docs/statistics.md, section
"Calibration"):

* tasks: each relevant task has a flip propensity q_i ~ Beta(mu * c, (1 - mu) * c) with
  concentration c = ``TASK_CONCENTRATION`` = 2 (heterogeneous: a few fragile tasks flip for many
  directions, most for none); mu is the setting's mean flip rate;
* directions: each direction has a potency z drawn from a ``Potency`` model: a shift of the
  log-odds (log-normal odds multiplier, or heavy-tailed Student t with 3 df) or a log-normal
  multiplier of the rate; direction k flips task i with probability p_ki = f(q_i, z_k);
* flips: independent Bernoulli(p_ki) per (direction, task).

Scenarios for the target direction: ``typical`` (NULL_TYPICAL: one more potency draw), ``average``
(NULL_AVERAGE: p_target,i = mean_k p_ki over the K drawn controls), and two stronger targets whose
potency sits at the 95th / 99.5th percentile of the potency distribution (power). A separate
baseline family draws whole-run tables (baseline vs steered over all tasks) for ``mcnemar_p`` and
the net-effect interval.

Every test of ``causal`` runs on every table through the same ``*_batch`` cores the package uses,
next to the tests the project used before (``legacy_*``) and rejected variants (the rows of
``TESTS`` with ``reported_null=None``), so the tables show why those were replaced. Deviations
from a single-experiment call, for speed: the permutation test uses its exact permutation
distribution (``causal.permutation_p_exact_batch``, the limit of infinitely many permutations);
bootstrap intervals use ``n_resamples`` resamples and the naive sign flip ``n_signflips`` flips, with
one resample matrix shared by the replications of a chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import special, stats

from pva_sae.stats import causal
from pva_sae.stats.causal import NULL_AVERAGE, NULL_TYPICAL

NULL_BASELINE = "steering as likely to correct as to corrupt a task (vs the alpha = 0 baseline)"
TASK_CONCENTRATION = 2.0
ALPHAS = (0.05, 0.01)
SCENARIOS = ("typical", "average", "stronger-95", "stronger-99.5")
NULL_OF_SCENARIO = {"typical": NULL_TYPICAL, "average": NULL_AVERAGE}
STRONGER_QUANTILE = {"stronger-95": 0.95, "stronger-99.5": 0.995}
MEAN_RATES = {"correction": (0.02, 0.05, 0.10), "corruption": (0.10, 0.30, 0.60)}
_CHUNK_CELLS = 2_000_000  # replications per chunk x arms x tasks


# --------------------------------------------------------------------------- models and designs

@dataclass(frozen=True)
class Potency:
    """Distribution of a direction's potency z and how it acts on a task's flip propensity q.

    ``scale="odds"``: logit p = logit q + z; ``scale="rate"``: p = min(1, q exp(z - sigma^2 / 2))
    (mean multiplier 1). ``dist`` is "normal" (z ~ N(0, sigma^2)) or "t3" (z ~ sigma * t_3).
    """

    name: str
    scale: str
    dist: str
    sigma: float

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        z = rng.standard_t(3, shape) if self.dist == "t3" else rng.standard_normal(shape)
        return self.sigma * z

    def quantile(self, q: float) -> float:
        return self.sigma * float(stats.t.ppf(q, 3) if self.dist == "t3" else stats.norm.ppf(q))

    def probs(self, task_q: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Flip probabilities ``(R, M, n)`` of M directions ``z (R, M)`` on tasks ``task_q (R, n)``."""
        if self.scale == "odds":
            return special.expit(special.logit(task_q)[:, None, :] + z[:, :, None])
        return np.minimum(1.0, task_q[:, None, :] * np.exp(z - self.sigma ** 2 / 2)[:, :, None])


POTENCY_MODELS = (
    Potency("odds-lognormal", "odds", "normal", 1.0),
    Potency("rate-lognormal", "rate", "normal", 1.0),
    Potency("odds-t3 (heavy tail)", "odds", "t3", 0.7),
)


@dataclass(frozen=True)
class Design:
    """A split of ``n_tasks`` relevant tasks steered with ``n_controls`` controls (half latent, half random)."""

    name: str
    n_tasks: int
    n_controls: int
    experiments: tuple[str, ...]

    @property
    def kinds(self) -> list[str]:
        half = self.n_controls // 2
        return ["latent"] * half + ["random"] * (self.n_controls - half)


DESIGNS = (
    Design("cpu-24", 24, 20, ("correction", "corruption")),
    Design("cpu-60", 60, 24, ("correction", "corruption")),
    Design("gemma-correction", 270, 60, ("correction",)),
    Design("gemma-corruption", 116, 60, ("corruption",)),
)


@dataclass(frozen=True)
class Setting:
    """One (design, experiment, mean flip rate, potency model) combination."""

    design: Design
    experiment: str
    mean_rate: float
    potency: Potency

    @property
    def label(self) -> str:
        return f"{self.design.name} {self.experiment} {self.mean_rate:.0%} {self.potency.name}"


def settings(designs: Iterable[Design] = DESIGNS, potencies: Iterable[Potency] = POTENCY_MODELS) -> list[Setting]:
    """All settings: every design x its experiments x their mean rates x potency models."""
    pots = tuple(potencies)
    return [Setting(d, e, mu, p) for d in designs for e in d.experiments for mu in MEAN_RATES[e] for p in pots]


@dataclass(frozen=True)
class BaselineDesign:
    """A whole run: ``n_tasks`` tasks of which the alpha = 0 baseline passes ``n_passed``."""

    name: str
    n_tasks: int
    n_passed: int


BASELINE_DESIGNS = (BaselineDesign("cpu-60 all tasks", 60, 24), BaselineDesign("gemma all tasks", 389, 116))
BASELINE_RATES = (0.02, 0.05, 0.10)
BASELINE_SCENARIOS = {"balanced": 1.0, "corrections x1.5": 1.5, "corrections x2": 2.0}


# --------------------------------------------------------------------------- drawing tables

def task_propensities(rng: np.random.Generator, mean_rate: float, shape: tuple[int, ...]) -> np.ndarray:
    """Per-task flip propensities ~ Beta(mean_rate * c, (1 - mean_rate) * c), kept off 0 and 1."""
    c = TASK_CONCENTRATION
    return np.clip(rng.beta(mean_rate * c, (1 - mean_rate) * c, shape), 1e-12, 1 - 1e-12)


def draw_tables(rng: np.random.Generator, setting: Setting, scenario: str, reps: int) -> tuple[np.ndarray, np.ndarray]:
    """Target flips ``(reps, n)`` and control flips ``(reps, K, n)`` (float 0/1) of one scenario."""
    n, K, pot = setting.design.n_tasks, setting.design.n_controls, setting.potency
    q = task_propensities(rng, setting.mean_rate, (reps, n))
    p_controls = pot.probs(q, pot.draw(rng, (reps, K)))
    if scenario == "typical":
        p_target = pot.probs(q, pot.draw(rng, (reps, 1)))[:, 0]
    elif scenario == "average":
        p_target = p_controls.mean(axis=1)
    else:
        p_target = pot.probs(q, np.full((reps, 1), pot.quantile(STRONGER_QUANTILE[scenario])))[:, 0]
    controls = (rng.random(p_controls.shape) < p_controls).astype(np.float64)
    target = (rng.random(p_target.shape) < p_target).astype(np.float64)
    return target, controls


def draw_baseline_tables(rng: np.random.Generator, design: BaselineDesign, mean_rate: float, factor: float,
                         reps: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline and steered pass/fail ``(reps, n_tasks)`` over all tasks.

    Failing tasks are corrected with propensity q_i (mean ``mean_rate``), passing ones corrupted with
    r_j (mean scaled so both expected counts match); the larger of sum q and sum r is then scaled
    down to the smaller, so expected corrections = expected corruptions exactly in every table
    (the McNemar null). ``factor`` multiplies the correction propensities (alternatives).
    """
    n_pass, n_fail = design.n_passed, design.n_tasks - design.n_passed
    q = task_propensities(rng, mean_rate, (reps, n_fail))
    r = task_propensities(rng, mean_rate * n_fail / n_pass, (reps, n_pass))
    sq, sr = q.sum(axis=1, keepdims=True), r.sum(axis=1, keepdims=True)
    q = q * np.minimum(1.0, sr / sq)
    r = r * np.minimum(1.0, sq / sr)
    q = np.minimum(1.0, q * factor)
    before = np.concatenate([np.ones((reps, n_pass)), np.zeros((reps, n_fail))], axis=1)
    corrupted = rng.random((reps, n_pass)) < r
    corrected = rng.random((reps, n_fail)) < q
    after = np.concatenate([~corrupted, corrected], axis=1).astype(np.float64)
    return before, after


# --------------------------------------------------------------------------- legacy tests (scipy)

def legacy_pooled_binomial_p(k: int, n: int, pooled_rate: float) -> float:
    """Old test (a): binomtest(k, n, pooled control rate, "greater"), the pooled rate treated as exact."""
    if n == 0:
        return float("nan")
    return float(stats.binomtest(k, n, min(max(pooled_rate, 0.0), 1.0), alternative="greater").pvalue)


def legacy_pooled_fisher_p(k: int, n: int, k_controls: int, n_controls: int) -> float:
    """Old test (b): Fisher exact on [[k, n - k], [kc, nc - kc]], controls pooled as independent trials."""
    if n == 0 or n_controls == 0:
        return float("nan")
    table = [[k, n - k], [k_controls, n_controls - k_controls]]
    return float(stats.fisher_exact(table, alternative="greater").pvalue)


def legacy_one_cell_mcnemar_p(k: int) -> float:
    """Old test (c): McNemar on (k, 0), the target run on one baseline class only: binomtest(k, k, 0.5)."""
    return 1.0 if k == 0 else float(stats.binomtest(k, k, 0.5).pvalue)


def legacy_batch(target: np.ndarray, controls: np.ndarray) -> dict[str, np.ndarray]:
    """The three legacy p-values for R tables, vectorised with the same distributions as above."""
    _, K, n = controls.shape
    k = target.sum(axis=1)
    kc = controls.sum(axis=(1, 2))
    pooled = kc / (K * n)
    return {
        "legacy: binomial vs pooled control rate": stats.binom.sf(k - 1, n, pooled),
        "legacy: Fisher vs pooled controls": stats.hypergeom.sf(k - 1, n + K * n, n, k + kc),
        "legacy: one-cell McNemar": np.minimum(1.0, 2.0 * 0.5 ** k),
    }


# --------------------------------------------------------------------------- tests on tables

@dataclass(frozen=True)
class Procedure:
    """A test in the calibration: the null it is reported for (None = not reported) and what it licenses."""

    name: str
    family: str
    reported_null: str | None
    licenses: str


TESTS = (
    Procedure("rank_p", "direction", NULL_TYPICAL,
             "Licenses 'the target is more effective than a typical direction'; exact at any K, but cannot go "
             "below 1/(K+1); it does not say the effect is large."),
    Procedure("rank_p (latent controls only)", "direction", NULL_TYPICAL,
             "As rank_p against the latent controls alone (floor 1/(K_latent+1)); licenses 'atypical among "
             "SAE-latent directions'."),
    Procedure("prediction_p", "direction", NULL_TYPICAL,
             "rank_p down to 1/(K+1), below it a t prediction interval on logit and angular scales of the "
             "flip counts: licenses 'atypical direction' beyond the rank floor under a roughly normal "
             "potency model; those small p-values are extrapolation."),
    Procedure("permutation_p", "direction", NULL_AVERAGE,
             "Per-task arm-label permutation: licenses 'on these tasks the target flips more than the average "
             "control'; not 'atypical direction' (a strong but typical direction rejects it often)."),
    Procedure("sign_test_p", "direction", NULL_AVERAGE,
             "Exact binomial test vs one random control per task: licenses the same claim as permutation_p "
             "with fewer assumptions and less power; not 'atypical direction'."),
    Procedure("mcnemar_p", "baseline", NULL_BASELINE,
             "Licenses 'steering changes pass/fail outcomes asymmetrically vs the baseline'; says nothing "
             "about controls."),
    Procedure("paired_difference: 95% CI excludes 0", "direction", None,
             "Percentile task-bootstrap interval of target minus mean control rate: an effect size; read as a "
             "test it over-rejects at small n, so it licenses no claim by itself."),
    Procedure("net_effect: 95% CI excludes 0", "baseline", None,
             "Percentile task-bootstrap interval of Delta pass@1: an effect size with its uncertainty; "
             "mcnemar_p is the test."),
    Procedure("prediction_p on raw rates", "direction", None,
             "The t prediction interval on raw flip rates (n_tasks=None): anticalibrated for bounded, skewed, "
             "discrete rates; descriptive only."),
    Procedure("prediction_p, logit scale only", "direction", None,
             "t prediction p on the continuity-corrected empirical logit alone, without the rank fallback: "
             "slightly liberal at high flip rates; replaced by the two-scale version with rank fallback."),
    Procedure("prediction_p, angular scale only", "direction", None,
             "t prediction p on the continuity-corrected angular scale alone, without the rank fallback: "
             "liberal at low flip rates; replaced by the two-scale version with rank fallback."),
    Procedure("naive sign flip of d_i", "direction", None,
             "Sign-flip permutation of d_i = target - mean control assumes d_i symmetric, which it is not; "
             "replaced by the arm-label permutation."),
    Procedure("sign test vs majority of controls", "direction", None,
             "Binomial test of target vs the controls' majority vote: unbalanced under the null when flips are "
             "rare or common; licenses nothing."),
    Procedure("legacy: binomial vs pooled control rate", "direction", None,
             "Old test: treats the pooled control rate as exact and tasks as independent of directions; it "
             "ignores potency variation, so it does not license 'atypical direction'."),
    Procedure("legacy: Fisher vs pooled controls", "direction", None,
             "Old test: pools K x n control outcomes as independent trials; same flaw as the pooled binomial."),
    Procedure("legacy: one-cell McNemar", "direction", None,
             "Old test: p = 2 * 0.5^k on (k, 0) because only one discordant cell was observed; rejects "
             "whenever the target flips >= 6 tasks, whatever the controls do; licenses nothing."),
)
TEST_BY_NAME = {t.name: t for t in TESTS}


def _reject(p: np.ndarray) -> dict[float, np.ndarray]:
    return {a: p <= a for a in ALPHAS}


def _reject_outside_ci(means: np.ndarray) -> dict[float, np.ndarray]:
    out = {}
    for a in ALPHAS:
        lo, hi = causal.percentile_interval(means, 1 - a)
        out[a] = (lo > 0) | (hi < 0)
    return out


def _naive_signflip_p(d: np.ndarray, n_signflips: int, rng: np.random.Generator) -> np.ndarray:
    """(1 + #{sum eps_i d_i >= sum d_i}) / (1 + B) with random signs eps shared across the R rows."""
    signs = rng.choice(np.array([-1.0, 1.0]), size=(d.shape[1], n_signflips))
    flipped = d @ signs
    return (1.0 + (flipped >= d.sum(axis=1, keepdims=True) - 1e-9).sum(axis=1)) / (1.0 + n_signflips)


def _single_scale_prediction_p(effect: np.ndarray, control_effects: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """The t prediction p on each transformed scale alone (continuity-corrected, no rank fallback)."""
    k_target = np.rint(effect * n) - 0.5
    k_controls = np.rint(control_effects * n)
    out = {}
    for name, f in (("logit", causal.logit_count), ("angular", causal.angular_count)):
        p, spread = causal.t_prediction_p(f(k_target, n), f(k_controls, n))
        out[f"prediction_p, {name} scale only"] = np.where(spread, p, causal.rank_p_batch(effect, control_effects))
    return out


def direction_rejections(target: np.ndarray, controls: np.ndarray, kinds: list[str], rng: np.random.Generator,
                         n_resamples: int, n_signflips: int) -> dict[str, dict[float, np.ndarray]]:
    """Rejection flags at every alpha of every direction-family test on R tables."""
    n = target.shape[1]
    effect = target.mean(axis=1)
    control_effects = controls.mean(axis=2)
    latent = np.array([k == "latent" for k in kinds])
    d = target - controls.mean(axis=1)
    a, b = causal.sign_counts_batch(target, controls, rng)
    majority = (controls.mean(axis=1) > 0.5).astype(np.float64)
    a_maj = ((target > 0.5) & (majority < 0.5)).sum(axis=1)
    b_maj = ((target < 0.5) & (majority > 0.5)).sum(axis=1)
    out = {
        "rank_p": _reject(causal.rank_p_batch(effect, control_effects)),
        "rank_p (latent controls only)": _reject(causal.rank_p_batch(effect, control_effects[:, latent])),
        "prediction_p": _reject(causal.prediction_p_batch(effect, control_effects, n)),
        "permutation_p": _reject(causal.permutation_p_exact_batch(target, controls)),
        "sign_test_p": _reject(causal.binomial_half_greater(a, a + b)),
        "paired_difference: 95% CI excludes 0": _reject_outside_ci(causal.bootstrap_means_batch(d, n_resamples, rng)),
        "prediction_p on raw rates": _reject(causal.prediction_p_batch(effect, control_effects, None)),
        **{name: _reject(p) for name, p in _single_scale_prediction_p(effect, control_effects, n).items()},
        "naive sign flip of d_i": _reject(_naive_signflip_p(d, n_signflips, rng)),
        "sign test vs majority of controls": _reject(causal.binomial_half_greater(a_maj, a_maj + b_maj)),
    }
    out.update({name: _reject(p) for name, p in legacy_batch(target, controls).items()})
    return out


def baseline_rejections(before: np.ndarray, after: np.ndarray, rng: np.random.Generator,
                        n_resamples: int) -> dict[str, dict[float, np.ndarray]]:
    """Rejection flags of the baseline-family tests on R whole-run tables."""
    means = causal.bootstrap_means_batch(after - before, n_resamples, rng)
    return {"mcnemar_p": _reject(causal.mcnemar_p_batch(before, after)),
            "net_effect: 95% CI excludes 0": _reject_outside_ci(means)}


# --------------------------------------------------------------------------- cells

def _accumulate(draw: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
                evaluate: Callable[[np.ndarray, np.ndarray, np.random.Generator], dict[str, dict[float, np.ndarray]]],
                reps: int, chunk: int, rng: np.random.Generator) -> tuple[dict[str, dict[str, float]], float, float]:
    """Rejection rates of every test over ``reps`` replications drawn and evaluated in chunks."""
    counts: dict[str, dict[float, int]] = {}
    rate_x, rate_y, done = 0.0, 0.0, 0
    while done < reps:
        m = min(chunk, reps - done)
        x, y = draw(rng, m)
        for name, by_alpha in evaluate(x, y, rng).items():
            slot = counts.setdefault(name, {a: 0 for a in ALPHAS})
            for a, rejected in by_alpha.items():
                slot[a] += int(rejected.sum())
        rate_x += float(x.mean()) * m
        rate_y += float(y.mean()) * m
        done += m
    rates = {name: {f"{a:g}": c[a] / reps for a in ALPHAS} for name, c in counts.items()}
    return rates, rate_x / reps, rate_y / reps


def _cell_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def run_direction_cell(setting: Setting, scenario: str, reps: int, seed: int, n_resamples: int = 1000,
                       n_signflips: int = 1000) -> dict:
    """One (setting, scenario) cell of the direction family: rejection rates and mean flip rates."""
    K, n = setting.design.n_controls, setting.design.n_tasks
    chunk = max(1, _CHUNK_CELLS // ((K + 1) * n))
    kinds = setting.design.kinds
    rates, target_rate, control_rate = _accumulate(
        lambda rng, m: draw_tables(rng, setting, scenario, m),
        lambda t, c, rng: direction_rejections(t, c, kinds, rng, n_resamples, n_signflips),
        reps, chunk, _cell_rng(seed, *_setting_key(setting), SCENARIOS.index(scenario)))
    return {"family": "direction", "setting": setting.label, "design": setting.design.name,
            "experiment": setting.experiment, "mean_rate": setting.mean_rate, "potency": setting.potency.name,
            "scenario": scenario, "reps": reps, "target_flip_rate": target_rate, "control_flip_rate": control_rate,
            "rejection": rates}


def run_baseline_cell(design: BaselineDesign, mean_rate: float, scenario: str, reps: int, seed: int,
                      n_resamples: int = 1000) -> dict:
    """One cell of the baseline family (McNemar and net-effect interval over all tasks)."""
    factor = BASELINE_SCENARIOS[scenario]
    chunk = max(1, _CHUNK_CELLS // (2 * design.n_tasks))
    key = (100 + BASELINE_DESIGNS.index(design), BASELINE_RATES.index(mean_rate),
           list(BASELINE_SCENARIOS).index(scenario))
    rates, pass_before, pass_after = _accumulate(
        lambda rng, m: draw_baseline_tables(rng, design, mean_rate, factor, m),
        lambda b, a, rng: baseline_rejections(b, a, rng, n_resamples),
        reps, chunk, _cell_rng(seed, *key))
    return {"family": "baseline", "setting": f"{design.name} {mean_rate:.0%}", "design": design.name,
            "mean_rate": mean_rate, "scenario": scenario, "reps": reps, "pass_rate_before": pass_before,
            "pass_rate_after": pass_after, "rejection": rates}


def _setting_key(setting: Setting) -> tuple[int, int, int, int]:
    return (DESIGNS.index(setting.design), list(MEAN_RATES).index(setting.experiment),
            MEAN_RATES[setting.experiment].index(setting.mean_rate), POTENCY_MODELS.index(setting.potency))


def run_calibration(reps: int = 2000, seed: int = 0, n_resamples: int = 1000, n_signflips: int = 1000,
                    designs: Iterable[Design] = DESIGNS, baseline_designs: Iterable[BaselineDesign] = BASELINE_DESIGNS,
                    progress: Callable[[str], None] | None = None) -> dict:
    """The full simulation: every setting x scenario of both families. Deterministic given ``seed``."""
    cells = []
    for s in settings(designs):
        for scenario in SCENARIOS:
            cells.append(run_direction_cell(s, scenario, reps, seed, n_resamples, n_signflips))
            if progress:
                progress(f"{s.label} / {scenario}")
    for bd in baseline_designs:
        for mu in BASELINE_RATES:
            for scenario in BASELINE_SCENARIOS:
                cells.append(run_baseline_cell(bd, mu, scenario, reps, seed, n_resamples))
                if progress:
                    progress(f"{bd.name} {mu:.0%} / {scenario}")
    return {
        "seed": seed, "reps": reps, "alphas": list(ALPHAS), "n_resamples": n_resamples, "n_signflips": n_signflips,
        "permutation": "exact permutation distribution (Poisson-binomial), no Monte Carlo permutations",
        "task_concentration": TASK_CONCENTRATION, "mean_rates": MEAN_RATES,
        "designs": [asdict(d) for d in designs], "baseline_designs": [asdict(d) for d in baseline_designs],
        "potency_models": [asdict(p) for p in POTENCY_MODELS],
        "baseline_rates": list(BASELINE_RATES), "baseline_scenarios": BASELINE_SCENARIOS,
        "tests": {t.name: {"family": t.family, "reported_null": t.reported_null, "licenses": t.licenses}
                  for t in TESTS},
        "cells": cells,
    }


# --------------------------------------------------------------------------- summaries and tables

POWER_REFERENCE = (
    ("cpu-60 correction 5%", "cpu-60 correction 5% odds-lognormal", "cpu-60 all tasks 5%"),
    ("gemma correction 5%", "gemma-correction correction 5% odds-lognormal", "gemma all tasks 5%"),
    ("gemma corruption 30%", "gemma-corruption corruption 30% odds-lognormal", None),
)
POWER_SCENARIOS = {"direction": ("stronger-95", "stronger-99.5"), "baseline": ("corrections x1.5", "corrections x2")}


def mc_se(rate: float, reps: int) -> float:
    """Monte Carlo standard error of a rejection rate estimated from ``reps`` replications."""
    return math.sqrt(max(rate * (1 - rate), 0.0) / reps)


def pooled_bound(alpha: float, reps: int, n_se: float = 2.0) -> float:
    """alpha + n_se * SE(alpha) for a rejection rate estimated from ``reps`` replications."""
    return alpha + n_se * mc_se(alpha, reps)


def worst_cell_bound(alpha: float, reps: int, n_cells: int, family_level: float = 0.05) -> float:
    """Bound for the largest of ``n_cells`` rejection rates, each from ``reps`` replications.

    The maximum of m noisy estimates of an exact level-alpha test exceeds alpha + 2 SE with
    probability about 1 - 0.977^m (40% at m = 22), so the worst cell is held to a Bonferroni bound:
    alpha + z SE with z = Phi^-1(1 - family_level / m).
    """
    z = float(stats.norm.ppf(1 - family_level / max(n_cells, 1)))
    return alpha + z * mc_se(alpha, reps)


def _null_scenarios(family: str) -> dict[str, str]:
    return {"typical": NULL_TYPICAL, "average": NULL_AVERAGE} if family == "direction" else {"balanced": NULL_BASELINE}


def null_summary(cells: list[dict], test: str, scenario: str) -> dict:
    """Rejection rate of ``test`` in ``scenario``, pooled over settings and in the worst setting, per alpha.

    Pooled = mean over the m settings (each ``reps`` replications), with SE from m * reps draws.
    """
    rows = [c for c in cells if c["scenario"] == scenario and test in c["rejection"]]
    m, reps = len(rows), rows[0]["reps"]
    out: dict = {"test": test, "scenario": scenario, "n_settings": m, "reps_per_setting": reps}
    for a in ALPHAS:
        key = f"{a:g}"
        rates = [c["rejection"][test][key] for c in rows]
        worst = int(np.argmax(rates))
        pooled = float(np.mean(rates))
        out[key] = {"pooled": pooled, "pooled_mc_se": mc_se(pooled, m * reps),
                    "pooled_bound": pooled_bound(a, m * reps),
                    "worst": rates[worst], "worst_mc_se": mc_se(rates[worst], reps),
                    "worst_setting": rows[worst]["setting"], "worst_bound": worst_cell_bound(a, reps, m),
                    "settings_over_2se": int(sum(r > pooled_bound(a, reps) for r in rates))}
    return out


def power_summary(cells: list[dict], test: str) -> dict[str, list[float | None]]:
    """Power at alpha = 0.05 of ``test`` for the two alternatives at each reference setting."""
    spec = TEST_BY_NAME[test]
    out = {}
    for column, direction_label, baseline_label in POWER_REFERENCE:
        label = direction_label if spec.family == "direction" else baseline_label
        values: list[float | None] = []
        for scenario in POWER_SCENARIOS[spec.family]:
            match = [c for c in cells if c["setting"] == label and c["scenario"] == scenario]
            values.append(match[0]["rejection"][test]["0.05"] if match else None)
        out[column] = values
    return out


def summarise(results: dict) -> dict:
    """Table rows: reported tests under their own null (table 1), everything else (table 2)."""
    cells = results["cells"]
    reported, other = [], []
    for spec in TESTS:
        family_cells = [c for c in cells if c["family"] == spec.family]
        for scenario, null in _null_scenarios(spec.family).items():
            row = {**null_summary(family_cells, spec.name, scenario), "null": null,
                   "reported_null": spec.reported_null, "licenses": spec.licenses}
            if spec.reported_null == null:
                a05 = row["0.05"]
                row["power"] = power_summary(family_cells, spec.name)
                row["within_bound"] = a05["pooled"] <= a05["pooled_bound"] and a05["worst"] <= a05["worst_bound"]
                reported.append(row)
            else:
                other.append(row)
    return {"reported": reported, "other": other}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


_NULL_SHORT = {NULL_TYPICAL: "typical direction", NULL_AVERAGE: "average of controls",
               NULL_BASELINE: "no net change vs baseline"}


def reported_table(summary: dict) -> str:
    """Markdown table 1: each reported test under the null it is reported for."""
    head = ("| test | null | type-I error | MC SE | worst setting: rate (MC SE) | worst setting "
            "| settings over 0.05 + 2 SE | within bounds | at alpha 0.01: pooled / worst | power A / B: "
            + " | ".join(c for c, _, _ in POWER_REFERENCE) + " |")
    lines = [head, "|" + "---|" * (9 + len(POWER_REFERENCE))]
    for r in summary["reported"]:
        a05, a01 = r["0.05"], r["0.01"]
        power = " | ".join(" / ".join(_fmt(v, 2) for v in vals) if any(v is not None for v in vals) else "–"
                           for vals in r["power"].values())
        lines.append(f"| {r['test']} | {_NULL_SHORT[r['null']]} | {_fmt(a05['pooled'])} | {_fmt(a05['pooled_mc_se'])} "
                     f"| {_fmt(a05['worst'])} ({_fmt(a05['worst_mc_se'])}) | {a05['worst_setting']} "
                     f"| {a05['settings_over_2se']} of {r['n_settings']} | {'yes' if r['within_bound'] else 'NO'} "
                     f"| {_fmt(a01['pooled'])} / {_fmt(a01['worst'])} | {power} |")
    return "\n".join(lines)


def other_table(summary: dict) -> str:
    """Markdown table 2: reported tests under the other null, variants and legacy tests under both."""
    head = ("| test | simulated null | rejection rate at 0.05: pooled | worst setting: rate | worst setting "
            "| what it does and does not license |")
    lines = [head, "|---|---|---|---|---|---|"]
    for r in summary["other"]:
        a05 = r["0.05"]
        lines.append(f"| {r['test']} | {_NULL_SHORT[r['null']]} | {_fmt(a05['pooled'])} | {_fmt(a05['worst'])} "
                     f"| {a05['worst_setting']} | {r['licenses']} |")
    return "\n".join(lines)
