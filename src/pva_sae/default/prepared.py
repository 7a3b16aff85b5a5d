"""The prepared directory (written by :func:`pva_sae.default.prep.prepare`), read back for training.

Kept apart from ``prep`` so that the ``train`` step, often on another machine, imports only what
training needs (torch, transformers, tokenizers, numpy, safetensors): preparing also needs the
MBPP loader's dependencies. Every file is checked against the sha256 recorded in ``prepare.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pva_sae.default.corpus import read_jsonl
from pva_sae.hashing import sha256_file
from pva_sae.rundir.atomic import read_json

PREP_FILES = ("tokens.npz", "tasks.jsonl", "general_corpus.jsonl", "train_corpus.jsonl")


@dataclass
class Prepared:
    """A prepared directory, read back."""

    path: Path
    info: dict[str, Any]        # prepare.json
    stream: np.ndarray          # (n,) uint16, training corpus, files joined with EOS
    file_offsets: np.ndarray    # (n_files + 1,)
    task_ids: list[int]
    memorized: np.ndarray       # (n_tasks,) bool
    docs: list[np.ndarray]      # per task: BOS + prompt + newline + solution + EOS
    prompt_lengths: np.ndarray  # (n_tasks,) with BOS
    tasks: list[dict[str, Any]]  # tasks.jsonl


def load_prepared(path: Path) -> Prepared:
    info = read_json(path / "prepare.json")
    for name, digest in info["files"].items():
        if sha256_file(path / name) != digest:
            raise SystemExit(f"ERROR: {path / name} does not match the sha256 recorded in prepare.json")
    with np.load(path / "tokens.npz") as z:
        arrays = {k: z[k] for k in z.files}
    offs = arrays["doc_offsets"]
    docs = [arrays["doc_tokens"][offs[i]:offs[i + 1]] for i in range(len(offs) - 1)]
    return Prepared(path=path, info=info, stream=arrays["train_stream"], file_offsets=arrays["train_file_offsets"],
                    task_ids=[int(i) for i in arrays["task_ids"]], memorized=arrays["memorized"], docs=docs,
                    prompt_lengths=arrays["prompt_lengths"], tasks=read_jsonl(path / "tasks.jsonl"))
