"""Static PNG plots of the SAE analysis (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


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
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle("SAE latent firing frequency, correct vs incorrect tasks (SAE-analysis split)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_top_histograms(path: Path, table: list[dict[str, Any]], saes, acts, labels, layers: list[int],
                        n_each: int = 3) -> Path:
    """Activation histograms of the overall top latents (by separation), split by class."""
    plt = _pyplot()
    overall = [r for r in table if r["scope"] == "overall" and r["metric"] == "separation"]
    picks = [r for r in overall if r["direction"] == "correct"][:n_each] + \
        [r for r in overall if r["direction"] == "incorrect"][:n_each]
    fig, axes = plt.subplots(1, max(len(picks), 1), figsize=(3.2 * max(len(picks), 1), 2.8), squeeze=False)
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
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_analysis(folder: Path, scores, table, saes, acts, labels, layers) -> list[Path]:
    return [plot_frequency_scatter(folder / "frequency_scatter.png", scores, table),
            plot_top_histograms(folder / "top_latent_histograms.png", table, saes, acts, labels, layers)]
