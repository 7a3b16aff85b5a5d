"""The run report: one self-contained HTML file (plots inlined, no network) and a Markdown twin.

Both are rendered from one list of blocks, built only from the artifacts in the run directory, so the
report shows exactly the numbers in those files. Written to ``<run>/report.html`` and ``<run>/report.md``.

The page opens with a summary box (what the run found, in words, from the same artifacts), then one
part per entry of :data:`SECTIONS`, in order. A :class:`Section` has two functions of the run directory:

- ``blocks(run)``: its headings, paragraphs, tables and plots. The core stages (build, analyze,
  validate, steer) say "has not run" when their results are absent; an optional stage's section returns
  ``[]`` when its results file is absent, and the report then omits it.
- ``findings(run)`` (optional): its lines of the summary box, each a :class:`Finding` (the headline
  numbers, one sentence saying what they mean, and whether the result is null); ``[]`` when absent.

Adding the report of a new stage is one path in ``rundir/paths.py`` for its results, a function
``RunDir -> list[Block]`` (and, if it has a headline, one ``RunDir -> list[Finding]``), and one entry in
:data:`SECTIONS`, e.g. ``Section("ablation", ablation_section, ablation_findings)``.

Vocabulary, the same in every table and plot: a *correction* is a validation task that failed at
alpha = 0 and passes under steering; a *corruption* is one that passed at alpha = 0 and fails under
steering (with either direction); the *net effect* is (corrections - corruptions) / tasks, the change
of pass@1. Degenerate results (a thresholded latent that answers one class for every task, selective
steering that flags every task) are named where they appear, and plots with nothing to show are not drawn.
"""

from __future__ import annotations

import base64
import html
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pva_sae.assets_index import read_registry
from pva_sae.config import DIRECTIONS
from pva_sae.errors import MissingInputError
from pva_sae.plots import experiment_event, fmt_p
from pva_sae.rundir.atomic import atomic_write_text, read_json
from pva_sae.rundir.paths import (
    AblationPaths,
    AnalysisPaths,
    AttentionPaths,
    RunDir,
    SteeringPaths,
    ValidationPaths,
)
from pva_sae.sae.neuronpedia import link_from_sharing, link_latents
from pva_sae.summary import bounds, fmt, fmt_ci

ALPHA = 0.05  # significance level of the summary's wording (Holm-adjusted p-values)


@dataclass
class Finding:
    """One line of the summary box: the numbers, what they mean in one sentence, and a tag for a result
    that is not a positive finding ('null result', 'degenerate', 'not testable')."""
    headline: str
    meaning: str
    tag: str = ""


@dataclass
class Block:
    kind: str                        # 'h1', 'h2', 'h3', 'p', 'table', 'img', 'summary'
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None
    findings: list[Finding] = field(default_factory=list)   # 'summary' only
    caveats: list[str] = field(default_factory=list)        # 'summary' only: shown above the findings


@dataclass(frozen=True)
class Section:
    """One part of the report, built from the run directory's artifacts (see the module docstring)."""
    name: str
    blocks: Callable[[RunDir], list[Block]]
    findings: Callable[[RunDir], list[Finding]] | None = None


def _contains(interval: dict[str, Any] | None, value: float) -> bool:
    """Whether the interval contains ``value`` (an undefined interval counts as containing it)."""
    if not interval or interval.get("estimate") is None:
        return True
    low, high = bounds(interval)
    return low is None or low <= value <= high


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def images(folder: Path, items) -> list[Block]:
    """An image block per (file name, caption) whose file exists in ``folder``."""
    return [Block("img", caption, path=folder / name) for name, caption in items if (folder / name).is_file()]


# --------------------------------------------------------------------------- degenerate predictors

def degenerate(row: dict[str, Any]) -> str | None:
    """How a thresholded predictor is degenerate, in words, or None (see :func:`degenerate_tag`)."""
    found = _degenerate(row)
    return found[1] if found else None


def degenerate_tag(row: dict[str, Any]) -> str | None:
    """A few words for a table cell: "always 'correct'", "never 'correct'" or "same as <baseline>"."""
    found = _degenerate(row)
    return found[0] if found else None


def _degenerate(row: dict[str, Any]) -> tuple[str, str] | None:
    """(tag, sentence) when the predictor's rule gives every validation task one class (recall 1 or 0 with
    balanced accuracy 0.5: it tells no task of one class apart), or when its F1 and MCC equal a trivial
    baseline's (majority class, always positive) on every bootstrap resample; None otherwise."""
    if row["name"] in ("majority", "always_positive"):
        return None
    m, d = row["metrics"], row["direction"]
    same = [q["against"] for q in row.get("paired", []) if q["name"] in ("majority", "always_positive")
            and _is_zero(q["delta_f1"]) and _is_zero(q["delta_mcc"])]
    recall, balanced = m["recall"]["estimate"], m["balanced_accuracy"]["estimate"]
    equal = f": the same as {' and '.join(same)}" if same else ", like a constant answer"
    if balanced is not None and abs(balanced - 0.5) < 1e-12 and recall in (0.0, 1.0):
        which = f"every task '{d}'" if recall == 1.0 else f"no task '{d}'"
        return (f"{'always' if recall == 1.0 else 'never'} '{d}'",
                f"predicts {which} at its threshold {fmt(row.get('threshold'), 3)}{equal}")
    if same:
        return f"same as {same[0]}", f"predicts like {' and '.join(same)} on every bootstrap resample"
    return None


def _is_zero(interval: dict[str, Any]) -> bool:
    low, high = bounds(interval)
    return interval.get("estimate") == 0 and low == 0 and high == 0


# --------------------------------------------------------------------------- sections

def dataset_section(run: RunDir) -> list[Block]:
    out = [Block("h2", "Dataset")]
    if not run.dataset_metadata.is_file():
        return out + [Block("p", "The build stage has not finished.")]
    meta = read_json(run.dataset_metadata)
    model = meta.get("model") or {}
    out.append(Block("p", f"Model {model.get('name')} ({model.get('path_or_id')}, revision {model.get('revision')}); "
                          f"{meta['n_tasks']} tasks, {meta['n_records']} samples, "
                          f"{meta['counts']['passed']} passed ({_pct(meta['pass_rate']['overall'])})."))
    rows = [[name, str(meta["counts"]["by_split"].get(name, 0)), _pct(rate)]
            for name, rate in meta["pass_rate"]["by_split"].items()]
    rows += [[f"difficulty: {name}", str(meta["counts"]["by_difficulty"].get(name, 0)), _pct(rate)]
             for name, rate in meta["pass_rate"]["by_difficulty"].items()]
    out.append(Block("table", headers=["group", "samples", "pass rate"], rows=rows))
    status = ", ".join(f"{k}: {v}" for k, v in sorted(meta["status_counts"].items()))
    out.append(Block("p", f"Outcomes: {status}."))
    return out


def dataset_findings(run: RunDir) -> list[Finding]:
    if not run.dataset_metadata.is_file():
        return []
    meta = read_json(run.dataset_metadata)
    rate = meta["pass_rate"]["overall"]
    dataset = (read_json(run.config).get("data", {}) if run.config.is_file() else {}).get("dataset", "mbpp")
    name = {"mbpp": "MBPP", "humaneval": "HumanEval"}.get(dataset, dataset)
    out = [Finding(f"{meta['n_records']} generated solutions to {meta['n_tasks']} {name} tasks, "
                   f"{meta['counts']['passed']} passing their tests ({_pct(rate)}).",
                   "The pass/fail label of each solution is what the latents below try to predict and steering "
                   "tries to change.")]
    if rate in (0.0, 1.0):
        out.append(Finding("Every solution has the same label.", "With one class there is nothing to separate: "
                           "every later number is undefined or degenerate.", tag="degenerate"))
    return out


def analysis_section(run: RunDir) -> list[Block]:
    paths = AnalysisPaths.of(run)
    out = [Block("h2", "Top latents (SAE-analysis split)")]
    if not paths.summary.is_file():
        return out + [Block("p", "The analysis stage has not run.")]
    s = read_json(paths.summary)
    excluded = sum(s["excluded_general"].values())
    out.append(Block("p", f"SAE release {s['release']}, site {s['site']}, layers {s['layers'][0]}..{s['layers'][-1]}; "
                          f"{s['n_tasks']} tasks ({s['n_correct']} correct, {s['n_incorrect']} incorrect). "
                          f"{excluded} latents firing on >= {s['general_max_frequency']:.0%} of the general corpus "
                          f"({s['general'].get('corpus', s['general'].get('source', ''))}) were excluded."))
    if s.get("sharing"):
        out.append(Block("p", sharing_text(s)))
    for key, title in (("top_by_t", "by Welch t"), ("top", "by separation score")):
        rows = []
        for direction in DIRECTIONS:
            for r in s[key][direction]:
                rows.append([direction, str(r["rank"]), f"L{r['layer']}:{r['latent']}", fmt(r[f"t_{direction}"], 2),
                             fmt(r[f"sep_{direction}"]), fmt(r["f_correct"]), fmt(r["f_incorrect"]),
                             fmt(r["general_frequency"])])
        out.append(Block("h3", f"Top latents {title}"))
        out.append(Block("table", headers=["predicts", "rank", "latent", "t", "separation", "f_correct",
                                           "f_incorrect", "general freq."], rows=rows))
    out.append(Block("p", f"The top t and separation over {s.get('n_latents_scored', 'all')} scored latents are "
                          "selected maxima: they are biased upwards and say nothing by themselves. The held-out "
                          "validation below is what counts."))
    if s.get("filter_sensitivity"):
        rows = [[f"{float(cut):.0%}", m, d, ", ".join(names)] for cut, per in s["filter_sensitivity"].items()
                for m, by in per.items() for d, names in by.items()]
        out.append(Block("h3", "Sensitivity to the general-filter cut"))
        out.append(Block("table", headers=["cut", "metric", "predicts", "top 3 latents"], rows=rows))
    out += images(paths.plots, (("selection_landscape.png", ("Selection landscape: every latent, t against "
                                 "separation; grey = cut by the general filter; the chosen latents marked")),
                                ("frequency_scatter.png", "Firing frequency, correct vs incorrect tasks, per layer"),
                                ("top_latent_histograms.png", "Activations of the top latents by class")))
    return out


def sharing_text(s: dict[str, Any]) -> str:
    """Where the run's SAEs and latents can be found outside it: SAELens ids, Neuronpedia sources and list."""
    sharing = s["sharing"]
    ids = [ids["saelens"] for ids in sharing.values() if ids["saelens"]]
    sources = [ids["neuronpedia"]["source"] for ids in sharing.values() if ids["neuronpedia"]]
    if not ids and not sources:
        return (f"The SAEs of release {s['release']} are not public: no SAELens id and no Neuronpedia page, "
                "so the latents below are named by layer and index only.")
    text = (f"SAELens: release {ids[0]['release']}, ids {', '.join(i['sae_id'] for i in ids)}. " if ids else "")
    exported = s.get("neuronpedia_list") or {}
    if sources:
        text += (f"Neuronpedia sources {', '.join(sources)}: every latent named below links to its page; "
                 f"{exported.get('n_features', 0)} latents are exported as a Neuronpedia list in "
                 f"analysis/{exported.get('file', 'neuronpedia.json')}")
        text += f" (quick list: {exported['quick_list']})." if exported.get("quick_list") else "."
    return text


def _label(r: dict[str, Any]) -> str:
    fires = " fires" if r["name"] == "latent_fires" and "fires" not in r["label"] else ""
    return r["label"] + fires + (" (steered)" if r["name"] == "steered_latent" else "")


def _metric_row(r: dict[str, Any]) -> list[str]:
    m = r["metrics"]
    why = degenerate_tag(r) if r["name"] in LATENT_ROWS else None
    return [_label(r) + (f" (degenerate: {why})" if why else ""), fmt(r["threshold"]),
            fmt_ci(m["auroc"]), fmt_ci(m["f1"]), fmt_ci(m["mcc"]), fmt_ci(m["balanced_accuracy"]),
            fmt_ci(m["precision"]), fmt_ci(m["recall"]), fmt_ci(m["average_precision"])]


METRIC_HEADERS = ["predictor", "threshold", "AUROC", "F1", "MCC", "balanced accuracy", "precision", "recall",
                  "average precision"]
LATENT_ROWS = ("latent", "steered_latent", "latent_fires")


def standing(row: dict[str, Any]) -> str:
    """Where one latent predictor stands among the baselines, in words, from the paired differences: a
    comparison is a finding only when the interval of the difference excludes 0."""
    by = {v: [q["against"] for q in row["paired"] if q["verdict"] == v] for v in ("better", "worse", "no different")}
    parts = []
    if by["better"]:
        parts.append(f"better than {', '.join(by['better'])}")
    if by["worse"]:
        parts.append(f"worse than {', '.join(by['worse'])}")
    if by["no different"]:
        parts.append(f"no different from {', '.join(by['no different'])}")
    text = f"{_label(row)}: AUROC {'; '.join(parts) or 'not compared'} (paired bootstrap, interval of the AUROC " \
           "difference)."
    why = degenerate(row)
    if why:
        text += f" Degenerate: it {why}; its F1 ({fmt(row['metrics']['f1']['estimate'])}) is that of a trivial " \
                "baseline, not evidence of prediction."
    return text


def _paired_row(r: dict[str, Any], q: dict[str, Any]) -> list[str]:
    return [_label(r), q["against"], fmt_ci(q["delta_auroc"]), fmt_ci(q["delta_f1"]), fmt_ci(q["delta_mcc"]),
            q["verdict"]]


def validation_section(run: RunDir) -> list[Block]:
    paths = ValidationPaths.of(run)
    out = [Block("h2", "Validation (held-out tasks)")]
    if not paths.results.is_file():
        return out + [Block("p", "The validation stage has not run.")]
    res = read_json(paths.results)
    b = res["bootstrap"]
    sp = res["splits"]
    out.append(Block("p", f"Predictor latents chosen by {res['selection_metric']} on the SAE-analysis split "
                          f"({sp['sae']['n']} tasks); the steered latents (chosen by separation or as configured) are "
                          f"validated too when they differ. Thresholds F1-optimal on the tuning split "
                          f"({sp['tuning']['n']}); 'fires' is the natural JumpReLU rule (activation > 0). Metrics on the "
                          f"validation split ({sp['validation']['n']} tasks, {sp['validation']['n_correct']} correct). "
                          f"Intervals: {b['level']:.0%} percentile bootstrap over tasks, {b['resamples']} resamples, "
                          f"seed {b['seed']}; differences use the same resamples for both predictors. Confounds are "
                          "single features (prompt tokens, description length, cyclomatic complexity): a latent no "
                          "better than them may only track task length or difficulty."))
    for direction in DIRECTIONS:
        rows = res["validation"][direction]
        out.append(Block("h3", f"Predicting '{direction}'"))
        out.append(Block("table", headers=METRIC_HEADERS, rows=[_metric_row(r) for r in rows]))
        latents = [r for r in rows if r["name"] in LATENT_ROWS]
        for r in latents:
            out.append(Block("p", standing(r)))
        out.append(Block("table", headers=["latent", "against", "Delta AUROC", "Delta F1", "Delta MCC", "verdict"],
                         rows=[_paired_row(r, q) for r in latents for q in r["paired"]]))
    out += images(paths.plots, (
        ("roc_pr.png", "ROC and PR curves on the validation split (band: bootstrap, latent)"),
        ("latent_histograms.png", "Validation activations of the chosen latents, with thresholds")))
    out += robustness_blocks(res, paths)
    return out


def validation_findings(run: RunDir) -> list[Finding]:
    paths = ValidationPaths.of(run)
    if not paths.results.is_file():
        return []
    res = read_json(paths.results)
    out = []
    for direction in DIRECTIONS:
        rows = res["validation"][direction]
        probe = next((r for r in rows if r["name"] == "probe"), None)
        for lat in (r for r in rows if r["name"] in ("latent", "steered_latent")):
            out.append(latent_finding(lat, probe))
    return out


def latent_finding(lat: dict[str, Any], probe: dict[str, Any] | None) -> Finding:
    """The summary line of one validated latent: AUROC with interval, the probe's, their paired difference."""
    d, auroc = lat["direction"], lat["metrics"]["auroc"]
    role = "Steered latent" if lat["name"] == "steered_latent" else "Latent"
    headline = f"{role} L{lat['layer']}:{lat['latent']} as a predictor of '{d}' ({lat['n']} held-out tasks): " \
               f"AUROC {fmt_ci(auroc)}"
    vs = next((q for q in lat["paired"] if q["name"] == "probe"), None)
    if probe is not None and vs is not None:
        headline += f"; logistic probe {fmt_ci(probe['metrics']['auroc'])}; latent - probe {fmt_ci(vs['delta_auroc'])}"
    headline += "."
    null = _contains(auroc, 0.5)
    if null:
        meaning = f"Null result: the interval contains 0.5 (chance), so this latent does not tell held-out '{d}' " \
                  "solutions from the others."
    elif bounds(auroc)[1] < 0.5:
        meaning = f"Below chance: the latent ranks held-out tasks in the reverse order: it is higher on tasks that " \
                  f"are not '{d}'."
    else:
        meaning = "The interval excludes 0.5 (chance; 1 is perfect): the latent ranks held-out tasks above chance"
        verdict = vs["verdict"] if vs else "undefined"
        meaning += {"better": ", and better than a linear probe on the whole layer.",
                    "worse": ", but a linear probe on the whole layer does better.",
                    "no different": ", no differently from a linear probe on the whole layer."}.get(
                        verdict, "; the comparison with the probe is undefined.")
    why = degenerate(lat)
    if why:
        meaning += f" Its thresholded rule is degenerate: it {why}."
    below = not null and bounds(auroc)[1] < 0.5
    return Finding(headline, meaning, "null result" if null else "below chance" if below else "degenerate" if why else "")


def robustness_blocks(res: dict[str, Any], paths) -> list[Block]:
    out = [Block("h2", "Robustness")]
    out.append(Block("h3", "Temperature"))
    out.append(Block("p", "Each temperature relabels freshly generated samples; the prompt activation is the same for "
                          "every sample of a task, so intervals resample tasks (cluster bootstrap)."))
    rows = []
    for key, t in res["temperature"].items():
        for direction in DIRECTIONS:
            for r in t["rows"][direction]:
                if r["name"] in ("latent", "probe"):
                    rows.append([key, str(t["n_tasks"]), str(t["n_samples"]), fmt_ci(t["pass_rate"]),
                                 f"{r['label']} -> {direction}", fmt_ci(r["metrics"]["auroc"]),
                                 fmt_ci(r["metrics"]["f1"])])
    if rows:
        out.append(Block("table", headers=["temperature", "tasks", "samples", "pass rate", "predictor", "AUROC",
                                           "F1"], rows=rows))
    else:
        out.append(Block("p", "No temperature was studied (validation.temperatures is empty)."))
    out += images(paths.plots, (("temperature.png", "Metrics and pass rate against temperature"),))
    out.append(Block("h3", "Difficulty (cyclomatic complexity of the reference solution)"))
    rows = []
    for bucket, d in res["difficulty"].items():
        if not d["n"]:
            rows.append([bucket, "0", "0", "no task", "", ""])
            continue
        for direction in DIRECTIONS:
            for r in d["rows"][direction]:
                rows.append([bucket, str(d["n"]), str(d["n_correct"]), f"{r['label']} -> {direction}",
                             fmt_ci(r["metrics"]["auroc"]), fmt_ci(r["metrics"]["f1"])])
    out.append(Block("table", headers=["bucket", "tasks", "correct", "predictor", "AUROC", "F1"], rows=rows))
    out += images(paths.plots, (("difficulty.png", "Metrics by difficulty bucket"),))
    return out


def _experiment_name(name: str, e: dict[str, Any]) -> str:
    return f"{experiment_event(name)} ({e['direction']} direction)"


def steering_section(run: RunDir) -> list[Block]:
    paths = SteeringPaths.of(run)
    out = [Block("h2", "Steering")]
    if not paths.results.is_file():
        return out + [Block("p", "The steering stage has not run.")]
    res = read_json(paths.results)
    design = res["design"]
    kinds = "; ".join(f"{d} direction: {v['control_kinds']['latent']} latent + {v['control_kinds']['random']} random"
                      for d, v in res["directions"].items())
    out.append(Block("p", f"All arms run on the same {res['tasks']['validation']} validation tasks with the same "
                          f"batch plan; the paired baseline is an alpha = 0 re-run. Controls per direction: "
                          f"{design['n_controls']}, half SAE latents of the target's layer (near-zero separation, "
                          f"matched firing rate, passing the general filter) and half random directions of the "
                          f"target's norm; where fewer latents qualify, random directions fill the rest ({kinds}). "
                          f"Alpha chosen on {res['tasks']['tuning']} tuning tasks for specificity (target minus the "
                          f"mean of {design['tuning_controls']} controls); "
                          f"{res['tasks']['generated']} generations in this run (cached conditions not counted)."
                          + ("" if design["target"] == "latent" else
                             f" The target is steering.target={design['target']}, not the chosen latent.")))
    out.append(Block("p", "Words used below: a correction is a validation task that failed at alpha = 0 and passes "
                          "under steering; a corruption is one that passed at alpha = 0 and fails under steering, "
                          "with either direction (steering/results.json calls the correct direction's corruption "
                          "experiment preservation_failure); the net effect is (corrections - corruptions) / tasks, "
                          "the change of pass@1."))
    rows = []
    for d, info in res["directions"].items():
        t, v = info["target"], info["target"]["validation"]
        rows.append([d, t["label"], fmt(t["latent_row"].get(f"sep_{d}")), fmt(t["latent_row"].get(f"t_{d}"), 2),
                     fmt_ci(v["auroc"]) if v else "not validated", fmt(t["alpha"], 3), t["alpha_units"],
                     fmt(t["alpha_abs"], 2), info["tuning"]["objective"], fmt(info["tuning"]["constraint_met"])])
    out.append(Block("table", headers=["direction", "steered", "separation", "t", "AUROC as predictor (validation)",
                                       "alpha", "units", "alpha (abs.)", "objective", "constraint met"], rows=rows))
    rows = []
    for name, e in res["experiments"].items():
        rate, cs = e["rate"], e["controls_summary"]
        kinds = ", ".join(f"{k} {_pct(v['mean_rate'])}" for k, v in cs["by_kind"].items())
        pd = e["paired_difference"]
        rows.append([e["direction"], experiment_event(name), e["target"], f"{rate['successes']}/{rate['n']}",
                     f"{_pct(rate['estimate'])} [{_pct(rate['ci'][0])}, {_pct(rate['ci'][1])}]", kinds,
                     f"{fmt_p(e['rank_p']['p'])} ({fmt_p(e['holm_p']['rank_p'])})",
                     f"{fmt(pd['estimate'])} [{fmt(pd['ci'][0])}, {fmt(pd['ci'][1])}]",
                     f"{fmt_p(e['permutation_p']['p'])} ({fmt_p(e['holm_p']['permutation_p'])})",
                     fmt_p(e["sign_test_p"]["p"]), fmt_p(e["prediction_p"]["p"]), fmt_p(e["mcnemar_p"]["p"])])
    out.append(Block("table", headers=["direction", "event", "target", "events / relevant tasks", "rate [exact 95%]",
                                       "controls' mean rate", "rank p (Holm)", "target - controls per task",
                                       "permutation p (Holm)", "sign-test p", "prediction p",
                                       "McNemar p vs alpha=0"], rows=rows))
    first = next(iter(res["experiments"].values()))
    out.append(Block("p", f"Relevant tasks: those failing at alpha = 0 for corrections, those passing for "
                          f"corruptions. rank p and prediction p test H0 '{first['rank_p']['null']}'; the paired "
                          f"difference, permutation and sign tests test H0 '{first['permutation_p']['null']}'; McNemar "
                          f"tests H0 '{first['mcnemar_p']['null']}'. Holm adjusts each test across the run's "
                          f"experiments. With {design['n_controls']} controls the smallest possible rank p is "
                          f"{fmt_p(1 / (design['n_controls'] + 1))}. Calibration of every test: docs/statistics.md."))
    rows = []
    for d, info in res["directions"].items():
        ne = info["net_effect"]
        counts = f"{ne['target']['corrections']} / {ne['target']['corruptions']}"
        rows.append([d, info["target"]["label"], fmt_ci(ne["target"]), counts, fmt(ne["controls_mean"])])
    out.append(Block("table", headers=["direction", "target", "net effect (Delta pass@1) [95%]",
                                       "corrections / corruptions", "controls' mean net effect"], rows=rows))
    nf = res["noise_floor"]
    out.append(Block("p", f"Noise floor ({nf['compared']}): {nf['flips']} of {nf['n']} outcomes differ "
                          f"({_pct(nf['rate'])}); {nf['identical_programs']} programs were identical."))
    out += selective_blocks(res["selective"])
    out += images(paths.plots, (("rates_vs_alpha.png", "Rates against alpha on the tuning split, target and controls"),
                                ("target_vs_controls.png", "Target vs every control (exact intervals)"),
                                ("net_effects.png", "Net effect of steering, target vs controls"),
                                ("selective.png", "Selective vs constant steering")))
    return out


def selective_blocks(sel: dict[str, Any]) -> list[Block]:
    out = [Block("h3", "Selective steering")]
    text = (f"Steer only tasks where {sel['predictor']['label']} >= {fmt(sel['predictor']['threshold'])} (the "
            f"incorrect-predictor and its tuned threshold): {sel['n_flagged']} of {sel['n_tasks']} tasks flagged.")
    if sel["flags_every_task"]:
        return out + [Block("p", text + " Degenerate: the rule flags every task, so selective steering is constant "
                                 "steering here; its numbers equal those of the incorrect direction above and are "
                                 "not repeated.")]
    if not sel["n_flagged"]:
        return out + [Block("p", text + " Degenerate: the rule flags no task, so selective steering is no steering "
                                 "here (net effect 0 by construction); nothing to compare.")]
    out.append(Block("p", text))
    diff = sel["selective_minus_constant"]
    out.append(Block("table", headers=["mode", "correction rate", "corruption rate", "net effect [95%]"],
                     rows=[[m, _pct(sel[m]["correction"]), _pct(sel[m]["corruption"]), fmt_ci(sel[m]["net_effect"])]
                           for m in ("constant", "selective")] +
                          [["selective - constant", "", "", fmt_ci(diff)]]))
    return out


def steering_findings(run: RunDir) -> list[Finding]:
    paths = SteeringPaths.of(run)
    if not paths.results.is_file():
        return []
    res = read_json(paths.results)
    out = []
    for direction, info in res["directions"].items():
        name, e = next(((n, e) for n, e in res["experiments"].items() if e["direction"] == direction), (None, None))
        out.append(steering_finding(direction, info, name, e, res["design"]["n_controls"]))
    sel = res["selective"]
    if sel["flags_every_task"]:
        out.append(Finding(f"Selective steering flagged all {sel['n_tasks']} tasks.",
                           "Degenerate: it is constant steering here, so it is no separate result.", tag="degenerate"))
    elif not sel["n_flagged"]:
        out.append(Finding(f"Selective steering flagged none of the {sel['n_tasks']} tasks.",
                           "Degenerate: it is no steering here, so it is no result.", tag="degenerate"))
    else:
        diff = sel["selective_minus_constant"]
        out.append(Finding(f"Selective steering ({sel['n_flagged']} of {sel['n_tasks']} tasks flagged): net effect "
                           f"minus constant steering's {fmt_ci(diff)}.",
                           "Null result: steering only the flagged tasks is no different from steering all of them."
                           if _contains(diff, 0.0) else
                           "Steering only where the incorrect-predictor fires changes pass@1 differently from "
                           "steering every task.", tag="null result" if _contains(diff, 0.0) else ""))
    return out


def steering_finding(direction: str, info: dict[str, Any], name: str | None, e: dict[str, Any] | None,
                     n_controls: int) -> Finding:
    """The summary line of one direction: net effect against the controls', and its headline experiment."""
    t, ne = info["target"], info["net_effect"]
    headline = f"Steering along {t['label']} ({direction} direction, alpha {t['alpha']:.3g} {t['alpha_units']}): net " \
               f"effect on pass@1 {fmt_ci(ne['target'])} over {ne['target']['n']} validation tasks (controls' mean " \
               f"{fmt(ne['controls_mean'])})."
    if e is None:
        return Finding(headline, "No experiment of this direction was run.", tag="not testable")
    event, rate = experiment_event(name), e["rate"]
    pd = e["paired_difference"]
    headline += f" {event.capitalize()}s: {rate['successes']}/{rate['n']} relevant tasks ({_pct(rate['estimate'])}) " \
                f"vs controls' mean {_pct(e['controls_summary']['mean_rate'])}; target - controls per task " \
                f"{fmt_ci(pd)}; rank p {fmt_p(e['rank_p']['p'])}, permutation p {fmt_p(e['permutation_p']['p'])} " \
                f"(Holm {fmt_p(e['holm_p']['rank_p'])}, {fmt_p(e['holm_p']['permutation_p'])})."
    if not rate["n"]:
        return Finding(headline, f"Not testable: no validation task could show a {event}.", tag="not testable")
    holm = [p for p in (e["holm_p"]["rank_p"], e["holm_p"]["permutation_p"]) if p is not None]
    if not holm or min(holm) >= ALPHA:
        floor = "" if n_controls + 1 >= 1 / ALPHA else \
            f" (with {n_controls} controls the rank p cannot go below {fmt_p(1 / (n_controls + 1))})"
        return Finding(headline, f"Null result: steering along {t['label']} causes {event}s no more often than "
                                 f"control directions do (Holm-adjusted p >= {ALPHA}){floor}.", tag="null result")
    more = (pd["estimate"] or 0) > 0
    return Finding(headline, f"The target causes {event}s {'more' if more else 'less'} often than its "
                             f"{n_controls} control directions (Holm-adjusted p < {ALPHA}): an effect specific to "
                             f"this direction, not to steering as such.")


# --------------------------------------------------------------------------- ablation and attention

def ablation_section(run: RunDir) -> list[Block]:
    paths = AblationPaths.of(run)
    if not paths.results.is_file():
        return []
    res = read_json(paths.results)
    design, ref = res["design"], res["reference"]
    kinds = "; ".join(f"{d} direction: {v['control_kinds']['latent']} latent + {v['control_kinds']['random']} random"
                      for d, v in res["directions"].items())
    out = [Block("h2", "Directional ablation"),
           Block("p", f"Each steering direction d (the unit decoder row) is removed from the residual stream at every "
                      f"layer and position while the steering stage's {res['tasks']['validation']} validation tasks are "
                      f"regenerated; method '{design['method']}' ('weights': embedding rows, attention output and MLP "
                      f"down projections orthogonalized, against (1 + w) * d where a Gemma-2 post-norm follows). "
                      f"Controls: {design['controls']} ({kinds}); baseline: {design['baseline']} "
                      f"({res['baseline']['passed']}/{res['baseline']['n']} pass, {res['baseline']['build_agreement']} "
                      f"outcomes as in the build). A corruption is a baseline-correct task that fails with d removed, a "
                      f"correction a baseline-incorrect one that passes. {res['tasks']['generated']} generations in "
                      f"this run (cached conditions not counted).")]
    rows = []
    for name, e in res["experiments"].items():
        rate, cs = e["rate"], e["controls_summary"]
        by_kind = ", ".join(f"{k} {_pct(v['mean_rate'])}" for k, v in cs["by_kind"].items())
        pd = e["paired_difference"]
        rows.append([e["direction"], name.split("_", 1)[1], e["target"], f"{rate['successes']}/{rate['n']}",
                     f"{_pct(rate['estimate'])} [{_pct(rate['ci'][0])}, {_pct(rate['ci'][1])}]", by_kind,
                     f"{fmt_p(e['rank_p']['p'])} ({fmt_p(e['holm_p']['rank_p'])})",
                     f"{fmt(pd['estimate'])} [{fmt(pd['ci'][0])}, {fmt(pd['ci'][1])}]",
                     f"{fmt_p(e['permutation_p']['p'])} ({fmt_p(e['holm_p']['permutation_p'])})",
                     fmt_p(e["sign_test_p"]["p"]), fmt_p(e["mcnemar_p"]["p"])])
    out.append(Block("table", headers=["removed direction", "event", "target", "events / relevant tasks",
                                       "rate [exact 95%]", "controls' mean rate", "rank p (Holm)",
                                       "target - controls per task", "permutation p (Holm)", "sign-test p",
                                       "McNemar p vs unablated"], rows=rows))
    ours = res["experiments"].get(ref["experiment"])
    if ours:
        out.append(Block("p", f"The original study reported {_pct(ref['target'])} of correct programs failing once "
                              f"the correct direction was removed, vs {_pct(ref['control'])} for a control ({ref['method']}). "
                              f"Here: {_pct(ours['rate']['estimate'])} vs the controls' mean "
                              f"{_pct(ours['controls_summary']['mean_rate'])}."))
    rows = [[d, c["dtype"], f"{c['orthogonalized']['max']:.2e}", f"{c['original']['max']:.2e}", str(c["n_prompts"])]
            for d, c in res["residual_check"].items()]
    if rows:
        out.append(Block("table", headers=["direction", "dtype", "largest |<r, d>| / |r|, weights orthogonalized",
                                           "unedited", "prompts"], rows=rows))
    rows = [[d, str(c["n"]), pair, _pct(v["same_outcome"]), _pct(v["same_program"])]
            for d, c in res["comparison"].items() for pair, v in c["pairs"].items()]
    if rows:
        out.append(Block("p", "The three ways of removing d on a subset of tasks (transformers' generate): "
                              "'write_hooks' is the hook form of the weight edit; 'residual_hooks' projects d out of the "
                              "residual itself, a different intervention where post-norms follow the writes."))
        out.append(Block("table", headers=["direction", "tasks", "methods", "same outcome", "same program"], rows=rows))
    return out + images(paths.plots, (("target_vs_controls.png", "Ablation: target vs every control"),))


def ablation_findings(run: RunDir) -> list[Finding]:
    paths = AblationPaths.of(run)
    if not paths.results.is_file():
        return []
    res = read_json(paths.results)
    out = []
    for name, e in res["experiments"].items():
        if not e["rate"]["successes"] and not any(c["successes"] for c in e["controls"]):
            continue
        holm = [e["holm_p"]["rank_p"], e["holm_p"]["permutation_p"]]
        significant = all(p is not None and p < ALPHA for p in holm)
        direction, event = name.split("_", 1)
        headline = (f"Removing the {direction} direction ({e['target']}): {event} {e['rate']['successes']}/"
                    f"{e['rate']['n']} ({_pct(e['rate']['estimate'])}) vs controls' mean "
                    f"{_pct(e['controls_summary']['mean_rate'])}; Holm rank p {fmt_p(holm[0])}, permutation p "
                    f"{fmt_p(holm[1])}.")
        meaning = ("Removing this direction changes outcomes more than removing its controls: it carries something "
                   "the model uses." if significant else
                   f"No more than removing a control direction does (Holm-adjusted p >= {ALPHA}).")
        out.append(Finding(headline, meaning, "" if significant else "null result"))
    if not out:
        out.append(Finding("Directional ablation changed no outcome, target or control.",
                           "Removing the directions does not affect pass/fail on these tasks.", tag="null result"))
    return out


def _pp(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f} pp"


def attention_section(run: RunDir) -> list[Block]:
    paths = AttentionPaths.of(run)
    if not paths.results.is_file():
        return []
    res = read_json(paths.results)
    sections = res["sections"]
    out = [Block("h2", "Attention to prompt sections"),
           Block("p", f"Attention mass of the last prompt token on each section of the prompt (sections located from "
                      f"the template's placeholders and the tokenizer's offsets; 'other' is the template's own text), "
                      f"eager attention weights (soft-capping and sliding window applied), {res['n_tasks']} validation "
                      f"tasks, averaged over {res['n_layers']} layers x {res['n_heads']} heads; per-head masses sum to 1 "
                      f"(largest deviation {res['sums_to_one']:.1e}). Steering as in the steering stage (target "
                      f"latent, its coefficient, positions).")]
    rows = [[name] + [_pct(m["overall"][s]) for s in sections] for name, m in res["means"].items()]
    out.append(Block("table", headers=["condition"] + sections, rows=rows))
    rows = []
    for d, diff in res["differences"].items():
        st = res["steering"][d]
        rows.append([d, st["label"], fmt(st["alpha"], 2)] +
                    [f"{_pp(diff['overall'][s]['estimate'])} [{_pp(diff['overall'][s]['ci'][0])}, "
                     f"{_pp(diff['overall'][s]['ci'][1])}]" for s in sections])
    out.append(Block("table", headers=["steered direction", "latent", "alpha (abs.)"] +
                     [f"{s}: steered - baseline [95%]" for s in sections], rows=rows))
    ref = res["reference"]
    late = [f"{d} (steered at layer {st['layer']} {st['site']}: layers >= {st['first_layer_affected']} can change)"
            for d, st in res["steering"].items() if "first_layer_affected" in st]
    out.append(Block("p", f"Intervals: task bootstrap ({res['bootstrap_resamples']} resamples), both conditions of a "
                          f"task resampled together. Attention before the steered layer cannot move: {'; '.join(late)}. "
                          f"The original study reported {ref['correct_pp']:+.2f} pp (correct direction) and "
                          f"{ref['incorrect_pp']:+.2f} pp (incorrect direction) on the tests section."))
    return out + images(paths.plots, (("sections.png", "Mean attention mass per section and condition"),
                                      ("tests_by_head.png", "Change of the mass on the tests section per layer and head")))


def attention_findings(run: RunDir) -> list[Finding]:
    paths = AttentionPaths.of(run)
    if not paths.results.is_file():
        return []
    res = read_json(paths.results)
    out = []
    for d, diff in res["differences"].items():
        t = diff["overall"]["tests"]
        lo, hi = t["ci"]
        moved = lo > 0 or hi < 0
        after_all = res["steering"][d].get("first_layer_affected", 0) >= res["n_layers"]
        meaning = ("Steering shifts where the model looks in the prompt." if moved else
                   "Steered at the last layer's output, after every attention layer: no attention can move." if after_all
                   else "No shift of attention to the tests distinguishable from zero.")
        out.append(Finding(f"Steering the {d} direction ({res['steering'][d]['label']}) moves the last prompt token's "
                           f"attention on the tests section by {_pp(t['estimate'])} [{_pp(lo)}, {_pp(hi)}].",
                           meaning, "" if moved else ("not testable" if after_all else "null result")))
    return out


def reproducibility_section(run: RunDir) -> list[Block]:
    out = [Block("h2", "Reproducibility")]
    if not run.manifest.is_file():
        return out + [Block("p", "No manifest.")]
    m = read_json(run.manifest)
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
    out.append(Block("p", f"pva-sae {m.get('pva_sae_version')}, git {m.get('git_commit')}; {versions}. "
                          f"Seeds: {m.get('seeds')}. Dataset sha256 {(m.get('dataset') or {}).get('sha256')}. "
                          f"Config: {run.config.name}; manifest: {run.manifest.name}."))
    return out


def transfer_section(run: RunDir) -> list[Block]:
    """Validation and steering with another run's frozen choices (``validation.transfer_from``)."""
    val = read_json(ValidationPaths.of(run).results) if ValidationPaths.of(run).results.is_file() else {}
    steer = read_json(SteeringPaths.of(run).results) if SteeringPaths.of(run).results.is_file() else {}
    t = val.get("transfer")
    if not t:
        return []
    out = [Block("h2", "Transfer from another run"),
           Block("p", f"Latents, thresholds, probe and difference-of-means weights, majority class and steering "
                      f"coefficients come unchanged from {t['base_run']} (model {t['base_model']}, revision "
                      f"{t.get('base_model_revision')}, {t['base_dataset']}; choices sha256 "
                      f"{str(t['base_choices_sha256'])[:12]}): nothing was selected or fitted on this run.")]
    rows = [[name, fmt_ci(r["base"]), fmt_ci(r["this"]), fmt_ci(r["change"]) if r.get("change") else "n/a",
             str(r["n_shared"])] for name, r in t["pass_rate"].items()]
    out.append(Block("table", headers=["split", "pass@1, base run [95%]", "pass@1, this run [95%]",
                                       "paired change [95%]", "shared tasks"], rows=rows))
    rows = [[p["label"], p["name"]] + [f"{fmt_ci(p[m]['base'])} -> {fmt_ci(p[m]['this'])}" for m in ("auroc", "f1")]
            for p in t["predictors"]]
    if rows:
        out.append(Block("table", headers=["frozen predictor", "kind", "AUROC: base -> this run", "F1: base -> this run"],
                         rows=rows))
    st = steer.get("transfer")
    if st:
        rows = []
        for name, e in st["experiments"].items():
            for which in ("base", "this"):
                b = e.get(which)
                if b:
                    rows.append([experiment_event(name), which, str(b["target"]), fmt_ci(b["rate"]),
                                 _pct(b["controls_mean_rate"]), str(b["n_controls"]), fmt_p(b["rank_p"]),
                                 fmt_p(b["permutation_p"])])
        out.append(Block("table", headers=["experiment", "run", "target", "rate [95%]", "controls' mean",
                                           "controls", "rank p", "permutation p"], rows=rows))
    return out


def transfer_findings(run: RunDir) -> list[Finding]:
    paths = ValidationPaths.of(run)
    t = read_json(paths.results).get("transfer") if paths.results.is_file() else None
    if not t:
        return []
    rate = t["pass_rate"]["all"]
    change = rate.get("change")
    headline = (f"Transferred from {t['base_model']}: pass@1 {fmt_ci(rate['base'])} there, {fmt_ci(rate['this'])} "
                f"here" + (f" (paired change {fmt_ci(change)})" if change else "") + ".")
    return [Finding(headline, "The frozen predictors and coefficients of the base run are scored on this model's "
                              "residuals; the tables below compare them run by run.")]


SECTIONS: list[Section] = [
    Section("dataset", dataset_section, dataset_findings),
    Section("analysis", analysis_section),
    Section("validation", validation_section, validation_findings),
    Section("steering", steering_section, steering_findings),
    Section("ablation", ablation_section, ablation_findings),
    Section("attention", attention_section, attention_findings),
    Section("transfer", transfer_section, transfer_findings),
    Section("reproducibility", reproducibility_section),
]


# --------------------------------------------------------------------------- summary box

def model_caveats(run: RunDir) -> list[str]:
    """On a model that ships with pva-sae (the embedded default), the statement that it is a test bed."""
    name = (read_json(run.config).get("model") or {}).get("name")
    entry = next((e for e in read_registry("models.json", "models") if e["key"] == name and "path" in e), None)
    if entry is None:
        return []
    return [(f"Test bed: {name} is the embedded default model shipped with pva-sae (a miniature {entry['family']} "
             f"of {entry['n_layers']} layers, d_model {entry['d_model']}, trained for this tool). Its results show "
             "that the pipeline runs end to end; they are not findings about Gemma 2 or any other real model.")]


def summary_block(run: RunDir, sections: list[Section]) -> Block:
    findings = [f for s in sections if s.findings for f in s.findings(run)]
    if not findings:
        findings = [Finding("No stage has finished yet.", "Run `pva-sae run` (or the stages one by one) on this "
                            "run directory, then `pva-sae report` again.", tag="not testable")]
    return Block("summary", "Summary: what this run found", findings=findings, caveats=model_caveats(run))


def build_blocks(run: RunDir, sections: list[Section] | None = None) -> list[Block]:
    sections = SECTIONS if sections is None else sections
    blocks = [Block("h1", f"pva-sae report: {run.root.name}"),
              Block("p", f"Run directory {run.root}; report written {time.strftime('%Y-%m-%d %H:%M:%S')}."),
              summary_block(run, sections)]
    for section in sections:
        blocks += section.blocks(run)
    return blocks


# --------------------------------------------------------------------------- renderers

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f0f0f0}img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}
figcaption{font-size:13px;color:#555}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.summary{border:2px solid #4a6fa5;background:#f4f7fc;border-radius:6px;padding:.4em 1.2em .8em;margin:1.2em 0}
.summary .title{font-size:1.25em;font-weight:600;margin:.5em 0}.summary .caveat{background:#fff4d6;
border-left:4px solid #d9a400;padding:.4em .8em}.summary li{margin:.5em 0}.summary .meaning{color:#333}
.tag{font-size:11px;font-weight:600;text-transform:uppercase;background:#777;color:#fff;border-radius:3px;
padding:1px 5px;margin-right:.4em}.wide{overflow-x:auto}td.num{white-space:nowrap}
.ci{display:block;color:#555;font-size:11px}"""


def _summary_html(b: Block, link=None) -> str:
    caveats = "".join(f"<p class='caveat'>{html.escape(c)}</p>" for c in b.caveats)
    items = "".join(f"<li>{f'<span class=tag>{html.escape(f.tag)}</span>' if f.tag else ''}<strong>"
                    f"{link_latents(html.escape(f.headline), link)}</strong><br><span class='meaning'>"
                    f"{link_latents(html.escape(f.meaning), link)}</span></li>" for f in b.findings)
    return f"<section class='summary'><p class='title'>{html.escape(b.text)}</p>{caveats}<ul>{items}</ul></section>"


NUMBER = re.compile(r"^(-?[\d.]+%?|n/a|< 0\.001)( \[-?[\d.]+%?, -?[\d.]+%?\])?( \(.*\))?$")


def _cell(text: str, link=None) -> str:
    """A table cell; a number's interval goes on a line of its own under it, and never wraps inside itself."""
    found = NUMBER.match(text)
    if not found:
        return f"<td>{link_latents(html.escape(text), link)}</td>"
    ci = f"<span class='ci'>{html.escape(found.group(2).strip())}</span>" if found.group(2) else ""
    rest = html.escape(found.group(3) or "")
    return f"<td class='num'>{html.escape(found.group(1))}{rest}{ci}</td>"


def render_html(blocks: list[Block], link=None) -> str:
    """The HTML page; with ``link`` (``link(layer, index) -> url | None``) every latent named ``L<layer>:<index>``
    in a paragraph, table cell or finding links to its Neuronpedia page."""
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>pva-sae report</title>",
             f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            parts.append(f"<p>{link_latents(html.escape(b.text), link)}</p>")
        elif b.kind == "summary":
            parts.append(_summary_html(b, link))
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(_cell(c, link) for c in row) + "</tr>" for row in b.rows)
            parts.append(f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
        elif b.kind == "img":
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_markdown(b: Block, link=None) -> list[str]:
    lines = [f"> **{b.text}**", ">"]
    for caveat in b.caveats:
        lines += [f"> *{caveat}*", ">"]
    for f in b.findings:
        lines.append(f"> - {f'**[{f.tag}]** ' if f.tag else ''}**{link_latents(f.headline, link, 'markdown')}** "
                     f"{link_latents(f.meaning, link, 'markdown')}")
    return lines + [""]


def render_markdown(blocks: list[Block], base: Path, link=None) -> str:
    """The Markdown twin of :func:`render_html` (image paths relative to ``base``; latent links likewise)."""
    lines = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [link_latents(b.text, link, "markdown"), ""]
        elif b.kind == "summary":
            lines += _summary_markdown(b, link)
        elif b.kind == "table":
            lines.append("| " + " | ".join(b.headers) + " |")
            lines.append("|" + "---|" * len(b.headers))
            lines += ["| " + " | ".join(link_latents(c.replace("|", "\\|"), link, "markdown") for c in row) + " |"
                      for row in b.rows]
            lines.append("")
        elif b.kind == "img":
            lines += [f"![{b.text}]({b.path.relative_to(base).as_posix()})", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into the run directory; returns their paths."""
    run = RunDir.at(run_dir)
    if not run.config.is_file():
        raise MissingInputError(f"{run.root} is not a pva-sae run directory (no config.json): give the --run-dir "
                                "of a run made by `pva-sae build` or `pva-sae run`")
    blocks = build_blocks(run)
    link = latent_link(run)
    html_path, md_path = run.report_html, run.report_md
    atomic_write_text(html_path, render_html(blocks, link))
    atomic_write_text(md_path, render_markdown(blocks, run.root, link))
    return html_path, md_path


def latent_link(run: RunDir):
    """Neuronpedia links of the run's latents from its analysis summary (None for SAEs without public pages,
    such as the embedded default's, and before the analysis stage)."""
    paths = AnalysisPaths.of(run)
    return link_from_sharing(read_json(paths.summary).get("sharing")) if paths.summary.is_file() else None
