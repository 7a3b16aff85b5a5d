"""Stage 4, causal validation: does adding an SAE latent's decoder direction change whether code works?

Targets: the top latent per direction by ``steering.selection_metric`` (separation by default) from the
analysis stage. Steering adds ``alpha * d`` at the SAE's site during generation (hooks.SteeringHook),
``d`` the unit-normalised decoder row (or the raw row), batched like the build stage.

1. Coefficients on the tuning split only: a log-spaced grid (in units of the mean residual norm at
   the layer, or absolute), then geometric refinement around the best point. Correct direction:
   maximise correction subject to corruption <= ``max_corruption``; incorrect direction: maximise
   corruption. Ties go to the smaller alpha.
2. On the validation split, at the chosen alphas: correction (correct direction on initially
   incorrect tasks), preservation (correct direction on initially correct tasks), corruption
   (incorrect direction on initially correct tasks); the same for >= 10 control latents of the same
   layer with near-zero separation and matched firing frequency; a greedy unsteered re-run as the
   noise floor; selective steering (only tasks whose incorrect-predictor fires above its threshold).
3. Exact binomial test (target vs pooled control rate), Fisher's exact test, exact McNemar on the
   baseline-vs-steered pairs, Wilson intervals.

Each generation condition is cached under ``steering/conditions/`` when it finishes, so an interrupted
stage resumes at the next condition. Outputs under ``<run>/steering/`` (``SteeringPaths``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pva_sae.config import Config
from pva_sae.data import mbpp as data
from pva_sae.data import prompts
from pva_sae.data.mbpp import seeded_subset
from pva_sae.execution.label import label_samples
from pva_sae.model.fastgen import Steering
from pva_sae.model.generation import (
    Generator,
    batch_token_budget,
    plan_batches,
    resolve_batch_size,
)
from pva_sae.model.registry import load_model
from pva_sae.plots import plot_steering
from pva_sae.rundir.artifacts import (
    load_activations,
    load_ranked,
    load_records,
    load_scores,
    read_analysis_summary,
    read_choices,
    read_condition,
    read_splits,
    read_validation_scores,
    split_of,
    write_condition,
    write_steered_tasks,
)
from pva_sae.rundir.atomic import atomic_write_json
from pva_sae.rundir.logs import setup_logging
from pva_sae.rundir.paths import AnalysisPaths, RunDir, SteeringPaths, ValidationPaths
from pva_sae.sae.registry import load_layer_sae
from pva_sae.stats.classify import (
    binomial_test,
    fisher_test,
    mcnemar_exact,
    wilson_interval,
)
from pva_sae.stats.latents import select_latents

log = logging.getLogger(__name__)

STAGE = "steer"
EXPERIMENTS = {  # name: (steering direction, baseline outcome of the tasks, outcome counted as a success)
    "correction": ("correct", False, True),
    "preservation_failure": ("correct", True, False),
    "corruption": ("incorrect", True, False),
}


@dataclass(frozen=True)
class Condition:
    """One generation run: ``task_ids`` generated greedily with one latent's direction added (or none)."""

    role: str                   # 'target', 'control' or 'rerun' (unsteered noise floor)
    direction: str | None       # steering direction 'correct' / 'incorrect'; None for the re-run
    layer: int | None
    latent: int | None
    alpha: float                # absolute coefficient
    positions: str
    task_ids: tuple[int, ...]

    def key(self, extra: dict[str, Any]) -> str:
        blob = json.dumps({**asdict(self), **extra}, sort_keys=True)
        return f"{self.role}_{self.layer}_{self.latent}_{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


# --------------------------------------------------------------------------- context

class Steerer:
    """Runs conditions on one loaded model: batched steered generation, sandboxed labels, caching."""

    def __init__(self, cfg: Config, run: RunDir, baseline: dict[int, dict[str, Any]], progress: bool):
        self.cfg, self.run, self.paths, self.progress = cfg, run, SteeringPaths.of(run), progress
        self.loaded = load_model(cfg.model)
        tasks = data.load_tasks(cfg.data.source)
        self.by_id = {t.task_id: t for t in tasks}
        self.prompts = {t.task_id: prompts.build_prompt(t, cfg.prompt.template, cfg.prompt.initiator) for t in tasks}
        self.split_of = split_of(run)
        self.generator = Generator(self.loaded, cfg.generation)
        self.batch_size = resolve_batch_size(self.generator, list(self.prompts.values()))
        self.budget = batch_token_budget(cfg.generation.max_batch_tokens, self.loaded.device)
        self.baseline = baseline
        self.site = cfg.steering.site or cfg.analysis.site
        self.n_generated = 0

    def run_condition(self, cond: Condition, vector) -> list[dict[str, Any]]:
        """Per-task outcomes of ``cond`` (from the cache when this exact condition already ran)."""

        extra = {"model": self.cfg.model.name, "site": self.site, "normalize": self.cfg.steering.normalize,
                 "generation": self.cfg.to_dict()["generation"], "backend": self.generator.backend}
        key = cond.key(extra)
        saved = read_condition(self.paths, key)
        if saved is not None:
            return saved["tasks"]
        plan = plan_batches([(t, self.prompts[t]) for t in cond.task_ids], self.loaded.tokenizer,
                            self.batch_size, 1, True, self.budget, self.cfg.generation.max_new_tokens)
        records = []
        steering = (Steering(cond.layer, vector, cond.alpha, site=self.site, positions=cond.positions)
                    if vector is not None else None)
        for index, batch in enumerate(plan):
            samples = self.generator.generate_batch(batch, index, steering=steering)
            records += label_samples(samples, self.by_id, self.split_of, self.cfg)
            self.n_generated += len(batch)
        out = [self._outcome(r) for r in sorted(records, key=lambda r: r["task_id"])]
        write_condition(self.paths, key, {"condition": asdict(cond), **extra, "tasks": out})
        return out

    def _outcome(self, r: dict[str, Any]) -> dict[str, Any]:
        base = self.baseline[r["task_id"]]
        return {"task_id": r["task_id"], "baseline_passed": bool(base["passed"]), "steered_passed": bool(r["passed"]),
                "similarity": difflib.SequenceMatcher(None, base["program"], r["program"]).ratio(),
                "status": r["status"], "error_type": r["error_type"], "n_new_tokens": r["n_new_tokens"],
                "finish_reason": r["finish_reason"], "baseline_program": base["program"], "program": r["program"]}


# --------------------------------------------------------------------------- choices

def steering_vector(sae, latent: int, normalize: str):
    """(d_model,) float32: the unit-normalised decoder row, or the raw row ('raw', the thesis's coefficients)."""
    if normalize == "unit":
        return sae.unit_direction(latent).float().cpu()
    return sae.W_dec[int(latent)].float().cpu()


def pick_controls(scores: dict[str, Any], target: int, n_correct: int, n_incorrect: int, n: int,
                  max_separation: float, seed: int) -> list[dict[str, Any]]:
    """``n`` latents of the target's layer with |separation| <= max_separation, firing on the
    SAE-analysis split at a rate closest to the target's (ties in seeded random order)."""
    fc, fi = np.asarray(scores["f_correct"]), np.asarray(scores["f_incorrect"])
    rate = (n_correct * fc + n_incorrect * fi) / (n_correct + n_incorrect)     # (d_sae,)
    ok = (np.abs(fc - fi) <= max_separation) & (rate > 0)
    ok[target] = False
    candidates = np.flatnonzero(ok)
    if len(candidates) < n:
        raise ValueError(f"only {len(candidates)} control latents have |separation| <= {max_separation} and fire at "
                         f"all; raise steering.control_max_separation or lower steering.n_controls")
    tie = np.random.default_rng(seed).random(len(candidates))
    order = np.lexsort((tie, np.abs(rate[candidates] - rate[target])))
    return [{"latent": int(j), "firing_rate": float(rate[j]), "separation": float(fc[j] - fi[j])}
            for j in candidates[order[:n]]]


def rates(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and rates of one steered run, split by the baseline outcome."""
    inc = [o for o in outcomes if not o["baseline_passed"]]
    cor = [o for o in outcomes if o["baseline_passed"]]
    fixed = sum(o["steered_passed"] for o in inc)
    broken = sum(not o["steered_passed"] for o in cor)
    return {"n_incorrect": len(inc), "corrected": fixed, "correction": fixed / len(inc) if inc else None,
            "n_correct": len(cor), "broken": broken, "corruption": broken / len(cor) if cor else None}


def choose_alpha(rows: list[dict[str, Any]], direction: str, max_corruption: float) -> tuple[dict[str, Any], bool]:
    """The best grid row by the stated objective; (row, whether the constraint could be met)."""
    if direction == "incorrect":
        return max(rows, key=lambda r: ((r["corruption"] or 0.0), -r["alpha"])), True
    feasible = [r for r in rows if (r["corruption"] or 0.0) <= max_corruption]
    if not feasible:
        return min(rows, key=lambda r: r["alpha"]), False
    return max(feasible, key=lambda r: ((r["correction"] or 0.0), -r["alpha"])), True


def tune(steerer: Steerer, direction: str, target: dict[str, Any], vector, norm_unit: float,
         tuning_ids: list[int]) -> dict[str, Any]:
    """Evaluate the alpha grid (then refine) on the tuning split; return the table and the chosen alpha."""
    s = steerer.cfg.steering
    ids = tuning_ids if direction == "correct" else [t for t in tuning_ids if steerer.baseline[t]["passed"]]
    rows: dict[float, dict[str, Any]] = {}

    def evaluate(a: float) -> None:
        if a in rows:
            return
        cond = Condition("target", direction, target["layer"], target["latent"], a * norm_unit, s.positions, tuple(ids))
        rows[a] = {"alpha": a, "alpha_abs": a * norm_unit, **rates(steerer.run_condition(cond, vector))}

    for a in s.alpha_grid:
        evaluate(float(a))
    for _ in range(s.refine_steps):
        grid = sorted(rows)
        best, _ = choose_alpha(list(rows.values()), direction, s.max_corruption)
        i = grid.index(best["alpha"])
        for j in (i - 1, i + 1):
            if 0 <= j < len(grid):
                evaluate(float(np.sqrt(grid[i] * grid[j])))
    table = [rows[a] for a in sorted(rows)]
    best, met = choose_alpha(table, direction, s.max_corruption)
    objective = ("maximise correction subject to corruption <= "
                 f"{s.max_corruption:.0%}" if direction == "correct" else "maximise corruption")
    return {"table": table, "chosen": best, "constraint_met": met, "objective": objective, "n_tasks": len(ids)}


# --------------------------------------------------------------------------- statistics

def experiment_stats(target: list[dict[str, Any]], controls: dict[int, list[dict[str, Any]]], baseline_passed: bool,
                     success_passed: bool, level: float = 0.95) -> dict[str, Any]:
    """Rates, Wilson intervals and exact tests of one experiment (target vs pooled controls)."""

    def count(outcomes):
        rel = [o for o in outcomes if o["baseline_passed"] == baseline_passed]
        return sum(o["steered_passed"] == success_passed for o in rel), len(rel)

    k, n = count(target)
    per_control = {j: count(o) for j, o in controls.items()}
    kc, nc = sum(v[0] for v in per_control.values()), sum(v[1] for v in per_control.values())
    flips_back = sum(o["steered_passed"] == baseline_passed for o in target
                     if o["baseline_passed"] != baseline_passed)  # tasks of the other class, for McNemar's c
    pooled = kc / nc if nc else float("nan")
    rel_target = [o for o in target if o["baseline_passed"] == baseline_passed]
    return {
        "n": n, "successes": k, "rate": k / n if n else None, "wilson": list(wilson_interval(k, n, level)),
        "control_n": nc, "control_successes": kc, "control_rate": pooled if nc else None,
        "control_wilson": list(wilson_interval(kc, nc, level)),
        "per_control": [{"latent": j, "successes": v[0], "n": v[1]} for j, v in per_control.items()],
        "binomial_p_vs_control": binomial_test(k, n, pooled) if nc else None,
        "fisher_p": fisher_test(k, n, kc, nc) if nc else None,
        "mcnemar_p": mcnemar_exact(k, flips_back) if n else None,
        "mcnemar_pairs": {"changed_as_tested": k, "changed_the_other_way": flips_back},
        "mean_similarity": float(np.mean([o["similarity"] for o in rel_target])) if rel_target else None,
    }


def selective(correct_run: list[dict[str, Any]], flagged: set[int]) -> dict[str, Any]:
    """Selective steering: tasks not flagged keep their baseline outcome, flagged ones take the steered one."""
    final = [(o["baseline_passed"], o["steered_passed"] if o["task_id"] in flagged else o["baseline_passed"])
             for o in correct_run]
    inc = [after for before, after in final if not before]
    cor = [after for before, after in final if before]
    const = rates(correct_run)
    return {
        "n_flagged": len(flagged & {o["task_id"] for o in correct_run}), "n_tasks": len(correct_run),
        "selective": {"correction": sum(inc) / len(inc) if inc else None,
                      "corruption": sum(not a for a in cor) / len(cor) if cor else None,
                      "corrected": sum(inc), "broken": sum(not a for a in cor)},
        "constant": {"correction": const["correction"], "corruption": const["corruption"],
                     "corrected": const["corrected"], "broken": const["broken"]},
        "n_incorrect": len(inc), "n_correct": len(cor),
    }


# --------------------------------------------------------------------------- stage

def load_inputs(run: RunDir, cfg: Config):
    if cfg.generation.temperature != 0:
        raise ValueError("steering compares greedy generations with the greedy build: set generation.temperature=0")
    for stage in ("build", "analyze", "validate"):
        if not run.is_done(stage):
            raise FileNotFoundError(f"{run.root} has no finished {stage} stage; run `pva-sae {stage} --run-dir "
                                    f"{run.root}` first")
    records = {r["task_id"]: r for r in load_records(str(run.root)) if r["sample_index"] == 0}
    apaths = AnalysisPaths.of(run)
    summary = read_analysis_summary(apaths)
    targets = select_latents(load_ranked(apaths), cfg.steering.selection_metric)
    acts, task_ids, layers, _, _ = load_activations(apaths.activations)
    saes = {int(t["layer"]): load_layer_sae(cfg, summary["release"], int(t["layer"]), acts.shape[-1])
            for t in targets.values()}
    sae_rows = [i for i, t in enumerate(task_ids) if t in set(read_splits(run)["sae"])]
    norms = {layer: float(acts[sae_rows, layers.index(layer)].norm(dim=-1).mean()) for layer in saes}
    vpaths = ValidationPaths.of(run)
    choices = read_choices(vpaths)
    return records, summary, targets, saes, norms, choices, vpaths


def _flagged(vpaths, choices: dict[str, Any], ids: list[int]) -> tuple[set[int], dict[str, Any]]:
    pred = next(p for p in choices["predictors"] if p["name"] == "latent" and p["direction"] == "incorrect")
    table = read_validation_scores(vpaths)
    scores = dict(zip(table["task_id"], table["incorrect/latent"]))
    return {t for t in ids if scores[t] >= pred["threshold"]}, pred


def steer(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Run the stage; returns the results written to ``steering/results.json``."""

    started = time.perf_counter()
    run = RunDir.at(cfg.output.run_dir)
    paths = SteeringPaths.of(run)
    records, summary, targets, saes, norms, choices, vpaths = load_inputs(run, cfg)
    paths.root.mkdir(parents=True, exist_ok=True)
    setup_logging(run.log_file(STAGE))
    atomic_write_json(paths.config, cfg.to_dict())
    s = cfg.steering
    splits = read_splits(run)
    tuning_ids = seeded_subset([t for t in splits["tuning"] if t in records], s.tuning_max_tasks, s.seed)
    val_ids = seeded_subset([t for t in splits["validation"] if t in records], s.max_tasks, s.seed)
    steerer = Steerer(cfg, run, records, progress)
    scores = load_scores(AnalysisPaths.of(run))

    results: dict[str, Any] = {"targets": {}, "tuning": {}, "controls": {}, "experiments": {}}
    runs: dict[str, list[dict[str, Any]]] = {}
    control_runs: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for direction, target in targets.items():
        layer, latent = int(target["layer"]), int(target["latent"])
        vector = steering_vector(saes[layer], latent, s.normalize)
        unit = norms[layer] if s.alpha_units == "residual_norm" else 1.0
        tuned = (tune(steerer, direction, target, vector, unit, tuning_ids) if s.alphas is None
                 else {"chosen": {"alpha": s.alphas[0 if direction == "correct" else 1]}, "table": [],
                       "objective": "fixed by steering.alphas", "constraint_met": None})
        alpha = tuned["chosen"]["alpha"] * unit
        results["tuning"][direction] = tuned
        results["targets"][direction] = {**target, "alpha": tuned["chosen"]["alpha"], "alpha_abs": alpha,
                                         "alpha_units": s.alpha_units, "mean_residual_norm": norms[layer],
                                         "decoder_norm": float(saes[layer].W_dec[latent].norm()),
                                         "normalize": s.normalize, "positions": s.positions}
        ids = val_ids if direction == "correct" else [t for t in val_ids if records[t]["passed"]]
        runs[direction] = steerer.run_condition(
            Condition("target", direction, layer, latent, alpha, s.positions, tuple(ids)), vector)
        controls = pick_controls(scores[layer], latent, summary["n_correct"], summary["n_incorrect"], s.n_controls,
                                 s.control_max_separation, s.seed)
        control_ids = seeded_subset(ids, s.control_max_tasks, s.seed + 1)
        results["controls"][direction] = controls
        control_runs[direction] = {
            c["latent"]: steerer.run_condition(
                Condition("control", direction, layer, c["latent"], alpha, s.positions, tuple(control_ids)),
                steering_vector(saes[layer], c["latent"], s.normalize))
            for c in controls}

    for name, (direction, baseline_passed, success) in EXPERIMENTS.items():
        results["experiments"][name] = {"direction": direction, **experiment_stats(
            runs[direction], control_runs[direction], baseline_passed, success, s.ci_level)}
    rerun = steerer.run_condition(Condition("rerun", None, None, None, 0.0, s.positions, tuple(val_ids)), None)
    flips = sum(o["steered_passed"] != o["baseline_passed"] for o in rerun)
    results["noise_floor"] = {"n": len(rerun), "flips": flips, "rate": flips / len(rerun) if rerun else None,
                              "identical_programs": sum(o["similarity"] == 1.0 for o in rerun)}
    flagged, predictor = _flagged(vpaths, choices, [o["task_id"] for o in runs["correct"]])
    results["selective"] = {"predictor": {k: predictor[k] for k in ("label", "layer", "latent", "threshold")},
                            **selective(runs["correct"], flagged)}
    results["tasks"] = {"validation": len(val_ids), "tuning": len(tuning_ids), "generated": steerer.n_generated}
    _save_tasks(paths, runs, control_runs, rerun)
    if s.plots:

        results["plots"] = [str(p.relative_to(run.root)) for p in plot_steering(paths.plots, results)]
    results["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(paths.results, results)
    run.mark_done(STAGE, {"generated": steerer.n_generated})
    return results


def _save_tasks(paths: SteeringPaths, runs, control_runs, rerun) -> None:
    rows = [{"role": "target", "direction": d, "latent": None, **o} for d, outs in runs.items() for o in outs]
    rows += [{"role": "control", "direction": d, "latent": j, **o} for d, per in control_runs.items()
             for j, outs in per.items() for o in outs]
    rows += [{"role": "rerun", "direction": None, "latent": None, **o} for o in rerun]
    write_steered_tasks(paths, rows)
