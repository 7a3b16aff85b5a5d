"""Readers and writers of run artifacts: records, labels, prompts, splits, activations, scores, choices.

A stage that needs another stage's output reads it here, never through the other stage's module;
paths come from :mod:`pva_sae.rundir.paths`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy_file
from safetensors.torch import save

from pva_sae.config import SITES
from pva_sae.errors import InputError, MissingInputError
from pva_sae.rundir.atomic import atomic_write_bytes, atomic_write_json, read_json
from pva_sae.rundir.paths import (
    AblationPaths,
    AnalysisPaths,
    AttentionPaths,
    RunDir,
    SteeringPaths,
    ValidationPaths,
)
from pva_sae.sae.neuronpedia import check_neuronpedia_list

BUILD_STAGE = "build"


def atomic_write_parquet(path: Path, rows: list[dict[str, Any]] | dict[str, list[Any]]) -> None:
    """A Parquet file from a list of row dicts or a dict of columns, written atomically."""

    buf = io.BytesIO()
    pq.write_table(pa.table(rows) if isinstance(rows, dict) else pa.Table.from_pylist(rows), buf)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- records (build stage)

def load_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of a finished build (JSON when present, else Parquet), sorted as written."""
    run = RunDir.at(run_dir)
    if not run.is_done(BUILD_STAGE):
        raise MissingInputError(f"{run.root} has no finished build stage; run `pva-sae build --run-dir {run.root}` first")
    return read_saved_records(run)


def read_saved_records(run: RunDir) -> list[dict[str, Any]]:
    if run.dataset_json.is_file():
        return read_json(run.dataset_json)["records"]
    return pq.read_table(run.dataset_parquet).to_pylist()


def save_dataset(run: RunDir, records: list[dict[str, Any]], metadata: dict[str, Any], fmt: str) -> None:
    """The dataset as JSON and/or Parquet (``output.save_format``), with its metadata file beside it."""
    if fmt in ("json", "both"):
        atomic_write_json(run.dataset_json, {"metadata": metadata, "records": records})
    if fmt in ("parquet", "both"):
        atomic_write_parquet(run.dataset_parquet, records)
    atomic_write_json(run.dataset_metadata, metadata)


def task_labels(records: list[dict[str, Any]]) -> dict[int, bool]:
    """One label per task: its first sample (sample_index 0) passed all tests."""
    return {r["task_id"]: bool(r["passed"]) for r in records if r["sample_index"] == 0}


def task_prompts(records: list[dict[str, Any]]) -> dict[int, str]:
    return {r["task_id"]: r["prompt"] for r in records if r["sample_index"] == 0}


def write_splits(run: RunDir, seed: int, fractions, splits: dict[str, list[int]], summary: dict[str, Any]) -> None:
    atomic_write_json(run.splits, {"seed": seed, "fractions": fractions, "splits": splits, "summary": summary})


def read_splits(run: RunDir) -> dict[str, list[int]]:
    """{split name: task ids} as the build stage wrote them."""
    return read_json(run.splits)["splits"]


def split_of(run: RunDir) -> dict[int, str]:
    """{task id: split name}."""
    return {t: name for name, ids in read_splits(run).items() for t in ids}


# --------------------------------------------------------------------------- analysis stage

def save_scores(paths: AnalysisPaths, scores: dict[int, dict[str, Any]]) -> None:
    """Per-latent scores {layer: {name: (d_sae,) tensor}} as one safetensors file (keys ``name/layer_L``)."""
    flat = {f"{name}/layer_{layer}": t.contiguous() for layer, per in scores.items() for name, t in per.items()}
    atomic_write_bytes(paths.scores, save(flat))


def load_scores(paths: AnalysisPaths) -> dict[int, dict[str, Any]]:
    """The analysis stage's per-latent scores as numpy arrays: {layer: {name: (d_sae,) array}}."""
    out: dict[int, dict[str, Any]] = {}
    for key, values in load_numpy_file(str(paths.scores)).items():
        name, layer = key.split("/layer_")
        out.setdefault(int(layer), {})[name] = values
    return out


def save_ranked(paths: AnalysisPaths, table: list[dict[str, Any]]) -> None:
    atomic_write_parquet(paths.ranked_parquet, table)
    atomic_write_json(paths.ranked_json, table)


def load_ranked(paths: AnalysisPaths) -> list[dict[str, Any]]:
    return read_json(paths.ranked_json)


def read_analysis_summary(paths: AnalysisPaths) -> dict[str, Any]:
    return read_json(paths.summary)


def write_neuronpedia_list(paths: AnalysisPaths, body: dict[str, Any]) -> None:
    """The top latents as a Neuronpedia list body, checked before it is written."""
    check_neuronpedia_list(body)
    atomic_write_json(paths.neuronpedia, body)


def read_neuronpedia_list(paths: AnalysisPaths) -> dict[str, Any]:
    body = read_json(paths.neuronpedia)
    check_neuronpedia_list(body)
    return body


# --------------------------------------------------------------------------- validation stage

def write_choices(paths: ValidationPaths, choices: dict[str, Any]) -> None:
    atomic_write_json(paths.choices, choices)


def read_choices(paths: ValidationPaths) -> dict[str, Any]:
    return read_json(paths.choices)


def write_predictor_weights(paths: ValidationPaths, weights: dict[str, dict[str, Any]]) -> None:
    """``{"<direction>/<name>/L<layer>": {"weights": [d_model floats], "bias": float}}`` of the fitted baselines."""
    atomic_write_json(paths.weights, weights)


def read_predictor_weights(paths: ValidationPaths) -> dict[str, dict[str, Any]]:
    if not paths.weights.is_file():
        raise MissingInputError(f"{paths.weights} does not exist: the validation stage that wrote {paths.choices} "
                                f"predates frozen weights; rerun `pva-sae validate --run-dir {paths.root.parent}`")
    return read_json(paths.weights)


def read_validation_results(paths: ValidationPaths) -> dict[str, Any]:
    return read_json(paths.results)


def write_validation_scores(paths: ValidationPaths, columns: dict[str, list[Any]]) -> None:
    atomic_write_parquet(paths.predictions, columns)


def read_validation_scores(paths: ValidationPaths) -> dict[str, list[Any]]:
    """Per validation task: label, difficulty and every predictor's score, as columns."""
    return pq.read_table(paths.predictions).to_pydict()


# --------------------------------------------------------------------------- steering stage

def read_condition(paths: SteeringPaths, key: str) -> dict[str, Any] | None:
    """A finished steering condition (its per-task outcomes), or None when it has not run."""
    path = paths.condition(key)
    return read_json(path) if path.is_file() else None


def write_condition(paths: SteeringPaths, key: str, payload: dict[str, Any]) -> None:
    # One line: a study writes about 150 of these (389 outcomes each), and an indented dump goes through json's
    # pure-Python encoder (about 5 s of a full-size steering stage on the GPU host), the compact one through its C one.
    atomic_write_json(paths.condition(key), payload, indent=None)


def write_steered_tasks(paths: SteeringPaths, rows: list[dict[str, Any]]) -> None:
    atomic_write_parquet(paths.tasks, rows)


def read_steered_tasks(paths: SteeringPaths) -> list[dict[str, Any]]:
    """The rows :func:`write_steered_tasks` wrote (one per task and steering condition)."""
    return pq.read_table(paths.tasks).to_pylist()


def read_steering_results(paths: SteeringPaths) -> dict[str, Any]:
    return read_json(paths.results)


# --------------------------------------------------------------------------- ablation and attention stages

def read_ablation_condition(paths: AblationPaths, key: str) -> dict[str, Any] | None:
    """A finished ablation condition (its per-task outcomes), or None when it has not run."""
    path = paths.condition(key)
    return read_json(path) if path.is_file() else None


def write_ablation_condition(paths: AblationPaths, key: str, payload: dict[str, Any]) -> None:
    atomic_write_json(paths.condition(key), payload)


def write_ablated_tasks(paths: AblationPaths, rows: list[dict[str, Any]]) -> None:
    atomic_write_parquet(paths.tasks, rows)


def read_ablation_results(paths: AblationPaths) -> dict[str, Any]:
    return read_json(paths.results)


def save_attention_masses(paths: AttentionPaths, masses: dict[str, "torch.Tensor"], task_ids: Sequence[int],
                          sections: Sequence[str]) -> None:
    """Per condition a float32 (n_tasks, n_layers, n_heads, n_sections) tensor of attention mass."""
    tensors = {name: m.float().contiguous() for name, m in masses.items()}
    tensors["task_ids"] = torch.tensor(list(task_ids), dtype=torch.int64)
    atomic_write_bytes(paths.masses, save(tensors, metadata={"sections": json.dumps(list(sections))}))


def load_attention_masses(paths: AttentionPaths) -> tuple[dict[str, "torch.Tensor"], list[int], list[str]]:
    """(masses by condition, task ids, section names) as written by :func:`save_attention_masses`."""
    with safe_open(str(paths.masses), framework="pt") as f:
        sections = json.loads(f.metadata()["sections"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    task_ids = tensors.pop("task_ids").tolist()
    return tensors, task_ids, sections


def read_attention_results(paths: AttentionPaths) -> dict[str, Any]:
    return read_json(paths.results)


# --------------------------------------------------------------------------- activations

FORMAT = "pva-sae/activations"
FORMAT_VERSION = "1"


def save_activations(path: str | Path, acts: "torch.Tensor", task_ids: Sequence[int], layers: Sequence[int],
                     site: str, meta: dict[str, Any] | None = None) -> Path:
    """Write activations (n_tasks, n_layers, d_model) and their task ids to one safetensors file.

    Layers, site and ``meta`` (model id, revision, timings ...) go into the safetensors metadata as
    JSON strings, so the file alone says what it holds. Written atomically (temp file + rename).
    """

    if site not in SITES:
        raise InputError(f"unknown site {site!r}: use one of {SITES}")
    task_ids, layers = [int(t) for t in task_ids], [int(layer) for layer in layers]
    _check_shapes(tuple(acts.shape), len(task_ids), len(layers), where="save_activations")
    tensors = {"acts": acts.detach().to("cpu", torch.float32).contiguous(),
               "task_ids": torch.tensor(task_ids, dtype=torch.int64)}
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "layers": json.dumps(layers), "site": site,
                "meta": json.dumps(meta or {}, default=str)}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def load_activations(path: str | Path) -> tuple["torch.Tensor", list[int], list[int], str, dict[str, Any]]:
    """Read a file written by :func:`save_activations`: (acts, task_ids, layers, site, meta).

    Every inconsistency (not a safetensors file, missing tensors or metadata, shapes that disagree)
    raises ``ValueError`` naming the file; the fix is to delete it and capture again.
    """

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"no activations file at {path}; run the capture first")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys & {"acts", "task_ids"}}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise InputError(f"{path} is not a readable safetensors file ({exc}); delete it and capture again") from exc
    if metadata.get("format") != FORMAT or not {"acts", "task_ids"} <= keys:
        raise InputError(f"{path} is not a pva-sae activations file (format {metadata.get('format')!r}, tensors "
                         f"{sorted(keys)}); delete it and capture again")
    try:
        layers, site, meta = json.loads(metadata["layers"]), metadata["site"], json.loads(metadata["meta"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} has incomplete metadata ({exc}); delete it and capture again") from exc
    acts, task_ids = tensors["acts"], tensors["task_ids"]
    if task_ids.ndim != 1:
        raise InputError(f"{path}: task_ids has shape {tuple(task_ids.shape)}, expected (n_tasks,); "
                         f"delete it and capture again")
    _check_shapes(tuple(acts.shape), task_ids.shape[0], len(layers), where=str(path))
    return acts, task_ids.tolist(), [int(layer) for layer in layers], site, meta


def _check_shapes(shape: tuple[int, ...], n_tasks: int, n_layers: int, where: str) -> None:
    if len(shape) != 3 or shape[0] != n_tasks or shape[1] != n_layers:
        raise InputError(f"{where}: activations have shape {shape}, expected ({n_tasks}, {n_layers}, d_model) for "
                         f"{n_tasks} task ids and {n_layers} layers")
