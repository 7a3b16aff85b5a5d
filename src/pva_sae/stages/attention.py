"""Attention to the prompt's sections: where does the last prompt token look, and does steering move it?

For every validation task (``attention.max_tasks``, seeded) one forward pass over the prompt returns
each layer's attention weights (eager attention: Gemma-2's soft-capping and sliding window are in
them; SDPA and the fast decoder return none). From the LAST prompt token, the attention mass of
every head on each section of the prompt is summed over the section's tokens:

- ``bos``: the BOS token;
- ``description``, ``tests``, ``initiator``: the tokens of the template's ``{text}``, ``{tests}`` and
  ``{initiator}``, located from the tokenizer's character offsets and the template's own layout
  (:func:`section_spans`), so a changed ``prompt.template`` is found as well;
- ``other``: the template's literal text between them (separators, headings).

The five masses of a head sum to 1. They are read for the baseline and under each steering direction
(the steering stage's target latent, coefficient and positions; a prompt pass sees steering unless
``steering.positions='generated'``). Per layer and head, and averaged over layers and heads, the
steered-minus-baseline difference of every section is reported with a task-bootstrap interval (the
tasks are resampled; both conditions of a task move together). Outputs under ``<run>/attention/``.
"""

from __future__ import annotations

import logging
import string
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pva_sae.config import DIRECTIONS, Config
from pva_sae.data import benchmarks, prompts
from pva_sae.data.mbpp import seeded_subset
from pva_sae.data.text import unix_newlines
from pva_sae.errors import InputError, MissingInputError
from pva_sae.model.hooks import SteeringHook
from pva_sae.model.registry import load_model
from pva_sae.rundir.artifacts import (
    load_records,
    read_analysis_summary,
    read_splits,
    read_steering_results,
    save_attention_masses,
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
from pva_sae.rundir.paths import AnalysisPaths, AttentionPaths, RunDir, SteeringPaths
from pva_sae.sae.registry import load_layer_sae
from pva_sae.stats.causal import bootstrap_means_batch, percentile_interval

log = logging.getLogger(__name__)

STAGE = "attention"
UPSTREAM_FIELDS = ("model.name", "model.revision", "model.dtype", "data.dataset", "data.source",
                   "data.split_fractions", "data.split_seed", "prompt")
SECTIONS = ("bos", "description", "tests", "initiator", "other")
PLACEHOLDER_SECTION = {"text": "description", "tests": "tests", "initiator": "initiator"}
# The original study (arXiv 2510.02917): change of attention to the tests section under its correct and
# incorrect steering directions, in percentage points.
REFERENCE = {"section": "tests", "correct_pp": 14.60, "incorrect_pp": -12.69}


# --------------------------------------------------------------------------- sections

def section_spans(template: str, values: dict[str, str]) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """The formatted prompt and, per section, the character spans [start, end) of its placeholder's text,
    walked from the template's own parse (literal text, then a field, ...)."""
    out: list[str] = []
    spans: dict[str, list[tuple[int, int]]] = {s: [] for s in PLACEHOLDER_SECTION.values()}
    pos = 0
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(literal)
        pos += len(literal)
        if field is not None:
            value = values[field]
            spans[PLACEHOLDER_SECTION[field]].append((pos, pos + len(value)))
            out.append(value)
            pos += len(value)
    return "".join(out), spans


def task_sections(task: Any, cfg: Config) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """The task's prompt (exactly the one every stage builds) and its section spans."""
    if cfg.prompt.style != "tests":
        raise InputError(f"attention sections follow the template's placeholders: prompt.style={cfg.prompt.style!r} "
                         "has none; use prompt.style='tests'")
    values = {"text": unix_newlines(task.text).strip(),
              "tests": prompts.format_tests(task.test_list, allow_empty=getattr(task, "example_source", None) == "none"),
              "initiator": cfg.prompt.initiator}
    prompt, spans = section_spans(cfg.prompt.template, values)
    built = prompts.build_prompt(task, cfg.prompt.template, cfg.prompt.initiator, cfg.prompt.style)
    if prompt != built:
        raise InputError(f"task {task.task_id}: the prompt rebuilt from the template's sections differs from the "
                         f"prompt the stages use; the section finder must follow pva_sae.data.prompts.build_prompt")
    return prompt, spans


def token_sections(offsets: list[tuple[int, int]], special: list[bool], spans: dict[str, list[tuple[int, int]]]
                   ) -> np.ndarray:
    """(n_tokens, n_sections) one-hot section of every token: a leading special token is 'bos'; any other token
    goes to the section its characters overlap most, 'other' when it overlaps none (template literals)."""
    onehot = np.zeros((len(offsets), len(SECTIONS)), dtype=np.float32)
    for i, ((start, end), is_special) in enumerate(zip(offsets, special)):
        if is_special:
            onehot[i, SECTIONS.index("bos" if i == 0 else "other")] = 1
            continue
        best, name = 0, "other"
        for section, ranges in spans.items():
            overlap = sum(max(0, min(end, b) - max(start, a)) for a, b in ranges)
            if overlap > best:
                best, name = overlap, section
        onehot[i, SECTIONS.index(name)] = 1
    return onehot


def encode_sections(tokenizer: Any, prompt: str, spans: dict[str, list[tuple[int, int]]]) -> np.ndarray:
    """(n_tokens, n_sections) for the prompt as the tokenizer encodes it (BOS included)."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("attention sections need a fast tokenizer (character offsets of every token)")
    enc = tokenizer(prompt, return_offsets_mapping=True, return_special_tokens_mask=True)
    return token_sections([tuple(o) for o in enc["offset_mapping"]], [bool(m) for m in enc["special_tokens_mask"]],
                          spans)


# --------------------------------------------------------------------------- masses

def last_token_masses(attentions: tuple[torch.Tensor, ...], attention_mask: torch.Tensor,
                      onehots: list[np.ndarray]) -> np.ndarray:
    """(batch, n_layers, n_heads, n_sections) attention mass of the last prompt token on each section.

    ``attentions``: per layer (batch, heads, query, key) weights; ``attention_mask`` (batch, seq) marks the real
    tokens (either padding side); ``onehots[b]`` (n_tokens_b, n_sections) the sections of row b's real tokens.
    """
    batch = attention_mask.shape[0]
    out = np.zeros((batch, len(attentions), attentions[0].shape[1], len(SECTIONS)), dtype=np.float32)
    for b in range(batch):
        real = torch.nonzero(attention_mask[b]).flatten().cpu()         # (n_tokens_b,)
        if real.numel() != onehots[b].shape[0]:
            raise ValueError(f"row {b}: {real.numel()} tokens but {onehots[b].shape[0]} section labels")
        last = int(real[-1])
        onehot = torch.from_numpy(onehots[b])                            # (n_tokens_b, n_sections)
        for layer, att in enumerate(attentions):
            weights = att[b, :, last, :].float().cpu()                  # (heads, seq)
            out[b, layer] = (weights[:, real] @ onehot).numpy()          # (heads, n_sections)
    return out


class Reader:
    """Forward passes with attention weights, optionally steered, over a fixed list of tasks."""

    def __init__(self, cfg: Config, task_ids: list[int], progress: bool):
        self.cfg = cfg
        self.loaded = load_model(cfg.model)
        impl = getattr(self.loaded.model.config, "_attn_implementation", None)
        if impl != "eager":
            raise InputError(f"attention weights need eager attention, the model runs {impl!r}: set "
                             "model.attn_implementation=eager (SDPA and flash attention return no weights)")
        by_id = {t.task_id: t for t in benchmarks.load_tasks(cfg.data.dataset, cfg.data.source)}
        self.task_ids = task_ids
        self.prompts, self.onehots = {}, {}
        for t in task_ids:
            prompt, spans = task_sections(by_id[t], cfg)
            self.prompts[t] = prompt
            self.onehots[t] = encode_sections(self.loaded.tokenizer, prompt, spans)
        self.bar = tqdm(total=0, desc="attention", unit="prompt", disable=not progress, dynamic_ncols=True)

    def masses(self, steering: dict[str, Any] | None) -> np.ndarray:
        """(n_tasks, n_layers, n_heads, n_sections) in ``task_ids`` order; ``steering`` = {layer, vector, alpha,
        site, positions} or None."""
        model, tok, size = self.loaded.model, self.loaded.tokenizer, self.cfg.attention.batch_size
        self.bar.total += len(self.task_ids)
        out = []
        for i in range(0, len(self.task_ids), size):
            ids = self.task_ids[i:i + size]
            enc = tok([self.prompts[t] for t in ids], return_tensors="pt", padding=True).to(self.loaded.device)
            with torch.inference_mode():
                if steering is None:
                    res = model(**enc, output_attentions=True, use_cache=False)
                else:
                    with SteeringHook(model, steering["layer"], steering["vector"], steering["alpha"],
                                      site=steering["site"], positions=steering["positions"]):
                        res = model(**enc, output_attentions=True, use_cache=False)
            if not res.attentions or res.attentions[0] is None:
                raise InputError("the model returned no attention weights; use model.attn_implementation=eager")
            out.append(last_token_masses(res.attentions, enc["attention_mask"], [self.onehots[t] for t in ids]))
            self.bar.update(len(ids))
        return np.concatenate(out)

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------- statistics

def summarize(masses: np.ndarray) -> dict[str, Any]:
    """Means over tasks: overall (layers and heads averaged), per layer (heads averaged), per layer and head."""
    per_head = masses.mean(axis=0)                                       # (L, H, S)
    return {"overall": dict(zip(SECTIONS, per_head.mean(axis=(0, 1)).tolist())),
            "per_layer": {s: per_head.mean(axis=1)[:, k].tolist() for k, s in enumerate(SECTIONS)},
            "per_head": {s: per_head[:, :, k].tolist() for k, s in enumerate(SECTIONS)}}


def differences(steered: np.ndarray, baseline: np.ndarray, n_resamples: int, seed: int, level: float
                ) -> dict[str, Any]:
    """Steered minus baseline (paired by task) with task-bootstrap percentile intervals: overall, per layer and
    per layer and head, for every section. Every row is resampled with the same task draws."""
    diff = steered - baseline                                             # (n, L, H, S)
    n, L, H, S = diff.shape
    rows = np.concatenate([diff.mean(axis=(1, 2)).T,                       # (S, n)
                           diff.mean(axis=2).transpose(1, 2, 0).reshape(L * S, n),
                           diff.transpose(1, 2, 3, 0).reshape(L * H * S, n)]).astype(np.float64)
    means = bootstrap_means_batch(rows, n_resamples, np.random.default_rng(seed))
    lo, hi = percentile_interval(means, level)
    est = rows.mean(axis=1)

    def cell(i: int) -> dict[str, Any]:
        return {"estimate": float(est[i]), "ci": [float(lo[i]), float(hi[i])]}

    layer0, head0 = S, S + L * S
    return {"n": n,
            "overall": {s: cell(k) for k, s in enumerate(SECTIONS)},
            "per_layer": {s: [cell(layer0 + layer * S + k) for layer in range(L)] for k, s in enumerate(SECTIONS)},
            "per_head": {s: {"estimate": est[head0 + k::S][:L * H].reshape(L, H).tolist(),
                             "low": lo[head0 + k::S][:L * H].reshape(L, H).tolist(),
                             "high": hi[head0 + k::S][:L * H].reshape(L, H).tolist()} for k, s in enumerate(SECTIONS)}}


# --------------------------------------------------------------------------- stage

def steering_conditions(cfg: Config, run: RunDir, d_model: int) -> dict[str, dict[str, Any]]:
    """Per direction the steering stage's target: layer, its vector (as steered), absolute alpha, site, positions."""
    results = read_steering_results(SteeringPaths.of(run))
    if results.get("design", {}).get("target", "latent") != "latent":
        raise InputError(f"the steering stage steered steering.target={results['design']['target']!r}, not the chosen "
                         f"latents; rerun `pva-sae steer --set steering.target=latent` first")
    release = read_analysis_summary(AnalysisPaths.of(run))["release"]
    out = {}
    for direction in DIRECTIONS:
        t = results["directions"][direction]["target"]
        sae = load_layer_sae(cfg, release, int(t["layer"]), d_model)
        vector = (sae.unit_direction(int(t["latent"])) if t["normalize"] == "unit" else sae.W_dec[int(t["latent"])])
        out[direction] = {"layer": int(t["layer"]), "latent": int(t["latent"]), "label": t["label"],
                          "vector": vector.float().cpu(), "alpha": float(t["alpha_abs"]),
                          "site": cfg.steering.site or cfg.analysis.site, "positions": t["positions"]}
        # attention of layers before the steered residual cannot change (at the last layer's output: none can)
        out[direction]["first_layer_affected"] = out[direction]["layer"] + (out[direction]["site"] == "resid_post")
    return out


def attention(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Run the stage; returns the results written to ``attention/results.json``."""
    started = time.perf_counter()
    run = RunDir.at(cfg.output.run_dir)
    paths = AttentionPaths.of(run)
    for stage in ("build", "analyze", "validate", "steer"):
        if not run.is_done(stage):
            raise MissingInputError(f"{run.root} has no finished {stage} stage; run `pva-sae {stage} --run-dir "
                                    f"{run.root}` first")
    check_run_config(run, STAGE, cfg.to_dict(), UPSTREAM_FIELDS)
    check_run_config(run, STAGE, cfg.to_dict(), SAE_FIELDS, against=AnalysisPaths.of(run).config)
    check_run_config(run, STAGE, cfg.to_dict(), ("steering",), against=SteeringPaths.of(run).config)
    digests = check_chain(run, "steer")
    check_upstream(run, STAGE, "steer", {"results": file_digest(SteeringPaths.of(run).results)})
    paths.root.mkdir(parents=True, exist_ok=True)
    setup_logging(run.log_file(STAGE))
    atomic_write_json(paths.config, cfg.to_dict())
    a = cfg.attention
    records = {r["task_id"] for r in load_records(run.root)}
    task_ids = seeded_subset([t for t in read_splits(run)["validation"] if t in records], a.max_tasks, a.seed)
    if not task_ids:
        raise InputError(f"{run.root} has no validation task with a record; nothing to read")
    reader = Reader(cfg, task_ids, progress)
    try:
        conditions = steering_conditions(cfg, run, reader.loaded.d_model)
        masses = {"baseline": reader.masses(None)}
        for direction, cond in conditions.items():
            masses[f"steer_{direction}"] = reader.masses(cond)
    finally:
        reader.close()
    save_attention_masses(paths, {k: torch.from_numpy(v) for k, v in masses.items()}, task_ids, SECTIONS)
    base = masses["baseline"]
    results: dict[str, Any] = {
        "sections": list(SECTIONS), "n_tasks": len(task_ids), "n_layers": base.shape[1], "n_heads": base.shape[2],
        "steering": {d: {k: v for k, v in c.items() if k != "vector"} for d, c in conditions.items()},
        "sums_to_one": float(np.abs(base.sum(axis=-1) - 1).max()),
        "means": {name: summarize(m) for name, m in masses.items()},
        "differences": {d: differences(masses[f"steer_{d}"], base, a.bootstrap_resamples, a.seed, a.ci_level)
                        for d in conditions},
        "reference": REFERENCE, "bootstrap_resamples": a.bootstrap_resamples, "level": a.ci_level,
    }
    if a.plots:
        results["plots"] = [str(p.relative_to(run.root)) for p in plot_attention(paths.plots, results)]
    results["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(paths.results, results)
    run.mark_done(STAGE, {"inputs": {"records": digests.get("records"),
                                     "steering_results": file_digest(SteeringPaths.of(run).results),
                                     "config": sections_digest(cfg.to_dict(), ("attention",))},
                          "outputs": {"results": file_digest(paths.results), "masses": file_digest(paths.masses)}})
    return results


# --------------------------------------------------------------------------- plots

def plot_attention(folder, results: dict[str, Any]) -> list:
    """sections.png: mean mass per section and condition (layers and heads averaged), with the difference's
    interval; tests_by_head.png: steered-minus-baseline mass on the tests section per layer and head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = list(results["means"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(names)
    x = np.arange(len(SECTIONS))
    for i, name in enumerate(names):
        means = [results["means"][name]["overall"][s] for s in SECTIONS]
        err = None
        if name != "baseline":
            diff = results["differences"][name.removeprefix("steer_")]["overall"]
            err = [[diff[s]["estimate"] - diff[s]["ci"][0] for s in SECTIONS],
                   [diff[s]["ci"][1] - diff[s]["estimate"] for s in SECTIONS]]
        ax.bar(x + i * width, means, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, SECTIONS)
    ax.set_ylabel("attention mass from the last prompt token")
    ax.legend(fontsize=8)
    ax.set_title("error bars: task-bootstrap interval of steered - baseline")
    fig.tight_layout()
    paths = [folder / "sections.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    directions = list(results["differences"])
    fig, axes = plt.subplots(1, len(directions), figsize=(4.5 * len(directions) + 1, 3.8), squeeze=False)
    grids = [np.asarray(results["differences"][d]["per_head"]["tests"]["estimate"]) for d in directions]
    bound = max(float(np.abs(g).max()) for g in grids) or 1e-9
    for ax, d, grid in zip(axes[0], directions, grids):
        im = ax.imshow(grid.T, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", origin="lower")
        ax.set_xticks(range(grid.shape[0]))
        ax.set_yticks(range(grid.shape[1]))
        ax.set_xlabel("layer")
        ax.set_ylabel("head")
        ax.set_title(f"steer {d} - baseline", fontsize=10)
    fig.suptitle("attention mass on the tests section", fontsize=11)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    paths.append(folder / "tests_by_head.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
