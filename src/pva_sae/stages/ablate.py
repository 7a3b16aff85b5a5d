"""Directional ablation: does removing a latent's direction from the whole forward pass change whether code works?

For each steering direction (the latents ``validation/choices.json`` chose for steering) the unit
decoder row d is removed from the residual stream at every layer and position while the validation
tasks are regenerated, by ``ablation.method``:

- ``weights`` (default): the embedding rows, every attention output projection and every MLP down
  projection are orthogonalized (:mod:`pva_sae.model.orthogonalize`; for Gemma-2 against (1 + w) * d
  of the post-norm after each projection, so that d is gone after the norm);
- ``write_hooks``: the same edit done by hooks on each write (an identical forward pass);
- ``residual_hooks``: d projected out of the residual itself at every layer. For Gemma-2 this is a
  different intervention (the post-norms rescale what is left of each write), which the
  method comparison measures.

The design is the steering stage's: every arm runs on the same validation tasks (the steering
stage's task set) under one batch plan, against an unablated re-run of those tasks; the controls are
the steering stage's latent controls plus seeded random directions; a flip changes a task's baseline
outcome, and the statistics are :func:`pva_sae.stats.causal.experiment_tests` (rank among controls,
prediction interval, paired difference, permutation and sign tests), McNemar against the baseline and
Holm across the stage's four experiments (corruption and correction for each removed direction).

Also written: the residual's largest component along d at every layer with the weights edited
(exactness check), and how often the three methods agree on a subset of tasks. Outputs under
``<run>/ablation/`` (``AblationPaths``); each generation condition is cached when it finishes.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pva_sae.config import DIRECTIONS, Config
from pva_sae.data import benchmarks, prompts
from pva_sae.data.mbpp import seeded_subset
from pva_sae.errors import InputError, MissingInputError
from pva_sae.execution.label import label_samples
from pva_sae.hashing import sha256_bytes, sha256_json
from pva_sae.model.generation import Generator, batch_token_budget, plan_batches, resolve_batch_size
from pva_sae.model.hooks import AblationHook, CaptureHook, decoder_layers
from pva_sae.model.orthogonalize import orthogonalized, untie_embeddings
from pva_sae.model.registry import load_model
from pva_sae.rundir.artifacts import (
    load_records,
    read_ablation_condition,
    read_analysis_summary,
    read_choices,
    read_splits,
    read_steering_results,
    split_of,
    write_ablated_tasks,
    write_ablation_condition,
)
from pva_sae.rundir.atomic import atomic_write_json
from pva_sae.rundir.fingerprints import (
    SAE_FIELDS,
    check_chain,
    check_run_config,
    check_upstream,
    file_digest,
    sections_digest,
)
from pva_sae.rundir.logs import setup_logging
from pva_sae.rundir.paths import AblationPaths, AnalysisPaths, RunDir, SteeringPaths, ValidationPaths
from pva_sae.sae.registry import load_layer_sae
from pva_sae.stats.causal import arm_experiment, holm, net_effect, outcome_flips

log = logging.getLogger(__name__)

STAGE = "ablate"
UPSTREAM_FIELDS = ("model.name", "model.revision", "model.dtype", "data.dataset", "data.source", "data.split_fractions",
                   "data.split_seed", "prompt", "generation.max_new_tokens", "generation.stop_strings",
                   "generation.top_p", "generation.seed")  # what labels and splits were made with: as the build
EXPERIMENTS = {  # name: (direction removed, baseline outcome of the relevant tasks); a flip changes that outcome
    "correct_corruption": ("correct", True),
    "correct_correction": ("correct", False),
    "incorrect_corruption": ("incorrect", True),
    "incorrect_correction": ("incorrect", False),
}
HOLM_TESTS = ("rank_p", "permutation_p", "prediction_p", "sign_test_p", "mcnemar_p")
NULL_UNCHANGED = "ablation does not change outcomes (arm vs the unablated re-run, same tasks and plan)"
HOOK_MODES = {"write_hooks": "writes", "residual_hooks": "residual"}
# The original study (arXiv 2510.02917): share of correct programs that failed once the correct direction was
# projected out of the embedding, o_proj and down_proj outputs (inexact for Gemma-2's post-norms), and for a control.
REFERENCE = {"experiment": "correct_corruption", "target": 0.836, "control": 0.190,
             "method": "d projected out of o_proj / down_proj outputs before Gemma-2's post-norms"}


@dataclass(frozen=True)
class Arm:
    """One removed direction: the target, a control latent, a random control, or none (the baseline)."""

    kind: str                   # 'target', 'latent', 'random' or 'baseline'
    direction: str | None       # the steering direction it belongs to ('correct' / 'incorrect')
    layer: int | None
    latent: int | None
    label: str                  # 'L5:910', 'random#3', 'unablated'

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


BASELINE = Arm("baseline", None, None, None, "unablated")


# --------------------------------------------------------------------------- generation

class Ablator:
    """Runs arms on one loaded model (embeddings untied): batched generation with a direction removed,
    sandboxed labels, cached conditions."""

    def __init__(self, cfg: Config, run: RunDir, progress: bool):
        self.cfg, self.paths = cfg, AblationPaths.of(run)
        self.loaded = load_model(cfg.model)
        self.untied = untie_embeddings(self.loaded.model)  # an edit of the embedding must not edit the unembedding
        tasks = benchmarks.load_tasks(cfg.data.dataset, cfg.data.source)
        self.by_id = {t.task_id: t for t in tasks}
        self.prompts = {t.task_id: prompts.build_prompt(t, cfg.prompt.template, cfg.prompt.initiator, cfg.prompt.style)
                        for t in tasks}
        self.split_of = split_of(run)
        hooks = cfg.ablation.method in HOOK_MODES
        # hooks run inside transformers' generate only; the comparison runs every method there
        self.generators = {"main": Generator(self.loaded, dataclasses.replace(cfg.generation, backend="hf")
                                             if hooks else cfg.generation)}
        self.generators["hf"] = (self.generators["main"] if self.generators["main"].backend == "hf" else
                                 Generator(self.loaded, dataclasses.replace(cfg.generation, backend="hf")))
        self.batch_size = resolve_batch_size(self.generators["main"], list(self.prompts.values()))
        self.budget = batch_token_budget(cfg.generation.max_batch_tokens, self.loaded.device)
        self.n_generated = 0
        self.bar = tqdm(total=0, desc="ablate", unit="sample", disable=not progress, dynamic_ncols=True)

    def condition_key(self, arm: Arm, vector: torch.Tensor | None, method: str, generator: str,
                      task_ids: tuple[int, ...]) -> str:
        c = self.cfg.to_dict()
        gen = self.generators[generator]
        parts = {"arm": arm.as_dict(), "method": method if vector is not None else None,
                 "vector": sha256_bytes(vector.numpy().tobytes()) if vector is not None else None,
                 "task_ids": list(task_ids), "model": c["model"], "revision": self.loaded.revision,
                 "prompt": c["prompt"], "data": c["data"]["source"], "generation": c["generation"],
                 "sandbox": {k: v for k, v in c["sandbox"].items() if k != "workers"},
                 "backend": gen.backend, "batch_size": self.batch_size}
        return f"{arm.kind}_{arm.label.replace(':', '-').replace('#', '')}_{sha256_json(parts)[:16]}"

    def run(self, arm: Arm, vector: torch.Tensor | None, method: str, task_ids: list[int],
            generator: str = "main") -> dict[int, dict]:
        """{task id: outcome} of ``arm`` with its direction removed by ``method`` (cached per condition)."""
        ids = tuple(sorted(task_ids))
        key = self.condition_key(arm, vector, method, generator, ids)
        saved = read_ablation_condition(self.paths, key)
        if saved is not None:
            return {o["task_id"]: o for o in saved["tasks"]}
        gen = self.generators[generator]
        plan = plan_batches([(t, self.prompts[t]) for t in ids], self.loaded.tokenizer, self.batch_size, 1, True,
                            self.budget, self.cfg.generation.max_new_tokens)
        self.bar.total += len(ids)
        self.bar.set_postfix_str(f"{arm.label} {method}")
        records = []
        with self.removed(vector, method):
            for index, batch in enumerate(plan):
                records += label_samples(gen.generate_batch(batch, index), self.by_id, self.split_of, self.cfg)
                self.n_generated += len(batch)
                self.bar.update(len(batch))
        out = [_outcome(r) for r in sorted(records, key=lambda r: r["task_id"])]
        write_ablation_condition(self.paths, key, {"arm": arm.as_dict(), "method": method, "backend": gen.backend,
                                                   "task_ids": list(ids), "tasks": out})
        return {o["task_id"]: o for o in out}

    @contextmanager
    def removed(self, vector: torch.Tensor | None, method: str) -> Iterator[None]:
        """The model with ``vector`` removed by ``method`` inside the block (nothing for None)."""
        if vector is None:
            yield
        elif method == "weights":
            with orthogonalized(self.loaded.model, vector):
                yield
        else:
            with AblationHook(self.loaded.model, vector, HOOK_MODES[method]):
                yield

    def residual_check(self, vector: torch.Tensor, task_ids: list[int]) -> dict[str, Any]:
        """Largest |<r, d>| / |r| over tokens at the embeddings and every layer's output, with the weights
        orthogonalized and without (one prompt per forward pass: no padding)."""
        model, tok = self.loaded.model, self.loaded.tokenizer
        n_layers = len(decoder_layers(model))
        d = (vector / vector.norm()).float()
        out: dict[str, Any] = {"n_prompts": len(task_ids), "dtype": str(self.loaded.dtype).replace("torch.", "")}
        for name, edited in (("orthogonalized", True), ("original", False)):
            worst = np.zeros(n_layers + 1)
            for t in task_ids:
                enc = tok([self.prompts[t]], return_tensors="pt").to(self.loaded.device)
                with torch.inference_mode(), self.removed(vector if edited else None, "weights"), \
                        CaptureHook(model, 0, site="resid_pre", positions=None) as pre, \
                        CaptureHook(model, list(range(n_layers)), positions=None) as post:
                    model(**enc, use_cache=False)
                residuals = [pre.records[0][0][0]] + [post.records[i][0][0] for i in range(n_layers)]  # (seq, d)
                for i, r in enumerate(residuals):
                    worst[i] = max(worst[i], float(((r @ d).abs() / r.norm(dim=-1).clamp_min(1e-12)).max()))
            out[name] = {"embeddings": float(worst[0]), "layers": [float(x) for x in worst[1:]],
                         "max": float(worst.max())}
        return out

    def close(self) -> None:
        self.bar.close()


def _outcome(r: dict[str, Any]) -> dict[str, Any]:
    return {"task_id": r["task_id"], "passed": bool(r["passed"]), "program": r["program"], "status": r["status"],
            "error_type": r["error_type"], "n_new_tokens": r["n_new_tokens"], "finish_reason": r["finish_reason"]}


# --------------------------------------------------------------------------- directions

def random_unit(d_model: int, seed: int) -> torch.Tensor:
    """A seeded direction uniform on the unit sphere."""
    v = torch.randn(d_model, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
    return v / v.norm()


def arms_of(direction: str, target: dict[str, Any], steering_controls: list[dict[str, Any]], n_random: int, sae,
            seed: int) -> tuple[tuple[Arm, torch.Tensor], list[tuple[Arm, torch.Tensor]]]:
    """The target (the chosen latent's unit decoder row), the steering stage's latent controls (their unit rows)
    and ``n_random`` seeded random unit directions."""
    layer, latent = int(target["layer"]), int(target["latent"])
    arm = (Arm("target", direction, layer, latent, f"L{layer}:{latent}"), sae.unit_direction(latent).float().cpu())
    controls = [(Arm("latent", direction, layer, int(c["latent"]), f"L{layer}:{c['latent']}"),
                 sae.unit_direction(int(c["latent"])).float().cpu())
                for c in steering_controls if c["kind"] == "latent"]
    offset = 0 if direction == "correct" else 500
    controls += [(Arm("random", direction, layer, None, f"random#{i}"),
                  random_unit(sae.W_dec.shape[1], seed * 1000 + offset + i)) for i in range(n_random)]
    return arm, controls


# --------------------------------------------------------------------------- statistics

def flips(baseline: dict[int, dict], ablated: dict[int, dict], ids: list[int], baseline_passed: bool) -> np.ndarray:
    """(n_relevant,) bool: on tasks whose baseline outcome is ``baseline_passed``, whether ablation changed it."""
    return outcome_flips(baseline, ablated, ids, baseline_passed)


def experiment(baseline: dict[int, dict], target: dict[int, dict], controls: list[tuple[Arm, dict[int, dict]]],
               ids: list[int], baseline_passed: bool, cfg: Config) -> dict[str, Any]:
    """Target vs its controls on the relevant tasks (the steering stage's tests and settings), McNemar of every
    arm against the unablated baseline over all tasks."""
    s = cfg.steering
    return arm_experiment(baseline, target, controls, ids, baseline_passed, n_permutations=s.n_permutations,
                          n_resamples=s.bootstrap_resamples, seed=s.seed, level=s.ci_level, null=NULL_UNCHANGED)


def add_holm(experiments: dict[str, dict[str, Any]]) -> None:
    """Holm adjustment of each test across the stage's experiments, beside the raw p (``holm_p``)."""
    names = list(experiments)
    for test in HOLM_TESTS:
        adjusted = holm([experiments[n][test]["p"] for n in names])
        for n, p in zip(names, adjusted):
            experiments[n].setdefault("holm_p", {})[test] = None if p is None or np.isnan(p) else float(p)


def agreement(runs: dict[str, dict[int, dict]], ids: list[int]) -> dict[str, Any]:
    """Per pair of methods: share of tasks with the same outcome and with the identical program; pass rates."""
    names = list(runs)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pairs[f"{a} vs {b}"] = {
                "same_outcome": float(np.mean([runs[a][t]["passed"] == runs[b][t]["passed"] for t in ids])),
                "same_program": float(np.mean([runs[a][t]["program"] == runs[b][t]["program"] for t in ids])),
                "mean_similarity": float(np.mean([difflib.SequenceMatcher(None, runs[a][t]["program"],
                                                                          runs[b][t]["program"]).ratio()
                                                  for t in ids]))}
    return {"n": len(ids), "pass_rate": {m: float(np.mean([runs[m][t]["passed"] for t in ids])) for m in names},
            "pairs": pairs}


# --------------------------------------------------------------------------- stage

def load_inputs(run: RunDir, cfg: Config) -> dict[str, Any]:
    if cfg.generation.temperature != 0:
        raise InputError("ablation compares greedy generations with a greedy baseline: set generation.temperature=0")
    for stage in ("build", "analyze", "validate", "steer"):
        if not run.is_done(stage):
            raise MissingInputError(f"{run.root} has no finished {stage} stage; run `pva-sae {stage} --run-dir "
                                    f"{run.root}` first")
    spaths = SteeringPaths.of(run)
    steering = read_steering_results(spaths)
    choices = read_choices(ValidationPaths.of(run))
    if "steering_selection" not in choices:
        raise InputError(f"{ValidationPaths.of(run).choices} names no steering latents (steering_selection); rerun "
                         f"`pva-sae validate --run-dir {run.root}`")
    return {"records": {r["task_id"]: r for r in load_records(run.root) if r["sample_index"] == 0},
            "summary": read_analysis_summary(AnalysisPaths.of(run)), "targets": choices["steering_selection"],
            "steering": steering}


def ablate(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Run the stage; returns the results written to ``ablation/results.json``."""
    started = time.perf_counter()
    run = RunDir.at(cfg.output.run_dir)
    paths = AblationPaths.of(run)
    inputs = load_inputs(run, cfg)
    check_run_config(run, STAGE, cfg.to_dict(), UPSTREAM_FIELDS)
    check_run_config(run, STAGE, cfg.to_dict(), SAE_FIELDS, against=AnalysisPaths.of(run).config)
    check_run_config(run, STAGE, cfg.to_dict(), ("steering",), against=SteeringPaths.of(run).config)
    digests = check_chain(run, "steer")
    check_upstream(run, STAGE, "steer", {"results": file_digest(SteeringPaths.of(run).results)})
    paths.root.mkdir(parents=True, exist_ok=True)
    setup_logging(run.log_file(STAGE))
    atomic_write_json(paths.config, cfg.to_dict())
    a, s, records = cfg.ablation, cfg.steering, inputs["records"]
    val_ids = seeded_subset([t for t in read_splits(run)["validation"] if t in records], s.max_tasks, s.seed)
    compare_ids = seeded_subset(val_ids, a.compare_max_tasks, a.seed) if a.compare_max_tasks else []
    ablator = Ablator(cfg, run, progress)
    results: dict[str, Any] = {"design": _design(cfg, ablator), "directions": {}, "experiments": {},
                               "comparison": {}, "residual_check": {}, "reference": REFERENCE}
    outcomes: dict[str, tuple[dict, list]] = {}
    try:
        base = ablator.run(BASELINE, None, a.method, val_ids)
        for direction in DIRECTIONS:
            row = inputs["targets"][direction]
            layer = int(row["layer"])
            sae = load_layer_sae(cfg, inputs["summary"]["release"], layer, ablator.loaded.d_model)
            steer_dir = inputs["steering"]["directions"][direction]
            n_random = (steer_dir["control_kinds"]["random"] if a.n_random_controls < 0 else a.n_random_controls)
            (arm, vector), controls = arms_of(direction, row, steer_dir["controls"], n_random, sae, a.seed)
            target_out = ablator.run(arm, vector, a.method, val_ids)
            control_out = [(c, ablator.run(c, v, a.method, val_ids)) for c, v in controls]
            outcomes[direction] = (target_out, control_out)
            before = [base[t]["passed"] for t in val_ids]
            results["directions"][direction] = {
                "target": {**arm.as_dict(), "latent_row": row, "decoder_norm": float(sae.W_dec[int(row["latent"])].norm())},
                "controls": [c.as_dict() for c, _ in controls],
                "control_kinds": {"latent": sum(c.kind == "latent" for c, _ in controls), "random": n_random},
                "net_effect": {"target": net_effect(before, [target_out[t]["passed"] for t in val_ids],
                                                    s.bootstrap_resamples, s.seed, s.ci_level),
                               "controls_mean": _mean([float(np.mean([o[t]["passed"] for t in val_ids]) -
                                                             np.mean(before)) for _, o in control_out])}}
            if a.residual_check_tasks:
                check_ids = seeded_subset(val_ids, a.residual_check_tasks, a.seed)
                results["residual_check"][direction] = ablator.residual_check(vector, check_ids)
            if compare_ids:
                runs = {m: ablator.run(arm, vector, m, compare_ids, generator="hf")
                        for m in ("weights", "write_hooks", "residual_hooks")}
                results["comparison"][direction] = agreement(runs, compare_ids)
        for name, (direction, baseline_passed) in EXPERIMENTS.items():
            target_out, control_out = outcomes[direction]
            results["experiments"][name] = {"direction": direction,
                                            "target": results["directions"][direction]["target"]["label"],
                                            **experiment(base, target_out, control_out, val_ids, baseline_passed, cfg)}
        add_holm(results["experiments"])
        results["baseline"] = {"n": len(val_ids), "passed": sum(base[t]["passed"] for t in val_ids),
                               "build_agreement": sum(records[t]["passed"] == base[t]["passed"] for t in val_ids)}
        results["tasks"] = {"validation": len(val_ids), "compared": len(compare_ids), "generated": ablator.n_generated}
    finally:
        ablator.close()
    _save_tasks(paths, results, base, outcomes, val_ids)
    if a.plots:
        results["plots"] = [str(plot_ablation(paths.plots / "target_vs_controls.png", results).relative_to(run.root))]
    results["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(paths.results, results)
    run.mark_done(STAGE, {"generated": ablator.n_generated,
                          "inputs": {**{k: digests.get(k) for k in ("records", "choices")},
                                     "steering_results": file_digest(SteeringPaths.of(run).results),
                                     "config": sections_digest(cfg.to_dict(), ("ablation",))},
                          "outputs": {"results": file_digest(paths.results)}})
    return results


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _design(cfg: Config, ablator: Ablator) -> dict[str, Any]:
    s, a = cfg.steering, cfg.ablation
    return {"method": a.method, "backend": ablator.generators["main"].backend, "untied_embeddings": ablator.untied,
            "tasks": "the steering stage's validation tasks", "baseline": "unablated re-run, same tasks and batch plan",
            "controls": "the steering stage's latent controls + seeded random unit directions",
            "n_permutations": s.n_permutations, "bootstrap_resamples": s.bootstrap_resamples, "seed": s.seed,
            "level": s.ci_level}


def _save_tasks(paths: AblationPaths, results, base, outcomes, val_ids) -> None:
    rows = []
    for direction, (target_out, control_out) in outcomes.items():
        arms = [(results["directions"][direction]["target"]["label"], "target", target_out)]
        arms += [(arm.label, arm.kind, out) for arm, out in control_out]
        rows += [{"direction": direction, "arm": label, "kind": kind, "task_id": t,
                  "baseline_passed": base[t]["passed"], "ablated_passed": out[t]["passed"],
                  "status": out[t]["status"], "error_type": out[t]["error_type"],
                  "n_new_tokens": out[t]["n_new_tokens"], "baseline_program": base[t]["program"],
                  "program": out[t]["program"]} for label, kind, out in arms for t in val_ids]
    write_ablated_tasks(paths, rows)


def plot_ablation(path, results: dict[str, Any]):
    """Per experiment: the target's flip rate (with its exact interval) and every control's rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["experiments"])
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 3.5))
    for x, name in enumerate(names):
        e = results["experiments"][name]
        rates = [c["rate"] for c in e["controls"] if c["rate"] is not None]
        jitter = np.linspace(-0.15, 0.15, len(rates)) if rates else []
        ax.scatter(x + np.asarray(jitter), rates, s=10, color="0.6", label="controls" if x == 0 else None)
        if e["rate"]["estimate"] is not None:
            lo, hi = e["rate"]["ci"]
            est = e["rate"]["estimate"]
            ax.errorbar([x], [est], yerr=[[est - lo], [hi - est]], fmt="o", color="tab:red", capsize=3,
                        label="target" if x == 0 else None)
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names])
    ax.set_ylabel("share of relevant tasks flipped")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"directional ablation ({results['design']['method']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
