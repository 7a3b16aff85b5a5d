"""Score every latent of every layer and build the ranked-latent table.

Separation score and Welch t (``stats``) are computed per layer on the SAE-analysis split; latents
firing on at least ``max_general`` of the general corpus are excluded; the top-k per direction is
listed per layer and over all layers, ranked by separation score and, separately, by t.
"""

from __future__ import annotations

from typing import Any, Callable

METRICS = {"separation": "sep_{d}", "t": "t_{d}"}
DIRECTIONS = ("correct", "incorrect")


def score_layers(saes: dict[int, Any], acts, labels, layers: list[int]) -> dict[int, dict[str, Any]]:
    """{layer: stats.score_layer(...)} from residuals (n_tasks, n_layers, d_model) and bool labels (n_tasks,)."""
    from .stats import score_layer

    out = {}
    for i, layer in enumerate(layers):
        sae = saes[layer]
        latents = sae.encode(acts[:, i].to(sae.W_enc.device))  # (n_tasks, d_sae)
        out[layer] = {k: v.float().cpu() for k, v in score_layer(latents, labels.to(latents.device)).items()}
    return out


def rank_latents(scores: dict[int, dict[str, Any]], general: dict[int, Any], max_general: float, top_k: int,
                 link: Callable[[int, int], str | None] | None = None) -> list[dict[str, Any]]:
    """Rows for the top-k latents per (metric, direction), per layer and overall."""
    import torch

    rows: list[dict[str, Any]] = []
    for metric, template in METRICS.items():
        for direction in DIRECTIONS:
            key = template.format(d=direction)
            candidates = []
            for layer, per in scores.items():
                values = per[key].clone()
                values[general[layer] >= max_general] = float("-inf")
                values[torch.isnan(values)] = float("-inf")
                k = min(top_k, int(torch.isfinite(values).sum()))
                top = torch.topk(values, k)
                layer_rows = [_row(scores, general, layer, int(i), link) for i in top.indices]
                rows.extend(_ranked(layer_rows, "layer", metric, direction))
                candidates.extend(layer_rows)
            candidates.sort(key=lambda r: r[key], reverse=True)
            rows.extend(_ranked(candidates[:top_k], "overall", metric, direction))
    return rows


def _ranked(rows, scope: str, metric: str, direction: str) -> list[dict[str, Any]]:
    return [{"scope": scope, "metric": metric, "direction": direction, "rank": i + 1, **r} for i, r in enumerate(rows)]


def _row(scores, general, layer: int, idx: int, link) -> dict[str, Any]:
    per = scores[layer]
    row: dict[str, Any] = {"layer": layer, "latent": idx}
    for name, values in per.items():
        row[name] = float(values[idx])
    row["general_frequency"] = float(general[layer][idx])
    row["neuronpedia"] = link(layer, idx) if link else None
    return row
