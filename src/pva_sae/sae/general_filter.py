"""General-language filter: how often each SAE latent fires on ordinary text.

Latents that fire on a large share of general documents track language in general, not code
correctness, and are excluded before ranking (Ferrando et al. 2024 use the same filter). For each
document one word position is drawn with a seeded generator; the document is cut right after that
word, so the position is the last token and the same last-token capture as for MBPP prompts applies,
at the same site, all layers in one forward pass per batch.

Frequencies are cached on disk, keyed by (model revision, SAE files, corpus hash, seed, settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from safetensors.torch import load_file, save_file

from pva_sae.config import Config
from pva_sae.default.corpus import load_general_corpus
from pva_sae.errors import InputError, MissingInputError
from pva_sae.model.capture import capture_last_token

log = logging.getLogger(__name__)

_WORD = re.compile(r"\S+")
PILE_10K = "NeelNanda/pile-10k"


def load_corpus(source: str, n_docs: int) -> tuple[list[str], str]:
    """Documents and a content hash. ``source``: 'pile-10k', 'packaged', or a local file."""
    if source == "pile-10k":
        docs = _load_pile(n_docs)
    else:

        docs = load_general_corpus(source)
    docs = [d for d in docs if _WORD.search(d)][:n_docs]
    if not docs:
        raise InputError(f"general corpus {source!r} has no non-empty documents; pass a corpus with text in it "
                         f"as analysis.general_corpus")
    digest = hashlib.sha256("\x00".join(docs).encode("utf-8")).hexdigest()
    return docs, digest


def _load_pile(n_docs: int) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise MissingInputError(f"analysis.general_corpus='pile-10k' needs the `datasets` package (pip install datasets) "
                         f"and network access to {PILE_10K}; or pass a local file as analysis.general_corpus") from None
    try:
        ds = datasets.load_dataset(PILE_10K, split="train")
    except Exception as exc:  # the hub client raises many types for "offline"
        raise MissingInputError(f"could not load {PILE_10K} ({type(exc).__name__}: {exc}); download it once with "
                                f"network access (`pva-sae download --model M` fetches it), or pass a local .jsonl/.parquet/.txt file as analysis.general_corpus") from None
    return [row["text"] for row in ds.select(range(min(n_docs, len(ds))))]


MAX_WORDS = 96  # the random word position is drawn among a document's first MAX_WORDS words


def word_prefixes(docs: Sequence[str], seed: int, max_words: int = MAX_WORDS) -> list[str]:
    """Each document cut after one seeded-random word among its first ``max_words`` words."""

    rng = np.random.default_rng(seed)
    out = []
    for doc in docs:
        ends = [m.end() for m, _ in zip(_WORD.finditer(doc), range(max_words))]
        out.append(doc[: ends[int(rng.integers(len(ends)))]])
    return out


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def general_frequencies(loaded, saes: dict[int, Any], source: str, *, n_docs: int, seed: int, site: str,
                        batch_size: int, max_tokens: int, cache_dir: str, progress: bool = True,
                        capture: Callable | None = None,
                        max_batch_tokens: int | None = None) -> tuple[dict[int, Any], dict[str, Any]]:
    """Per layer, the share of documents on which each latent fires: {layer: (d_sae,) float32 tensor}."""

    docs, corpus_hash = load_corpus(source, n_docs)
    # Everything the frequencies depend on: model weights and numerics, corpus, positions, site, SAE files.
    key_parts = {"model": loaded.path_or_id, "revision": loaded.revision, "dtype": str(loaded.dtype),
                 "device": getattr(loaded.device, "type", str(loaded.device)), "corpus": corpus_hash, "seed": seed,
                 "site": site, "max_tokens": max_tokens, "max_words": MAX_WORDS, "n_docs": len(docs),
                 "saes": {str(layer): sae.meta.get("sha256") for layer, sae in sorted(saes.items())}}
    path = Path(cache_dir).expanduser() / "general_freq" / f"{cache_key(key_parts)}.safetensors"
    info = {"source": source, "n_docs": len(docs), "corpus_sha256": corpus_hash, "seed": seed, "cache": str(path)}
    if path.is_file():
        cached = load_file(str(path))
        if all(f"layer_{layer}" in cached for layer in saes):
            log.info("general-corpus frequencies from cache %s", path)
            return {layer: cached[f"layer_{layer}"] for layer in saes}, {**info, "cached": True}
    layers = sorted(saes)
    texts = word_prefixes(docs, seed, MAX_WORDS)
    capture = capture or capture_last_token
    acts = capture(loaded.model, loaded.tokenizer, texts, layers=layers, site=site, batch_size=batch_size,
                   max_length=max_tokens, progress=progress,
                   max_batch_tokens=max_batch_tokens)  # (n_docs, n_layers, d_model)
    freqs = {}
    for i, layer in enumerate(layers):
        latents = saes[layer].encode(acts[:, i].to(saes[layer].W_enc.device))  # (n_docs, d_sae)
        freqs[layer] = (latents > 0).float().mean(0).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"layer_{layer}": f.contiguous() for layer, f in freqs.items()}, str(path),
              metadata={"key": json.dumps(key_parts)})
    return freqs, {**info, "cached": False}


def resolve_general_corpus(cfg: Config, model_entry: dict[str, Any] | None) -> str:
    if cfg.analysis.general_corpus != "auto":
        return cfg.analysis.general_corpus
    if model_entry and model_entry.get("general_corpus"):
        return model_entry["general_corpus"]
    return "pile-10k"
