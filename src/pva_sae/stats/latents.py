"""Per-latent statistics separating correct from incorrect tasks: pure math, no I/O.

Inputs are SAE activations ``acts (n_tasks, d_sae)`` (any float dtype, CPU or GPU) and boolean
``labels (n_tasks,)`` with True = correct. Everything is computed in float32 on the device of
``acts``; results are float32 tensors of shape ``(d_sae,)`` on that device.

* Firing frequency (Ferrando et al. 2024, "Do I Know This Entity?", sec. 3): a latent fires on a
  task when its activation is > 0; ``f_correct[j]`` is the share of correct tasks on which latent j
  fires, ``f_incorrect[j]`` likewise.
* Separation score (same source): ``s_correct = f_correct - f_incorrect`` ranks latents of the
  "correct" direction, ``s_incorrect = f_incorrect - f_correct`` those of the "incorrect" one.
* Welch's t (Welch 1947): ``t = (m_c - m_i) / sqrt(v_c / n_c + v_i / n_i)`` with unbiased group
  variances (ddof 1), correct minus incorrect; identical to
  ``scipy.stats.ttest_ind(correct, incorrect, equal_var=False).statistic`` wherever that is finite.
  Conventions where it is not:
    - both group variances zero (in practice: a latent that never fires): ``t = 0``. scipy gives NaN
      (equal means) or +-inf (different constants); 0 ranks such latents as "no evidence".
    - a group with a single task: the variance is undefined and ``t`` is NaN for every latent, as in
      scipy. ``top_k`` skips NaN; callers should report that the split is too small.
    - an empty group: ``ValueError`` (no frequency is defined either).

Scoring 26 layers x 16,384 latents x 500 tasks takes about 1 s on 2 CPU cores (measured with
``scripts/bench_scores.py``, see docs/benchmarks_cpu.md): ``score_all_layers`` streams one layer at
a time, so memory stays at one layer's activations plus a few (d_sae,) vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from pva_sae.config import DIRECTIONS
from pva_sae.errors import InputError

SCORE_KEYS = ("f_correct", "f_incorrect", "sep_correct", "sep_incorrect", "t_correct", "t_incorrect",
              "mean_correct", "mean_incorrect")


def _prepare(acts: "Tensor", labels: "Tensor") -> tuple["Tensor", "Tensor"]:
    """(float32 acts (n, d), bool labels (n,) on the same device); shape and class checks."""

    if acts.dim() != 2:
        raise ValueError(f"acts must be 2-D (n_tasks, d_sae), got shape {tuple(acts.shape)}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != acts.shape[0]:
        raise ValueError(f"labels must be 1-D with one entry per row of acts ({acts.shape[0]}), "
                         f"got shape {tuple(labels.shape)}")
    if labels.dtype != torch.bool:
        if not torch.all((labels == 0) | (labels == 1)):
            raise ValueError("labels must be boolean (True = correct) or 0/1")
        labels = labels.bool()
    labels = labels.to(acts.device)
    n_correct = int(labels.sum())
    if n_correct == 0 or n_correct == labels.numel():
        missing = "incorrect" if n_correct else "correct"
        raise ValueError(f"labels contain no {missing} task: per-group statistics need both classes")
    return acts.to(torch.float32), labels


def firing_frequencies(acts: "Tensor", labels: "Tensor") -> tuple["Tensor", "Tensor"]:
    """(f_correct (d,), f_incorrect (d,)): share of each group's tasks on which each latent fires (acts > 0)."""

    acts, labels = _prepare(acts, labels)
    fires = (acts > 0).to(torch.float32)                 # (n, d)
    y = labels.to(torch.float32)                         # (n,)
    n_correct = y.sum()
    fired_correct = y @ fires                            # (d,) count of correct tasks where j fires
    fired_incorrect = fires.sum(0) - fired_correct       # (d,)
    return fired_correct / n_correct, fired_incorrect / (labels.numel() - n_correct)


def separation_scores(f_correct: "Tensor", f_incorrect: "Tensor") -> tuple["Tensor", "Tensor"]:
    """(s_correct = f_c - f_i, s_incorrect = f_i - f_c), Ferrando et al. 2024."""
    return f_correct - f_incorrect, f_incorrect - f_correct


def mean_activations(acts: "Tensor", labels: "Tensor") -> tuple["Tensor", "Tensor"]:
    """(mean over correct tasks (d,), mean over incorrect tasks (d,)) of the activations."""
    acts, labels = _prepare(acts, labels)
    return acts[labels].mean(0), acts[~labels].mean(0)


def _moments(x: "Tensor") -> tuple["Tensor", "Tensor", int]:
    """(mean (d,), unbiased variance (d,), n) of the rows of x (n, d); variance is NaN when n < 2."""

    n = x.shape[0]
    if n < 2:
        return x.mean(0), torch.full_like(x[0], float("nan")), n
    var, mean = torch.var_mean(x, dim=0, correction=1)  # two-pass in torch: no E[x^2]-E[x]^2 cancellation
    return mean, var, n


def _welch(mean_c, var_c, n_c: int, mean_i, var_i, n_i: int) -> "Tensor":
    """Welch's t from group moments; 0 where both variances are 0 (see module docstring)."""

    se2 = var_c / n_c + var_i / n_i                      # (d,) squared standard error of m_c - m_i
    t = (mean_c - mean_i) / se2.sqrt()
    return torch.where(se2 == 0, torch.zeros_like(t), t)  # NaN se2 (a group of 1) stays NaN


def welch_t(acts: "Tensor", labels: "Tensor") -> "Tensor":
    """Welch's t per latent (d,), correct minus incorrect; matches scipy ttest_ind(equal_var=False)."""
    acts, labels = _prepare(acts, labels)
    return _welch(*_moments(acts[labels]), *_moments(acts[~labels]))


def score_layer(acts: "Tensor", labels: "Tensor") -> dict[str, "Tensor"]:
    """Every per-latent statistic of one layer: {name: (d,) float32} for name in ``SCORE_KEYS``.

    ``t_incorrect = -t_correct`` so that both directions rank by "larger is more selective".
    """
    acts, labels = _prepare(acts, labels)
    correct, incorrect = acts[labels], acts[~labels]     # (n_c, d), (n_i, d)
    f_correct = (correct > 0).float().mean(0)
    f_incorrect = (incorrect > 0).float().mean(0)
    mean_c, var_c, n_c = _moments(correct)
    mean_i, var_i, n_i = _moments(incorrect)
    t = _welch(mean_c, var_c, n_c, mean_i, var_i, n_i)
    sep_correct, sep_incorrect = separation_scores(f_correct, f_incorrect)
    return {"f_correct": f_correct, "f_incorrect": f_incorrect, "sep_correct": sep_correct,
            "sep_incorrect": sep_incorrect, "t_correct": t, "t_incorrect": -t,
            "mean_correct": mean_c, "mean_incorrect": mean_i}


def score_all_layers(source: Any, labels: "Tensor", *, layers: Iterable[int] | None = None,
                     device: "str | torch.device | None" = None,
                     out_device: "str | torch.device" = "cpu") -> dict[int, dict[str, "Tensor"]]:
    """``{layer: score_layer(acts_of_layer, labels)}``, one layer in memory at a time.

    ``source`` is one of: a mapping ``{layer: acts (n, d_sae)}``; an iterable of ``(layer, acts)``
    pairs (e.g. a generator that encodes each layer on demand); or a function ``layer -> acts``
    (then ``layers`` is required), e.g. ``lambda L: saes[L].encode(resid[:, layers.index(L)])``.
    Activations are moved to ``device`` (default: where they are), scored in float32 and the
    (d_sae,) results moved to ``out_device`` before the next layer is produced.
    """

    out: dict[int, dict[str, torch.Tensor]] = {}
    for layer, acts in _iter_layers(source, layers):
        acts = acts if device is None else acts.to(device)
        scores = score_layer(acts, torch.as_tensor(labels))
        out[int(layer)] = {k: v.to(out_device) for k, v in scores.items()}
        del acts, scores
    return out


def _iter_layers(source: Any, layers: Iterable[int] | None):
    if callable(source) and not isinstance(source, Mapping):
        if layers is None:
            raise ValueError("score_all_layers(fn, ...) needs layers=[...] to know which layers to encode")
        return ((layer, source(layer)) for layer in layers)
    if isinstance(source, Mapping):
        keys = list(layers) if layers is not None else list(source)
        return ((layer, source[layer]) for layer in keys)
    if layers is not None:
        wanted = set(layers)
        return ((layer, acts) for layer, acts in source if layer in wanted)
    return iter(source)


def top_k(scores: "Tensor", k: int, exclude_mask: "Tensor | None" = None) -> tuple["Tensor", "Tensor"]:
    """(indices, values) of the k largest scores of a 1-D tensor, largest first.

    Entries where ``exclude_mask`` is True and NaN scores are never returned, so fewer than ``k``
    come back when fewer remain. Ties keep index order (a stable sort): results are deterministic.
    """

    if scores.dim() != 1:
        raise ValueError(f"top_k takes a 1-D score vector, got shape {tuple(scores.shape)}; "
                         f"flatten layers first (and map indices back with divmod)")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    keep = ~torch.isnan(scores)
    if exclude_mask is not None:
        exclude_mask = torch.as_tensor(exclude_mask, device=scores.device)
        if exclude_mask.shape != scores.shape or exclude_mask.dtype != torch.bool:
            raise ValueError(f"exclude_mask must be a bool tensor of shape {tuple(scores.shape)}, got "
                             f"{exclude_mask.dtype} {tuple(exclude_mask.shape)}")
        keep &= ~exclude_mask
    candidates = keep.nonzero().squeeze(1)                               # (m,) ascending indices
    order = torch.sort(scores[candidates], descending=True, stable=True).indices[:k]
    indices = candidates[order]
    return indices, scores[indices]


def select_latents(table: list[dict[str, Any]], metric: str) -> dict[str, dict[str, Any]]:
    """The top overall latent per direction by ``metric`` ('t' or 'separation') from the ranked table."""
    out = {}
    for direction in DIRECTIONS:
        rows = [r for r in table if r["scope"] == "overall" and r["metric"] == metric and r["direction"] == direction]
        if not rows:
            raise InputError(f"the ranked table holds no {direction}-predicting latent by {metric}: every latent was "
                             "filtered out; lower analysis.general_max_frequency or check the analysis stage")
        out[direction] = min(rows, key=lambda r: r["rank"])
    return out
METRICS = {"separation": "sep_{d}", "t": "t_{d}"}


def score_layers(saes: dict[int, Any], acts, labels, layers: list[int]) -> dict[int, dict[str, Any]]:
    """{layer: stats.score_layer(...)} from residuals (n_tasks, n_layers, d_model) and bool labels (n_tasks,)."""

    out = {}
    for i, layer in enumerate(layers):
        sae = saes[layer]
        latents = sae.encode(acts[:, i].to(sae.W_enc.device))  # (n_tasks, d_sae)
        out[layer] = {k: v.float().cpu() for k, v in score_layer(latents, labels.to(latents.device)).items()}
    return out


def rank_latents(scores: dict[int, dict[str, Any]], general: dict[int, Any], max_general: float, n_top: int,
                 link: Callable[[int, int], str | None] | None = None) -> list[dict[str, Any]]:
    """Rows for the top-k latents per (metric, direction), per layer and overall."""

    rows: list[dict[str, Any]] = []
    for metric, template in METRICS.items():
        for direction in DIRECTIONS:
            key = template.format(d=direction)
            candidates = []
            for layer, per in scores.items():
                excluded = torch.as_tensor(general[layer] >= max_general)
                indices, _ = top_k(per[key], n_top, exclude_mask=excluded)
                layer_rows = [_row(scores, general, layer, int(i), link) for i in indices]
                rows.extend(_ranked(layer_rows, "layer", metric, direction))
                candidates.extend(layer_rows)
            candidates.sort(key=lambda r: r[key], reverse=True)
            rows.extend(_ranked(candidates[:n_top], "overall", metric, direction))
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
