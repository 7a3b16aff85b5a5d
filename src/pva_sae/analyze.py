"""Stage 2, SAE analysis: which SAE latents separate correct from incorrect tasks?

Input: a finished build in the run directory. For every built task, the residual stream at the last
prompt token is captured at every analysed layer (one forward pass per batch) and saved; the
SAE-analysis split alone is then encoded with each layer's SAE and scored (firing frequencies,
separation scores and Welch t in both directions). Latents that fire on >= 2% of a general corpus are
excluded before ranking. The tuning and validation splits are captured but not read here.

Outputs under ``<run>/analysis/`` (paths in ``AnalysisPaths``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .logs import setup_logging
from .rundir import RunDir, atomic_write_json

log = logging.getLogger(__name__)

STAGE = "analyze"
NEURONPEDIA = "https://www.neuronpedia.org/{model}/{layer}-gemmascope-res-{width}/{index}"


@dataclass(frozen=True)
class AnalysisPaths:
    root: Path

    @classmethod
    def of(cls, run: RunDir) -> "AnalysisPaths":
        return cls(run.root / "analysis")

    @property
    def activations(self) -> Path:
        return self.root / "activations.safetensors"

    @property
    def scores(self) -> Path:
        return self.root / "scores.safetensors"

    @property
    def ranked_parquet(self) -> Path:
        return self.root / "ranked_latents.parquet"

    @property
    def ranked_json(self) -> Path:
        return self.root / "ranked_latents.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def task_labels(records: list[dict[str, Any]]) -> dict[int, bool]:
    """One label per task: its first sample (sample_index 0) passed all tests."""
    return {r["task_id"]: bool(r["passed"]) for r in records if r["sample_index"] == 0}


def task_prompts(records: list[dict[str, Any]]) -> dict[int, str]:
    return {r["task_id"]: r["prompt"] for r in records if r["sample_index"] == 0}


def resolve_release(cfg: Config, model_key: str) -> str:
    from .sae import list_releases

    if cfg.analysis.sae_release != "auto":
        return cfg.analysis.sae_release
    matches = [r["key"] for r in list_releases() if model_key in r.get("models", [r.get("model")])]
    if not matches:
        raise ValueError(f"no SAE release is registered for model {model_key!r}; pass --set analysis.sae_release=... "
                         f"(one of: {', '.join(r['key'] for r in list_releases())})")
    return matches[0]


LOCAL_RELEASE = "local"
LOCAL_TEMPLATE = "layer_{layer}/params.npz"


def load_layer_sae(cfg: Config, release: str, layer: int, d_model: int):
    """A registered release, or 'local': GemmaScope-format files at <sae_local_dir>/layer_{L}/params.npz."""
    from .sae import load_sae, load_sae_file

    if release == LOCAL_RELEASE:
        if not cfg.analysis.sae_local_dir:
            raise ValueError("analysis.sae_release='local' needs analysis.sae_local_dir (a directory holding "
                             f"{LOCAL_TEMPLATE})")
        path = Path(cfg.analysis.sae_local_dir).expanduser() / LOCAL_TEMPLATE.format(layer=layer)
        if not path.is_file():
            raise FileNotFoundError(f"no SAE for layer {layer}: {path} is missing (expected {LOCAL_TEMPLATE} under "
                                    "analysis.sae_local_dir, or restrict analysis.layers)")
        sae = load_sae_file(path, expected_d_model=d_model)
        sae.meta.update({"release": LOCAL_RELEASE, "layer": layer, "canonical": False})
        return sae
    return load_sae(release, layer, width=cfg.analysis.sae_width, l0=cfg.analysis.sae_l0,
                    local_dir=cfg.analysis.sae_local_dir, expected_d_model=d_model,
                    local_files_only=cfg.model.local_files_only)


def resolve_general_corpus(cfg: Config, model_entry: dict[str, Any] | None) -> str:
    if cfg.analysis.general_corpus != "auto":
        return cfg.analysis.general_corpus
    if model_entry and model_entry.get("general_corpus"):
        return model_entry["general_corpus"]
    return "pile-10k"


def capture_all(cfg: Config, loaded, records, layers, paths: AnalysisPaths, progress: bool):
    """Residuals at the last prompt token for every built task (cached in the run directory)."""
    from .capture import capture_last_token, load_activations, save_activations

    prompts = task_prompts(records)
    task_ids = sorted(prompts)
    if paths.activations.is_file():
        acts, saved_ids, saved_layers, site, meta = load_activations(paths.activations)
        if list(saved_ids) == task_ids and list(saved_layers) == list(layers) and site == cfg.analysis.site:
            log.info("reusing captured activations %s", paths.activations)
            return acts, task_ids
    started = time.perf_counter()
    acts = capture_last_token(loaded.model, loaded.tokenizer, [prompts[t] for t in task_ids], layers=layers,
                              site=cfg.analysis.site, batch_size=cfg.analysis.batch_size, progress=progress,
                              max_batch_tokens=token_budget(cfg, loaded))
    save_activations(paths.activations, acts, task_ids, layers, cfg.analysis.site,
                     {"model": loaded.path_or_id, "revision": loaded.revision,
                      "seconds": f"{time.perf_counter() - started:.2f}"})
    return acts, task_ids


def token_budget(cfg: Config, loaded) -> int | None:
    from .build import batch_token_budget

    return batch_token_budget(cfg.generation.max_batch_tokens, loaded.device)


def analyze(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Run the stage; returns the summary written to ``analysis/summary.json``."""
    import torch

    from .build import load_records
    from .general import general_frequencies
    from .models import load_model, registry_entry
    from .ranking import rank_latents, score_layers

    run = RunDir.at(cfg.output.run_dir)
    records = load_records(str(run.root))
    paths = AnalysisPaths.of(run)
    paths.root.mkdir(parents=True, exist_ok=True)
    setup_logging(run.log_file(STAGE))
    atomic_write_json(paths.root / "config.json", cfg.to_dict())

    loaded = load_model(cfg.model)
    layers = list(cfg.analysis.layers) if cfg.analysis.layers is not None else list(range(loaded.n_layers))
    bad = [layer for layer in layers if not 0 <= layer < loaded.n_layers]
    if bad:
        raise ValueError(f"analysis.layers {bad} out of range: the model has layers 0..{loaded.n_layers - 1}")
    entry = registry_entry(cfg.model.name)
    release = resolve_release(cfg, entry["key"] if entry else cfg.model.name)
    saes = {layer: load_layer_sae(cfg, release, layer, loaded.d_model) for layer in layers}

    acts, task_ids = capture_all(cfg, loaded, records, layers, paths, progress)
    splits = _read_splits(run)
    labels = task_labels(records)
    sae_ids = [t for t in task_ids if t in set(splits["sae"])]
    if not sae_ids:
        raise ValueError("the build holds no task of the SAE-analysis split; build more tasks (data.start_idx/end_idx)")
    rows = [task_ids.index(t) for t in sae_ids]
    y = torch.tensor([labels[t] for t in sae_ids])
    if y.all() or not y.any():
        raise ValueError(f"the SAE-analysis split has only {'correct' if y.all() else 'incorrect'} tasks "
                         f"({len(sae_ids)} tasks): separation needs both classes")

    corpus = resolve_general_corpus(cfg, entry)
    general, general_info = general_frequencies(
        loaded, saes, corpus, n_docs=cfg.analysis.general_n_docs, seed=cfg.analysis.general_seed,
        site=cfg.analysis.site, batch_size=cfg.analysis.batch_size, max_tokens=cfg.analysis.general_max_tokens,
        cache_dir=cfg.analysis.cache_dir, progress=progress, max_batch_tokens=token_budget(cfg, loaded))
    scores = score_layers(saes, acts[rows], y, layers)
    table = rank_latents(scores, general, cfg.analysis.general_max_frequency, cfg.analysis.top_k,
                         link=_link_fn(release, saes))
    _save_outputs(paths, scores, table)
    if cfg.analysis.plots:
        from .plots import plot_analysis

        plot_analysis(paths.plots, scores, table, saes, acts[rows], y, layers)
    summary = {
        "release": release, "layers": layers, "site": cfg.analysis.site,
        "n_tasks": len(sae_ids), "n_correct": int(y.sum()), "n_incorrect": int((~y).sum()),
        "general": general_info, "general_max_frequency": cfg.analysis.general_max_frequency,
        "excluded_general": {str(layer): int((general[layer] >= cfg.analysis.general_max_frequency).sum())
                             for layer in layers},
        "saes": {str(layer): saes[layer].meta for layer in layers},
        "top": {d: [r for r in table if r["direction"] == d and r["scope"] == "overall"
                    and r["metric"] == "separation"][:5] for d in ("correct", "incorrect")},
        "top_by_t": {d: [r for r in table if r["direction"] == d and r["scope"] == "overall"
                         and r["metric"] == "t"][:5] for d in ("correct", "incorrect")},
    }
    atomic_write_json(paths.summary, summary)
    run.mark_done(STAGE, {"release": release, "n_tasks": len(sae_ids)})
    return summary


def _read_splits(run: RunDir) -> dict[str, list[int]]:
    from .rundir import read_json

    return read_json(run.splits)["splits"]


def _link_fn(release: str, saes):
    """Neuronpedia pages exist for canonical GemmaScope 2b/9b residual latents only."""
    models = {"gemma-scope-2b-pt-res": "gemma-2-2b", "gemma-scope-9b-pt-res": "gemma-2-9b"}
    if release not in models:
        return None

    def link(layer: int, index: int) -> str | None:
        meta = saes[layer].meta
        if not meta.get("canonical", True):
            return None
        return NEURONPEDIA.format(model=models[release], layer=layer, width=meta.get("width", "16k"), index=index)

    return link


def _save_outputs(paths: AnalysisPaths, scores, table) -> None:
    from safetensors.torch import save

    from .rundir import atomic_write_bytes, atomic_write_parquet

    flat = {f"{name}/layer_{layer}": t.contiguous() for layer, per in scores.items() for name, t in per.items()}
    atomic_write_bytes(paths.scores, save(flat))
    atomic_write_parquet(paths.ranked_parquet, table)
    atomic_write_json(paths.ranked_json, table)
