"""The dataset repository ``NeelNanda/pile-10k`` and the prepared copy ``datasets`` reads offline.

The hub repository holds a README (its ``configs`` block points at the shard) and one Parquet shard
``data/train-00000-of-00001.parquet`` with the columns of the real one (``text``, ``meta`` with
``pile_set_name``): 10,000 documents built from text the package ships (the general corpus of the
embedded default and MBPP's descriptions and reference code), the shipped documents first, then
seeded pairings of them until there are enough. With ``HF_HUB_OFFLINE=1``, ``datasets.load_dataset``
never opens the hub cache: it reads the prepared Arrow copy under ``HF_DATASETS_CACHE``
(``NeelNanda___pile-10k/default/0.0.0/<commit>/``) that an online ``load_dataset`` leaves behind, which
:func:`prepare_datasets_cache` writes with the same Parquet builder ``datasets`` uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pva_sae.default.corpus import load_general_corpus
from pva_sae.default.hub_fixture.cache import RepoWriter
from pva_sae.default.tiny import PACKAGED_MBPP

REPO_ID = "NeelNanda/pile-10k"
SHARD = "data/train-00000-of-00001.parquet"
N_DOCS = 10_000

README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
dataset_info:
  features:
  - name: text
    dtype: string
  - name: meta
    struct:
    - name: pile_set_name
      dtype: string
  splits:
  - name: train
    num_examples: {n}
---
The first {n} documents of a general-text corpus: column `text`, and `meta.pile_set_name` naming each
document's source.
"""


def shipped_documents() -> list[tuple[str, str]]:
    """(text, source name) of every shipped document: the general corpus, then MBPP descriptions + code."""
    docs = [(text, "Github") for text in load_general_corpus("packaged")]
    with open(PACKAGED_MBPP, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                docs.append((row["text"] + "\n\n" + row["code"].replace("\r\n", "\n"), "StackExchange"))
    return docs


def documents(n_docs: int, seed: int) -> list[tuple[str, str]]:
    """``n_docs`` documents: the shipped ones, then seeded pairs of them joined by a blank line."""
    base = shipped_documents()
    out = base[:n_docs]
    rng = np.random.default_rng(seed)
    while len(out) < n_docs:
        i, j = rng.choice(len(base), size=2, replace=False)
        out.append((base[i][0] + "\n\n" + base[j][0], base[i][1]))
    return out


def write_dataset_repo(writer: RepoWriter, n_docs: int, seed: int) -> None:
    docs = documents(n_docs, seed)
    table = pa.table({"text": [t for t, _ in docs], "meta": [{"pile_set_name": s} for _, s in docs]})
    pq.write_table(table, writer.path_for(SHARD))
    writer.add_bytes("README.md", README.format(n=n_docs).encode())


def prepare_datasets_cache(datasets_cache: Path, shard: Path, commit: str) -> Path | None:
    """The Arrow copy of the shard under ``datasets_cache``, as ``load_dataset`` prepares it online.

    Returns its directory, or None when the ``datasets`` package is not installed (the hub cache is
    then complete, and ``analysis.general_corpus`` can name the shard file directly).
    """
    try:
        from datasets.packaged_modules.parquet.parquet import Parquet
    except ImportError:
        return None
    name = REPO_ID.split("/")[1]
    builder = Parquet(cache_dir=str(datasets_cache), dataset_name=name, hash=commit, config_name="default",
                      data_files={"train": str(shard)})
    builder.download_and_prepare()
    # Online, the builder is named after the repository and its config after the README's: rename the
    # local builder's folders (<name>/default-<data-files hash>) to that layout.
    built = Path(builder.cache_dir)
    target = datasets_cache / f"{REPO_ID.split('/')[0]}___{name}" / "default" / built.parent.name / built.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    built.rename(target)
    shutil.rmtree(datasets_cache / name)
    for lock in [*datasets_cache.glob("*.lock"), *target.parent.glob("*.lock")]:
        lock.unlink()
    return target
