"""Static PNG plots of the SAE analysis (matplotlib, Agg backend: no display needed).

A plot with nothing to show is not drawn: its function returns None and the stage lists only the files
written. Legends sit where they cover no data (``loc="best"``, or outside the axes where the data fill
them). The words are those of the report: a *correction* is a task failing at alpha = 0 that passes under
steering, a *corruption* one passing at alpha = 0 that fails under steering, with either direction.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pva_sae.config import DIRECTIONS
from pva_sae.stats.classify import curve_band, pr_curve, roc_curve
from pva_sae.stats.predictors import positive

EVENTS = {"correction": "correction", "preservation_failure": "corruption", "corruption": "corruption"}


def experiment_event(name: str) -> str:
    """The event a steering experiment counts: 'correction' or 'corruption' (the correct direction's
    corruption experiment is stored as 'preservation_failure')."""
    return EVENTS.get(name, name.replace("_", " "))


def fmt_p(x: float | None) -> str:
    """p-values: three significant digits, '< 0.001' below that."""
    if x is None:
        return "n/a"
    return "< 0.001" if x < 0.001 else f"{x:.3g}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frequency_scatter(path: Path, scores: dict[int, dict[str, Any]], table: list[dict[str, Any]]) -> Path:
    """One panel per layer: firing frequency among correct vs incorrect tasks; top latents marked."""
    plt = _pyplot()
    layers = sorted(scores)
    cols = min(6, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    top = [r for r in table if r["scope"] == "layer" and r["metric"] == "separation" and r["rank"] <= 5]
    for ax, layer in zip(axes.flat, layers):
        fc, fi = scores[layer]["f_correct"].numpy(), scores[layer]["f_incorrect"].numpy()
        ax.scatter(fi, fc, s=2, alpha=0.3, color="0.5", rasterized=True)
        for direction, color in (("correct", "tab:green"), ("incorrect", "tab:red")):
            sel = [r for r in top if r["layer"] == layer and r["direction"] == direction]
            ax.scatter([r["f_incorrect"] for r in sel], [r["f_correct"] for r in sel], s=18, color=color,
                       label=f"top {direction}")
        ax.plot([0, 1], [0, 1], lw=0.5, color="k")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes[0, 0].set_xlabel("fires on incorrect (share)")
    axes[0, 0].set_ylabel("fires on correct (share)")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=2, frameon=False)
    fig.suptitle("SAE latent firing frequency, correct vs incorrect tasks (SAE-analysis split)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_top_histograms(path: Path, table: list[dict[str, Any]], saes, acts, labels, layers: list[int],
                        n_each: int = 3) -> Path | None:
    """Activation histograms of the overall top latents (by separation), split by class; None without any."""
    overall = [r for r in table if r["scope"] == "overall" and r["metric"] == "separation"]
    picks = [r for r in overall if r["direction"] == "correct"][:n_each] + \
        [r for r in overall if r["direction"] == "incorrect"][:n_each]
    if not picks:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 2.8), squeeze=False)
    y = labels.bool().numpy()
    for ax, row in zip(axes.flat, picks):
        i = layers.index(row["layer"])
        values = saes[row["layer"]].encode(acts[:, i])[:, row["latent"]].cpu().numpy()
        top = max(float(values.max()), 1e-6)
        bins = [top * k / 20 for k in range(21)]
        ax.hist(values[y], bins=bins, alpha=0.6, color="tab:green", label="correct")
        ax.hist(values[~y], bins=bins, alpha=0.6, color="tab:red", label="incorrect")
        ax.set_title(f"L{row['layer']}:{row['latent']} ({row['direction']}, sep {row['sep_' + row['direction']]:.2f})",
                     fontsize=8)
        ax.set_xlabel("activation")
    axes[0, 0].set_ylabel("tasks")
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_selection_landscape(path: Path, scores: dict[int, dict[str, Any]], general: dict[int, Any],
                             max_general: float, chosen: dict[str, dict[str, dict[str, Any]]]) -> Path:
    """Every latent of every layer: Welch t against separation score, one panel per direction; latents cut
    by the general-text filter in grey, the chosen predictor (t) and steering (separation) latents marked.
    The top of a selection over this many latents is biased upwards: validation is what counts."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    markers = {"predictor": ("*", "tab:orange"), "steering": ("D", "tab:blue")}
    for ax, direction in zip(axes, DIRECTIONS):
        for layer in sorted(scores):
            sep = np.asarray(scores[layer][f"sep_{direction}"])
            t = np.asarray(scores[layer][f"t_{direction}"])
            cut = np.asarray(general[layer]) >= max_general
            ax.scatter(sep[~cut], t[~cut], s=2, alpha=0.35, rasterized=True, label=f"L{layer}")
            ax.scatter(sep[cut], t[cut], s=2, alpha=0.35, color="0.75", rasterized=True,
                       label=f">= {max_general:.0%} general" if layer == min(scores) else None)
        for role, rows in chosen.items():
            r = rows[direction]
            marker, color = markers[role]
            ax.scatter([r[f"sep_{direction}"]], [r[f"t_{direction}"]], s=90, marker=marker, color=color,
                       edgecolor="k", zorder=5, label=f"{role}: L{r['layer']}:{r['latent']}")
        ax.set(xlabel=f"separation ({direction})", ylabel=f"Welch t ({direction})",
               title=f"latents predicting '{direction}' (SAE-analysis split)")
        legend = ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
        for handle in legend.legend_handles:  # one marker size in the legend, whatever the size in the plot
            handle.set_sizes([30])
    return _save(fig, path)


def plot_analysis(folder: Path, scores, table, saes, acts, labels, layers) -> list[Path]:
    paths = [plot_frequency_scatter(folder / "frequency_scatter.png", scores, table),
             plot_top_histograms(folder / "top_latent_histograms.png", table, saes, acts, labels, layers)]
    return [p for p in paths if p is not None]


# --------------------------------------------------------------------------- validation

COLORS = {"latent": "tab:blue", "probe": "tab:orange", "diff_means": "tab:purple", "majority": "0.4", "random": "0.7"}


def _save(fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roc_pr(path: Path, predictors, feats, val_ids, y_val, cfg) -> Path:
    """ROC and PR curves on the validation split: the latent with a 95% bootstrap band, baselines as lines."""

    plt = _pyplot()
    v = cfg.validation
    fig, axes = plt.subplots(2, 2, figsize=(9, 10), squeeze=False)
    for row, direction in enumerate(DIRECTIONS):
        y = positive(y_val, direction)
        for p in (p for p in predictors if p.direction == direction and p.name in ("latent", "probe", "diff_means")):
            s = p.score(feats, val_ids)
            fpr, tpr, _ = roc_curve(s, y)
            precision, recall, _ = pr_curve(s, y)
            axes[row, 0].plot(fpr, tpr, color=COLORS[p.name], label=p.label, lw=1.5 if p.name == "latent" else 1)
            axes[row, 1].step(np.r_[0, recall], np.r_[precision[:1], precision], where="post", color=COLORS[p.name],
                              label=p.label, lw=1.5 if p.name == "latent" else 1)
            if p.name == "latent":
                for col, kind in enumerate(("roc", "pr")):
                    band = curve_band(s, y, np.arange(len(s)), kind, v.bootstrap_resamples, v.bootstrap_seed,
                                      v.ci_level)
                    axes[row, col].fill_between(band["grid"], band["low"], band["high"], color=COLORS[p.name],
                                                alpha=0.2, label=f"{v.ci_level:.0%} band (latent)")
        axes[row, 0].plot([0, 1], [0, 1], ls="--", color=COLORS["random"], label="chance")
        axes[row, 1].axhline(y.mean(), ls="--", color=COLORS["random"], label=f"prevalence {y.mean():.2f}")
        axes[row, 0].set(xlabel="false positive rate", ylabel="true positive rate",
                         title=f"ROC, predicting {direction} (validation)")
        axes[row, 1].set(xlabel="recall", ylabel="precision", title=f"PR, predicting {direction} (validation)")
        for ax in axes[row]:  # below the axes: curves and bands can fill any corner
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
            ax.set_xlim(-0.01, 1.01)
            ax.set_ylim(-0.01, 1.01)
    return _save(fig, path)


def plot_latent_histograms(path: Path, predictors, feats, val_ids, y_val) -> Path | None:
    """Validation activations of the two chosen latents by class, with the tuned threshold."""

    latents = [p for p in predictors if p.name == "latent"]
    if not latents:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(latents), figsize=(4.5 * len(latents), 3.2), squeeze=False)
    for ax, p in zip(axes.flat, latents):
        s = p.score(feats, val_ids)
        bins = np.linspace(0, max(float(s.max()), p.threshold, 1e-6) * 1.02, 25)
        ax.hist(s[y_val], bins=bins, alpha=0.6, color="tab:green", label=f"correct (n={int(y_val.sum())})")
        ax.hist(s[~y_val], bins=bins, alpha=0.6, color="tab:red", label=f"incorrect (n={int((~y_val).sum())})")
        ax.axvline(p.threshold, color="k", ls="--", label=f"threshold {p.threshold:.3g} (tuning split)")
        ax.set(title=f"{p.label}, predicts {p.direction}", xlabel="activation", ylabel="tasks")
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _legend_below(fig, ax, ncol: int = 4) -> tuple[float, float, float, float]:
    """One legend for the whole figure, below its panels (error bars span the axes: no corner is free);
    returns the rect that leaves room for it."""
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=ncol, frameon=False)
    return (0, 0.1, 1, 1)


def _errorbar(ax, xs, intervals, **kw):
    est = np.array([np.nan if i["estimate"] is None else i["estimate"] for i in intervals], dtype=float)
    lo = np.array([np.nan if i["low"] is None else i["low"] for i in intervals], dtype=float)
    hi = np.array([np.nan if i["high"] is None else i["high"] for i in intervals], dtype=float)
    ax.errorbar(xs, est, yerr=[np.clip(est - lo, 0, None), np.clip(hi - est, 0, None)], capsize=3, marker="o", **kw)


def plot_temperature(path: Path, results: dict[str, Any]) -> Path | None:
    """AUROC and F1 of the latents and the probe, and the pass rate, against temperature (cluster-bootstrap
    bars); None without any temperature."""
    temps = list(results["temperature"].values())
    if not temps:
        return None
    plt = _pyplot()
    xs = [t["temperature"] for t in temps]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.0))
    for metric, ax in zip(("auroc", "f1"), axes[:2]):
        for direction, ls in (("correct", "-"), ("incorrect", "--")):
            for name in ("latent", "probe"):
                rows = [next(r for r in t["rows"][direction] if r["name"] == name) for t in temps]
                _errorbar(ax, xs, [r["metrics"][metric] for r in rows], ls=ls, color=COLORS[name],
                          label=f"{rows[0]['label']} -> {direction}")
        ax.set(xlabel="temperature", ylabel=metric.upper() if metric == "auroc" else "F1",
               title=f"{metric.upper() if metric == 'auroc' else 'F1'} vs temperature")
    _errorbar(axes[2], xs, [t["pass_rate"] for t in temps], color="k")
    axes[2].set(xlabel="temperature", ylabel="pass rate", title="share of samples passing", ylim=(-0.02, 1.02))
    return _save(fig, path, _legend_below(fig, axes[0]))


def plot_difficulty(path: Path, results: dict[str, Any]) -> Path | None:
    """AUROC and F1 per difficulty bucket (validation split), with bootstrap bars; None if no bucket has a task."""

    buckets = [b for b, d in results["difficulty"].items() if d["n"]]
    if not buckets:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0))
    series = [(d, n) for d in DIRECTIONS for n in ("latent", "probe")]
    width = 0.8 / len(series)
    for ax, metric in zip(axes, ("auroc", "f1")):
        for k, (direction, name) in enumerate(series):
            rows = [next(r for r in results["difficulty"][b]["rows"][direction] if r["name"] == name)
                    for b in buckets]
            xs = np.arange(len(buckets)) + (k - (len(series) - 1) / 2) * width
            _errorbar(ax, xs, [r["metrics"][metric] for r in rows], ls="none", color=COLORS[name],
                      alpha=1.0 if direction == "correct" else 0.55, label=f"{rows[0]['label']} -> {direction}")
        ax.set_xticks(range(len(buckets)), [f"{b}\n(n={results['difficulty'][b]['n']})" for b in buckets])
        ax.set(ylabel=metric.upper() if metric == "auroc" else "F1", title=f"{metric.upper()} by difficulty")
    return _save(fig, path, _legend_below(fig, axes[0]))


def plot_validation(folder: Path, results, predictors, feats, val_ids, y_val, cfg) -> list[Path]:
    paths = [plot_roc_pr(folder / "roc_pr.png", predictors, feats, val_ids, y_val, cfg),
             plot_latent_histograms(folder / "latent_histograms.png", predictors, feats, val_ids, y_val),
             plot_temperature(folder / "temperature.png", results),
             plot_difficulty(folder / "difficulty.png", results)]
    return [p for p in paths if p is not None]


# --------------------------------------------------------------------------- steering

KIND_COLORS = {"latent": "tab:purple", "random": "0.55"}


def plot_steering_tuning(path: Path, results: dict[str, Any]) -> Path | None:
    """Correction and corruption against alpha on the tuning split: the target (solid) and the mean of the
    tuning controls (dashed), the chosen alpha marked; one panel per direction that was tuned, None if
    neither was (alpha fixed by steering.alphas)."""
    tuned = [d for d in DIRECTIONS if results["directions"][d]["tuning"]["table"]]
    if not tuned:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tuned), figsize=(5.5 * len(tuned), 4.4), squeeze=False)
    for ax, direction in zip(axes.flat, tuned):
        d = results["directions"][direction]
        rows = d["tuning"]["table"]
        xs = [r["alpha"] for r in rows]
        for key, color in (("correction", "tab:green"), ("corruption", "tab:red")):
            target = [r["target"][key] for r in rows]
            ctrl = [r["controls_mean"][key] for r in rows]
            ax.plot(xs, [np.nan if y is None else y for y in target], marker="o", color=color,
                    label=f"{key} rate, target")
            ax.plot(xs, [np.nan if y is None else y for y in ctrl], marker=".", ls="--", color=color,
                    alpha=0.6, label=f"{key} rate, controls (mean)")
        chosen = d["tuning"]["chosen"]["alpha"]
        ax.axvline(chosen, color="k", ls=":", label=f"chosen alpha {chosen:.3g}")
        ax.set_xscale("log")
        t = d["target"]
        ax.set(xlabel=f"alpha ({t['alpha_units']})", ylabel="rate", ylim=(-0.02, 1.02),
               title=f"{direction} direction, {t['label']} (tuning split)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    return _save(fig, path)


def _bar_values(ax, bars, values) -> None:
    """Print each bar's value on it, so a bar of height 0 still reads as a measured 0."""
    ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.0%}" for v in values], fontsize=7, padding=2)


def plot_steering_experiments(path: Path, results: dict[str, Any]) -> Path | None:
    """Per experiment with relevant tasks: the target's rate (bar, exact interval) and every control's rate
    (dots by kind); None when no experiment had a relevant task."""
    names = [n for n, e in results["experiments"].items() if e["n"]]
    if not names:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, name in enumerate(names):
        e = results["experiments"][name]
        r = e["rate"]["estimate"] or 0.0
        lo, hi = (r, r) if e["rate"]["ci"][0] is None else e["rate"]["ci"]
        bars = ax.bar(i - 0.15, r, width=0.3, color="tab:blue", label="target" if i == 0 else None)
        ax.errorbar(i - 0.15, r, yerr=[[max(r - lo, 0)], [max(hi - r, 0)]], color="k", capsize=3)
        _bar_values(ax, bars, [e["rate"]["estimate"]])
        for j, kind in enumerate(("latent", "random")):
            ys = [c["rate"] for c in e["controls"] if c["kind"] == kind and c["rate"] is not None]
            xs = i + 0.1 + 0.12 * j + np.linspace(-0.04, 0.04, len(ys)) if ys else []
            ax.scatter(xs, ys, s=9, color=KIND_COLORS[kind], zorder=3,
                       label=f"{kind} controls" if i == 0 else None)
        ax.text(i, 1.04, f"n={e['n']}, rank p {fmt_p(e['rank_p']['p'])}", ha="center", fontsize=7)
    ax.set_xticks(range(len(names)), [f"{experiment_event(n)} rate\n({results['experiments'][n]['direction']} "
                                      f"direction)" for n in names])
    ax.set(ylabel="share of the relevant validation tasks", ylim=(0, 1.12), title="Target vs controls")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_net_effects(path: Path, results: dict[str, Any]) -> Path | None:
    """Delta pass@1 over all validation tasks: target with its interval, controls as dots; None when no
    net effect is defined."""
    nets = [results["directions"][d]["net_effect"] for d in DIRECTIONS]
    if all(ne["target"]["estimate"] is None for ne in nets):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, ne in enumerate(nets):
        est = ne["target"]["estimate"] or 0.0
        lo, hi = ne["target"]["ci"] if ne["target"]["ci"][0] is not None else (est, est)
        ax.errorbar(i - 0.1, est, yerr=[[est - lo], [hi - est]], fmt="o", color="tab:blue", capsize=3,
                    label="target" if i == 0 else None)
        for j, kind in enumerate(("latent", "random")):
            ys = [c["estimate"] for c in ne["controls"] if c["kind"] == kind and c["estimate"] is not None]
            ax.scatter([i + 0.1 + 0.1 * j] * len(ys), ys, s=9, color=KIND_COLORS[kind],
                       label=f"{kind} controls" if i == 0 else None)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(DIRECTIONS)), [f"{d} direction" for d in DIRECTIONS])
    low, high = ax.get_ylim()
    span = max(high - low, 0.2)  # all at 0: show a readable band around it
    ax.set_ylim(min(low, -span / 2), max(high, span / 2))
    ax.set(ylabel="change of pass@1\n(corrections - corruptions) / tasks", title="Net effect of steering (validation)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_selective(path: Path, results: dict[str, Any]) -> Path | None:
    """Correction and corruption rates of selective vs constant steering; None when the rule flags every
    task or none (selective steering is then constant steering or no steering: nothing to compare)."""
    sel = results["selective"]
    if sel["flags_every_task"] or not sel["n_flagged"]:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, key in enumerate(("correction", "corruption")):
        for offset, (mode, color) in enumerate((("constant", "tab:blue"), ("selective", "tab:orange"))):
            v = sel[mode][key]
            bars = ax.bar(i + (offset - 0.5) * 0.35, 0.0 if v is None else v, width=0.33, color=color,
                          label=mode if i == 0 else None)
            _bar_values(ax, bars, [v])
    ax.set_xticks([0, 1], ["correction rate", "corruption rate"])
    ax.set(ylabel="rate", ylim=(0, 1.12), title=f"Selective steering ({sel['n_flagged']}/{sel['n_tasks']} tasks flagged)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_steering(folder: Path, results: dict[str, Any]) -> list[Path]:
    paths = [plot_steering_tuning(folder / "rates_vs_alpha.png", results),
             plot_steering_experiments(folder / "target_vs_controls.png", results),
             plot_net_effects(folder / "net_effects.png", results),
             plot_selective(folder / "selective.png", results)]
    return [p for p in paths if p is not None]
