"""`pva-sae train-saes`: JumpReLU SAEs for a model that has no published ones, from a text corpus.

The command loads a model the way every stage does (a registry key, a hub id or a local directory),
tokenizes a corpus (the same readers as the general filter: .jsonl with a ``text`` field, .parquet with a
``text`` column, .txt paragraphs, or 'packaged'), trains one SAE per layer on the residual stream at
``resid_post`` with :func:`pva_sae.sae.train.train_model_saes` and writes ``<out>/layer_{L}/params.npz``
plus ``stats.json``: the layout the ``local`` release reads, so the analysis runs on them with
``--set analysis.sae_release=local --set analysis.sae_local_dir=<out>``. ``<out>/training.json`` records
the model, its revision, the corpus hash, the layers and every hyperparameter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pva_sae.config import ModelConfig
from pva_sae.default.corpus import load_general_corpus
from pva_sae.errors import InputError
from pva_sae.model.registry import load_model
from pva_sae.rundir.atomic import atomic_write_json
from pva_sae.sae.train import SAETrainConfig, train_model_saes


def tokenize_corpus(tokenizer: Any, docs: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each document, BOS first, cut at ``max_tokens``; documents with no tokens are dropped."""
    bos = tokenizer.bos_token_id
    out = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"][: max_tokens - (bos is not None)]
        if ids:
            out.append(([bos] if bos is not None else []) + list(ids))
    return out


def train_saes_for_model(model: str, corpus: str, layers: Sequence[int], out_dir: str | Path, *,
                         sae: SAETrainConfig | None = None, max_docs: int = 10_000, max_tokens: int = 128,
                         device: str = "auto", log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train and save one SAE per layer; returns the summary written to ``<out_dir>/training.json``."""
    out = Path(out_dir)
    if any(out.glob("layer_*/params.npz")):
        raise InputError(f"{out} already holds SAEs (layer_*/params.npz); choose an empty --out directory "
                         f"or remove the old ones first")
    loaded = load_model(ModelConfig(name=model, device=device, dtype="float32"))
    bad = [layer for layer in layers if not 0 <= layer < loaded.n_layers]
    if bad:
        raise InputError(f"layers {bad} do not exist in {model} ({loaded.n_layers} layers: 0..{loaded.n_layers - 1})")
    docs = load_general_corpus(corpus)[:max_docs]
    sequences = tokenize_corpus(loaded.tokenizer, docs, max_tokens)
    if len(sequences) < 20:
        raise InputError(f"corpus {corpus} gave {len(sequences)} non-empty documents; SAEs need a few thousand "
                         f"(pass a larger --corpus)")
    cfg = sae or SAETrainConfig()
    started = time.perf_counter()
    pad = loaded.tokenizer.pad_token_id or 0
    results = train_model_saes(loaded.model, sequences, list(layers), out, cfg, pad_id=pad, log=log)
    summary = {
        "model": model, "revision": loaded.revision, "site": "resid_post", "layers": list(layers),
        "corpus": str(corpus), "n_documents": len(sequences), "max_tokens": max_tokens,
        "corpus_sha256": hashlib.sha256(json.dumps(sequences).encode()).hexdigest(),
        "sae": dataclasses.asdict(cfg), "seconds": round(time.perf_counter() - started, 1),
        "quality": {str(layer): {k: v for k, v in r.stats.items() if isinstance(v, (int, float))}
                    for layer, r in results.items()},
    }
    atomic_write_json(out / "training.json", summary)
    return summary

