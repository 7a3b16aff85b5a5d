"""Data preparation of the embedded default (the ``prepare`` command).

``prepare`` writes, on CPU, everything training needs into one small directory that can be carried
to another machine (whose Python may have a different standard library)::

    tokenizer/             byte-level BPE trained on the training corpus and the MBPP documents
    tokens.npz             the corpus as one token stream, the MBPP documents, prompt lengths, memorized flags
    tasks.jsonl            every MBPP task with its prompt and memorized flag
    general_corpus.jsonl   held-out standard-library documents (shipped with the assets)
    train_corpus.jsonl     the training corpus text
    prepare.json           recipe, versions, corpus and MBPP hashes, token counts, projected sizes, file hashes

The "memorized" tasks are a seeded half of MBPP chosen independently of any analysis split; the
LM is trained on their documents (prompt + newline + reference solution + EOS) and never sees the
others'. :func:`pva_sae.default.prepared.load_prepared` reads the directory back.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pva_sae.data.mbpp import Task, dataset_sha256, load_tasks
from pva_sae.data.prompts import build_prompt
from pva_sae.data.text import unix_newlines
from pva_sae.default import corpus as corpora
from pva_sae.default.prepared import PREP_FILES
from pva_sae.default.recipe import (
    Recipe,
    check_budget,
    count_parameters,
    projected_asset_bytes,
)
from pva_sae.default.records import directory_bytes, log, now, versions, write_json
from pva_sae.default.tiny import BOS_ID, EOS_ID, build_bpe_tokenizer
from pva_sae.hashing import sha256_file, sha256_json


def memorized_task_ids(task_ids: list[int], seed: int, fraction: float) -> list[int]:
    """A seeded ``fraction`` of the tasks, independent of any analysis split (own seed, own permutation)."""
    ids = sorted(task_ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in perm[: int(len(ids) * fraction)])


def mbpp_document(prompt: str, code: str) -> str:
    """The text a memorized task is trained on (EOS is appended as a token)."""
    return prompt + "\n" + unix_newlines(code).rstrip() + "\n"


def encode(tok: PreTrainedTokenizerBase, texts: list[str], tasks: list[Task], prompts: dict[int, str],
           docs: dict[int, str], memorized: set[int]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Token arrays of the corpus (files joined, each ending with EOS) and of the MBPP documents
    (BOS ... EOS), and the tasks whose prompt does not tokenize as a prefix of their document."""
    stream, offsets = [], [0]
    for text in texts:
        stream.extend(tok(text, add_special_tokens=False)["input_ids"] + [EOS_ID])
        offsets.append(len(stream))
    task_ids = [t.task_id for t in tasks]
    doc_ids = [tok(docs[i])["input_ids"] + [EOS_ID] for i in task_ids]
    prompt_ids = [tok(prompts[i])["input_ids"] for i in task_ids]
    if any(d[0] != BOS_ID or d.count(BOS_ID) != 1 for d in doc_ids):
        raise SystemExit("ERROR: MBPP documents must start with exactly one BOS")
    if len(tok) > np.iinfo(np.uint16).max:
        raise SystemExit("ERROR: vocabulary too large for uint16 token arrays")
    arrays = {
        "train_stream": np.asarray(stream, dtype=np.uint16),
        "train_file_offsets": np.asarray(offsets, dtype=np.int64),
        "task_ids": np.asarray(task_ids, dtype=np.int32),
        "memorized": np.asarray([i in memorized for i in task_ids], dtype=bool),
        "doc_tokens": np.asarray([x for d in doc_ids for x in d], dtype=np.uint16),
        "doc_offsets": np.cumsum([0] + [len(d) for d in doc_ids]).astype(np.int64),
        "prompt_lengths": np.asarray([len(p) for p in prompt_ids], dtype=np.int32),
    }
    bad_prefix = [i for i, d, p in zip(task_ids, doc_ids, prompt_ids) if d[: len(p)] != p]
    return arrays, bad_prefix


def token_counts(arrays: dict[str, np.ndarray], general_tokens: int, max_new_tokens: int) -> dict[str, int]:
    doc_lens = np.diff(arrays["doc_offsets"])
    code_lens = doc_lens - arrays["prompt_lengths"]
    return {
        "train_corpus": int(len(arrays["train_stream"])),
        "mbpp_memorized_documents": int(doc_lens[arrays["memorized"]].sum()),
        "mbpp_all_documents": int(doc_lens.sum()),
        "mbpp_all_prompts": int(arrays["prompt_lengths"].sum()),
        "mbpp_document_max": int(doc_lens.max()),
        "mbpp_solution_max": int(code_lens.max()),
        "mbpp_solutions_over_max_new_tokens": int((code_lens > max_new_tokens).sum()),
        "general_corpus": int(general_tokens),
    }


def prepare(out: Path, recipe: Recipe) -> dict[str, Any]:
    """Write the prepared directory ``out`` (see the module docstring); returns prepare.json's content."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tasks, memorized, prompts, docs = _mbpp(recipe)
    train, general_docs, general = _corpora(recipe)
    tok = build_bpe_tokenizer([f.text for f in train.files] + list(docs.values()), vocab_size=recipe.vocab_size,
                              min_frequency=recipe.min_frequency)
    tok.save_pretrained(out / "tokenizer")
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")  # encode with exactly what the pipeline will load
    vocab = len(tok)

    arrays, bad_prefix = encode(tok, [f.text for f in train.files], tasks, prompts, docs, memorized)
    general_tokens = sum(len(tok(d["text"], add_special_tokens=False)["input_ids"]) for d in general_docs)
    with open(out / "tokens.npz", "wb") as fh:
        np.savez_compressed(fh, **arrays)
    corpora.write_jsonl(({"task_id": t.task_id, "text": t.text, "code": t.code, "test_list": list(t.test_list),
                          "test_setup_code": t.test_setup_code, "complexity": t.complexity,
                          "difficulty": t.difficulty, "prompt": prompts[t.task_id],
                          "memorized": t.task_id in memorized} for t in tasks), out / "tasks.jsonl")
    general_sha = corpora.write_jsonl(general_docs, out / "general_corpus.jsonl")
    corpora.write_jsonl(({"id": f.path, "text": f.text} for f in train.files), out / "train_corpus.jsonl")

    projected = projected_asset_bytes(recipe, vocab, (out / "general_corpus.jsonl").stat().st_size,
                                      directory_bytes(out / "tokenizer"))
    info = {
        "recipe": dataclasses.asdict(recipe),
        "created": now(),
        "versions": versions(),
        "vocab_size": vocab,
        "mbpp": {"source": "packaged", "sha256": dataset_sha256("packaged"), "n_tasks": len(tasks),
                 "memorized_ids": sorted(memorized),
                 "memorized_sha256": sha256_json(sorted(memorized)),
                 "prompt_not_prefix_of_document": bad_prefix},
        "corpora": {"train": train.manifest(),
                    "general": {**general.manifest(), "n_docs": len(general_docs),
                                "n_chars": sum(len(d["text"]) for d in general_docs),
                                "jsonl_sha256": general_sha}},
        "tokens": token_counts(arrays, general_tokens, recipe.eval_max_new_tokens),
        "parameters": count_parameters(recipe, vocab),
        "projected_asset_bytes": projected,
        "files": {name: sha256_file(out / name) for name in PREP_FILES},
        "tokenizer_sha256": sha256_file(out / "tokenizer" / "tokenizer.json"),
        "prepare_time_s": round(time.perf_counter() - started, 1),
    }
    write_json(out / "prepare.json", info)
    _log_prepared(info, out, recipe)
    if bad_prefix:
        log(f"WARNING: {len(bad_prefix)} prompts do not tokenize as a prefix of their document: {bad_prefix[:10]}")
    check_budget(projected["total"], recipe, "the projected asset size")
    return info


def _mbpp(recipe: Recipe) -> tuple[list[Task], set[int], dict[int, str], dict[int, str]]:
    """The packaged MBPP tasks (the first ``max_tasks``), the memorized ids, and each task's prompt and document."""
    tasks = load_tasks("packaged")
    if recipe.max_tasks:
        tasks = tasks[: recipe.max_tasks]
    memorized = set(memorized_task_ids([t.task_id for t in tasks], recipe.memorized_seed, recipe.memorized_fraction))
    prompts = {t.task_id: build_prompt(t) for t in tasks}
    docs = {t.task_id: mbpp_document(prompts[t.task_id], t.code) for t in tasks}
    log(f"MBPP: {len(tasks)} tasks, {len(memorized)} memorized (seed {recipe.memorized_seed})")
    return tasks, memorized, prompts, docs


def _corpora(recipe: Recipe) -> tuple[corpora.Corpus, list[dict[str, str]], corpora.Corpus]:
    """The training corpus, and the general corpus's documents and files (fewer of each in smoke tests)."""
    train = corpora.training_corpus(recipe.train_max_chars_per_file)
    if recipe.max_train_files:
        train.files = train.files[: recipe.max_train_files]
    general_docs, general = corpora.general_corpus(recipe.general_max_chars)
    if recipe.max_train_files:
        general_docs = general_docs[: 20 * recipe.max_train_files]
    log(f"training corpus: {len(train.files)} files, {train.n_chars:,} chars; general corpus: "
        f"{len(general_docs)} documents from {len(general.files)} files")
    return train, general_docs, general


def _log_prepared(info: dict[str, Any], out: Path, recipe: Recipe) -> None:
    t, projected = info["tokens"], info["projected_asset_bytes"]
    log(f"vocab {info['vocab_size']}; tokens: train corpus {t['train_corpus']:,}, memorized MBPP docs "
        f"{t['mbpp_memorized_documents']:,}, all prompts {t['mbpp_all_prompts']:,}, general {t['general_corpus']:,}; "
        f"longest MBPP doc {t['mbpp_document_max']}, longest solution {t['mbpp_solution_max']} tokens")
    log(f"model parameters {info['parameters']:,}; projected assets {projected['total'] / 1e6:.2f} MB "
        f"(budget {recipe.max_asset_bytes / 1e6:.0f} MB); prepared dir {directory_bytes(out) / 1e6:.2f} MB")
