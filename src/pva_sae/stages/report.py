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
    if interval.get("low") is None:
        return fmt(interval["estimate"], digits)
    return f"{fmt(interval['estimate'], digits)} [{fmt(interval['low'], digits)}, {fmt(interval['high'], digits)}]"


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
    out += images(paths.plots, (("frequency_scatter.png", "Firing frequency, correct vs incorrect tasks, per layer"),
                                ("top_latent_histograms.png", "Activations of the top latents by class")))
    return out


def _metric_row(r: dict[str, Any]) -> list[str]:
    m = r["metrics"]
    return [r["label"], fmt(r["threshold"]), fmt_ci(m["auroc"]), fmt_ci(m["f1"]), fmt_ci(m["precision"]),
            fmt_ci(m["recall"]), fmt_ci(m["average_precision"])]


METRIC_HEADERS = ["predictor", "threshold", "AUROC", "F1", "precision", "recall", "average precision"]


def standing(rows: list[dict[str, Any]]) -> str:
    """Where the latent stands among the baselines, in words."""
    latent = next(r for r in rows if r["name"] == "latent")
    auc = latent["metrics"]["auroc"]["estimate"]
    better = [r["label"] for r in rows if r["name"] != "latent" and r["metrics"]["auroc"]["estimate"] is not None
              and r["metrics"]["auroc"]["estimate"] > (auc or 0)]
    trivial = max((r for r in rows if r["name"] in ("majority", "always_positive")),
                  key=lambda r: r["metrics"]["f1"]["estimate"] or 0.0)
    f1_l, f1_t = latent["metrics"]["f1"], trivial["metrics"]["f1"]
    above = f1_l["low"] is not None and f1_t["estimate"] is not None and f1_l["low"] > f1_t["estimate"]
    auc_text = ("the highest AUROC of all predictors" if not better
                else f"a lower AUROC than {', '.join(better)}")
    f1_text = (f"its F1 interval lies above the best trivial F1 ({trivial['label']}, {fmt(f1_t['estimate'])})"
               if above else f"its F1 ({fmt(f1_l['estimate'])}) is not clearly above the best trivial F1 "
                             f"({trivial['label']}, {fmt(f1_t['estimate'])})")
    return f"{latent['label']} has {auc_text}; {f1_text}."


def validation_section(run: RunDir) -> list[Block]:
    paths = ValidationPaths.of(run)
    out = [Block("h2", "Validation (held-out tasks)")]
    if not paths.results.is_file():
        return out + [Block("p", "The validation stage has not run.")]
    res = read_json(paths.results)
    b = res["bootstrap"]
    sp = res["splits"]
    out.append(Block("p", f"Latents chosen by {res['selection_metric']} on the SAE-analysis split "
                          f"({sp['sae']['n']} tasks), thresholds F1-optimal on the tuning split ({sp['tuning']['n']}), "
                          f"metrics on the validation split ({sp['validation']['n']} tasks, "
                          f"{sp['validation']['n_correct']} correct). Intervals: {b['level']:.0%} percentile bootstrap "
                          f"over tasks, {b['resamples']} resamples, seed {b['seed']}."))
    for direction in DIRECTIONS:
        rows = res["validation"][direction]
        out.append(Block("h3", f"Predicting '{direction}'"))
        out.append(Block("table", headers=METRIC_HEADERS, rows=[_metric_row(r) for r in rows]))
        out.append(Block("p", standing(rows)))
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
    rows = [[d, f"L{t['layer']}:{t['latent']}", fmt(t.get(f"sep_{d}")), fmt(t["alpha"], 3), t["alpha_units"],
             fmt(t["alpha_abs"], 2), t["normalize"], t["positions"], res["tuning"][d]["objective"],
             fmt(res["tuning"][d]["constraint_met"])] for d, t in res["targets"].items()]
    out.append(Block("p", f"Coefficients chosen on the tuning split ({res['tasks']['tuning']} tasks), experiments on "
                          f"{res['tasks']['validation']} validation tasks; {res['tasks']['generated']} steered "
                          "generations in this run (cached conditions not counted)."))
    out.append(Block("table", headers=["direction", "latent", "separation", "alpha", "units", "alpha (abs.)",
                                       "direction vector", "positions", "objective", "constraint met"], rows=rows))
    rows = []
    for name, e in res["experiments"].items():
        rows.append([name.replace("_", " "), e["direction"], f"{e['successes']}/{e['n']}", _pct(e["rate"]),
                     f"[{_pct(e['wilson'][0])}, {_pct(e['wilson'][1])}]",
                     f"{e['control_successes']}/{e['control_n']}", _pct(e["control_rate"]),
                     _p(e["binomial_p_vs_control"]), _p(e["fisher_p"]), _p(e["mcnemar_p"]), fmt(e["mean_similarity"])])
    out.append(Block("table", headers=["experiment", "steering", "target", "rate", "95% Wilson", "controls",
                                       "control rate", "binomial p", "Fisher p", "McNemar p", "similarity"], rows=rows))
    nf = res["noise_floor"]
    out.append(Block("p", f"Noise floor: an unsteered greedy re-run of {nf['n']} tasks flipped {nf['flips']} outcomes "
                          f"({_pct(nf['rate'])}); {nf['identical_programs']} programs were identical. Controls: "
                          f"{len(res['controls']['correct'])} latents per direction, same layer, |separation| small, "
                          "firing rate matched to the target."))
    sel = res["selective"]
    out.append(Block("h3", "Selective steering"))
    out.append(Block("p", f"Steer only tasks where {sel['predictor']['label']} >= {fmt(sel['predictor']['threshold'])} "
                          f"(the incorrect-predictor and its tuned threshold): {sel['n_flagged']} of {sel['n_tasks']} "
                          "tasks flagged."))
    out.append(Block("table", headers=["mode", "correction", "corruption"],
                     rows=[[m, f"{sel[m]['corrected']}/{sel['n_incorrect']} ({_pct(sel[m]['correction'])})",
                            f"{sel[m]['broken']}/{sel['n_correct']} ({_pct(sel[m]['corruption'])})"]
                           for m in ("constant", "selective")]))
    out += images(paths.plots, (("rates_vs_alpha.png", "Rates against alpha on the tuning split"),
                                ("target_vs_controls.png", "Target latent vs control latents (Wilson intervals)"),
                                ("selective.png", "Selective vs constant steering")))
    return out


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


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
    blocks = build_blocks(run)
    html_path, md_path = run.report_html, run.report_md
    atomic_write_text(html_path, render_html(blocks))
    atomic_write_text(md_path, render_markdown(blocks, run.root))
    return html_path, md_path
