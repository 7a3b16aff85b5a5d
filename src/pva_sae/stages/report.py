"""The run report: one self-contained HTML file (plots inlined, no network) and a Markdown twin.

Both are rendered from the same list of blocks, built only from the JSON results of the stages, so
the report shows exactly the numbers in those files. A stage that has not run yet gets a section
saying so. Written to ``<run>/report.html`` and ``<run>/report.md``.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pva_sae.config import DIRECTIONS
from pva_sae.errors import MissingInputError
from pva_sae.rundir.atomic import atomic_write_text, read_json
from pva_sae.rundir.paths import AnalysisPaths, RunDir, SteeringPaths, ValidationPaths


@dataclass
class Block:
    kind: str                        # 'h1', 'h2', 'h3', 'p', 'table', 'img'
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(interval: dict[str, Any] | None, digits: int = 3) -> str:
    """'0.712 [0.650, 0.770]' from an interval dict; 'n/a' where undefined."""
    if not interval or interval.get("estimate") is None:
        return "n/a"
    low, high = interval["ci"] if "ci" in interval else (interval.get("low"), interval.get("high"))
    if low is None:
        return fmt(interval["estimate"], digits)
    return f"{fmt(interval['estimate'], digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def images(folder: Path, items) -> list[Block]:
    """An image block per (file name, caption) whose file exists in ``folder``."""
    return [Block("img", caption, path=folder / name) for name, caption in items if (folder / name).is_file()]


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
    out += images(paths.plots, (("selection_landscape.png", "Selection landscape: every latent, t against "
                                 "separation; grey = cut by the general filter; the chosen latents marked"),
                                ("frequency_scatter.png", "Firing frequency, correct vs incorrect tasks, per layer"),
                                ("top_latent_histograms.png", "Activations of the top latents by class")))
    return out


def _metric_row(r: dict[str, Any]) -> list[str]:
    m = r["metrics"]
    return [r["label"] + (" (steered)" if r["name"] == "steered_latent" else ""), fmt(r["threshold"]),
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
    text = f"{row['label']}{' fires' if row['name'] == 'latent_fires' and 'fires' not in row['label'] else ''}: AUROC " \
           f"{'; '.join(parts) or 'not compared'} (paired bootstrap, interval of the AUROC difference)."
    f1 = row["metrics"]["f1"]["estimate"]
    trivial = [q for q in row["paired"] if q["name"] in ("majority", "always_positive")]
    if any(q["delta_f1"]["estimate"] == 0 and q["delta_f1"]["low"] == 0 and q["delta_f1"]["high"] == 0
           for q in trivial):
        text += f" Its F1 ({fmt(f1)}) equals a trivial baseline's on every resample: it predicts like always " \
                "answering one class (degenerate)."
    return text


def _paired_row(r: dict[str, Any], q: dict[str, Any]) -> list[str]:
    return [r["label"] + (" fires" if r["name"] == "latent_fires" and "fires" not in r["label"] else ""),
            q["against"], fmt_ci(q["delta_auroc"]), fmt_ci(q["delta_f1"]), fmt_ci(q["delta_mcc"]), q["verdict"]]


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
    out.append(Block("table", headers=["temperature", "tasks", "samples", "pass rate", "predictor", "AUROC", "F1"],
                     rows=rows))
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
                          f"Alpha chosen on {res['tasks']['tuning']} tuning tasks for specificity (target minus the mean of {design['tuning_controls']} controls); "
                          f"{res['tasks']['generated']} generations in this run (cached conditions not counted)."
                          + ("" if design["target"] == "latent" else
                             f" The target is steering.target={design['target']}, not the chosen latent.")))
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
        rows.append([name.replace("_", " "), e["target"], f"{rate['successes']}/{rate['n']}",
                     f"{_pct(rate['estimate'])} [{_pct(rate['ci'][0])}, {_pct(rate['ci'][1])}]", kinds,
                     f"{fmt_p(e['rank_p']['p'])} ({fmt_p(e['holm_p']['rank_p'])})",
                     f"{fmt(pd['estimate'])} [{fmt(pd['ci'][0])}, {fmt(pd['ci'][1])}]",
                     f"{fmt_p(e['permutation_p']['p'])} ({fmt_p(e['holm_p']['permutation_p'])})",
                     fmt_p(e["sign_test_p"]["p"]), fmt_p(e["prediction_p"]["p"]), fmt_p(e["mcnemar_p"]["p"])])
    out.append(Block("table", headers=["experiment", "target", "flips", "rate [exact 95%]", "control mean rate",
                                       "rank p (Holm)", "target - controls per task", "permutation p (Holm)",
                                       "sign-test p", "prediction p", "McNemar p vs alpha=0"], rows=rows))
    first = next(iter(res["experiments"].values()))
    out.append(Block("p", f"rank p and prediction p test H0 '{first['rank_p']['null']}'; the paired difference, "
                          f"permutation and sign tests test H0 '{first['permutation_p']['null']}'; McNemar tests "
                          f"H0 '{first['mcnemar_p']['null']}'. Holm adjusts each test across the run's experiments. "
                          "Calibration of every test: docs/statistics.md."))
    rows = []
    for d, info in res["directions"].items():
        ne = info["net_effect"]
        rows.append([d, info["target"]["label"], fmt_ci(ne["target"]), f"{ne['target']['corrections']} / "
                     f"{ne['target']['corruptions']}", fmt(ne["controls_mean"])])
    out.append(Block("table", headers=["direction", "target", "net effect (Delta pass@1) [95%]",
                                       "corrections / corruptions", "controls' mean net effect"], rows=rows))
    nf = res["noise_floor"]
    out.append(Block("p", f"Noise floor ({nf['compared']}): {nf['flips']} of {nf['n']} outcomes flipped "
                          f"({_pct(nf['rate'])}); {nf['identical_programs']} programs were identical."))
    sel = res["selective"]
    out.append(Block("h3", "Selective steering"))
    text = (f"Steer only tasks where {sel['predictor']['label']} >= {fmt(sel['predictor']['threshold'])} (the "
            f"incorrect-predictor and its tuned threshold): {sel['n_flagged']} of {sel['n_tasks']} tasks flagged.")
    if sel["flags_every_task"]:
        text += " The rule flags every task, so selective steering is constant steering here (degenerate)."
    out.append(Block("p", text))
    diff = sel["selective_minus_constant"]
    out.append(Block("table", headers=["mode", "correction", "corruption", "net effect [95%]"],
                     rows=[[m, _pct(sel[m]["correction"]), _pct(sel[m]["corruption"]), fmt_ci(sel[m]["net_effect"])]
                           for m in ("constant", "selective")] +
                          [["selective - constant", "", "", fmt_ci(diff)]]))
    out += images(paths.plots, (("rates_vs_alpha.png", "Rates against alpha on the tuning split, target and controls"),
                                ("target_vs_controls.png", "Target vs every control (exact intervals)"),
                                ("net_effects.png", "Net effect of steering, target vs controls"),
                                ("selective.png", "Selective vs constant steering")))
    return out


VERSUS = {"better": "better than", "worse": "worse than", "no different": "no different from",
          "undefined": "not comparable with"}


def validation_summary(results: dict[str, Any]) -> list[str]:
    """One line per validated latent: AUROC and F1 with intervals, the probe's, the best trivial F1, and the
    verdict of the paired AUROC difference against the probe."""
    lines = []
    for direction in DIRECTIONS:
        rows = results["validation"][direction]
        by = {r["name"]: r for r in rows}
        probe = by["probe"]
        trivial = max((by["majority"], by["always_positive"]), key=lambda r: r["metrics"]["f1"]["estimate"])
        for lat in [r for r in rows if r["name"] in ("latent", "steered_latent")]:
            vs = next(q for q in lat["paired"] if q["name"] == "probe")
            m = lat["metrics"]
            role = "steered latent" if lat["name"] == "steered_latent" else "latent"
            lines.append(f"{role} L{lat['layer']}:{lat['latent']} -> {direction}: AUROC {fmt_ci(m['auroc'])}, F1 "
                         f"{fmt_ci(m['f1'])} (probe AUROC {fmt_ci(probe['metrics']['auroc'])}: {VERSUS[vs['verdict']]} the "
                         f"probe; {trivial['label']} F1 {fmt_ci(trivial['metrics']['f1'])})")
    return lines


def steering_summary(results: dict[str, Any]) -> list[str]:
    """One line per experiment (target vs its controls, rank and permutation p) and per direction (net effect)."""
    lines = []
    for name, e in results["experiments"].items():
        rate, cs = e["rate"], e["controls_summary"]
        control = "n/a" if cs["mean_rate"] is None else f"{cs['mean_rate']:.1%}"
        share = "n/a" if rate["estimate"] is None else f"{rate['estimate']:.1%}"
        lines.append(f"{name} ({e['target']}, {e['direction']} direction): {rate['successes']}/{rate['n']} ({share}) "
                     f"vs {e['n_controls']} controls {control}; rank p {fmt_p(e['rank_p']['p'])}, permutation p "
                     f"{fmt_p(e['permutation_p']['p'])} (Holm {fmt_p(e['holm_p']['permutation_p'])})")
    for direction, d in results["directions"].items():
        lines.append(f"net effect of {d['target']['label']} ({direction} direction): "
                     f"{fmt_ci(d['net_effect']['target'])} vs controls' mean {fmt(d['net_effect']['controls_mean'])}")
    return lines


def fmt_p(x: float | None) -> str:
    """p-values: three significant digits, '< 0.001' below that."""
    if x is None:
        return "n/a"
    return "< 0.001" if x < 0.001 else f"{x:.3g}"


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


def build_blocks(run: RunDir) -> list[Block]:
    blocks = [Block("h1", f"pva-sae report: {run.root.name}"),
              Block("p", f"Run directory {run.root}; report written {time.strftime('%Y-%m-%d %H:%M:%S')}.")]
    for section in (dataset_section, analysis_section, validation_section, steering_section, reproducibility_section):
        blocks += section(run)
    return blocks


# --------------------------------------------------------------------------- renderers

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left}th{background:#f0f0f0}img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}
figcaption{font-size:13px;color:#555}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"""


def render_html(blocks: list[Block]) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>pva-sae report</title>",
             f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3", "p"):
            parts.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "img":
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(blocks: list[Block], base: Path) -> str:
    lines = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "table":
            lines.append("| " + " | ".join(b.headers) + " |")
            lines.append("|" + "---|" * len(b.headers))
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in b.rows]
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
    html_path, md_path = run.report_html, run.report_md
    atomic_write_text(html_path, render_html(blocks))
    atomic_write_text(md_path, render_markdown(blocks, run.root))
    return html_path, md_path
