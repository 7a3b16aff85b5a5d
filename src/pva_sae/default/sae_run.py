"""The SAEs of the embedded default: one JumpReLU SAE on ``resid_post`` of every layer of the trained model.

The data: every non-BOS position of the training corpus (in BOS-prefixed chunks), of the memorized
MBPP documents and of the other tasks' prompts, plus ``sae_prompt_end_copies`` copies of each
prompt's last-token residual (the position the analysis reads). A seeded ``sae_heldout_fraction``
of the sequences is held out for the reported numbers, with the general corpus and the last prompt
tokens as two more evaluation sets. Training itself is :mod:`pva_sae.sae.train`; layers that miss
its targets are retried with another L0 target while the time budget allows.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pva_sae.default.corpus import load_general_corpus
from pva_sae.default.prepared import Prepared
from pva_sae.default.recipe import Recipe
from pva_sae.default.records import log
from pva_sae.default.tiny import BOS_ID, PAD_ID
from pva_sae.model.capture import capture_last_token
from pva_sae.sae.train import (
    SAETrainConfig,
    SAETrainResult,
    collect_activations,
    evaluate_sae,
    meets_targets,
    save_sae,
    train_saes,
)


def sae_sequences(prep: Prepared, recipe: Recipe) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
    """Token sequences (each starting with BOS) for SAE training and held-out evaluation.

    The pool: the training corpus in BOS-prefixed chunks of ``seq_len``, the memorized MBPP
    documents and the prompts of the other tasks (the inputs the analysis reads). A seeded
    ``sae_heldout_fraction`` of the sequences is held out; the rest is capped at ``sae_max_tokens``.
    """
    chunk = recipe.seq_len - 1
    pool: list[np.ndarray] = []
    for a, b in zip(prep.file_offsets[:-1], prep.file_offsets[1:]):
        tokens = prep.stream[a:b].astype(np.int64)
        for s in range(0, len(tokens), chunk):
            piece = tokens[s:s + chunk]
            if len(piece) >= 2:
                pool.append(np.concatenate([[BOS_ID], piece]))
    n_corpus = len(pool)
    for doc, mem, plen in zip(prep.docs, prep.memorized, prep.prompt_lengths):
        pool.append(doc.astype(np.int64) if mem else doc[:plen].astype(np.int64))
    order = np.random.default_rng(recipe.seed + 1).permutation(len(pool))
    n_held = max(1, int(round(len(pool) * recipe.sae_heldout_fraction)))
    held = [pool[i] for i in order[:n_held]]
    train, total = [], 0
    for i in order[n_held:]:
        if total + len(pool[i]) - 1 > recipe.sae_max_tokens:
            continue
        train.append(pool[i])
        total += len(pool[i]) - 1
    train.sort(key=len)  # less padding when collecting; the SAE trainer shuffles tokens anyway
    held.sort(key=len)
    counts = {"pool_sequences": len(pool), "corpus_chunks": n_corpus, "mbpp_sequences": len(pool) - n_corpus,
              "train_sequences": len(train), "train_tokens": total, "heldout_sequences": len(held),
              "heldout_tokens": int(sum(len(s) - 1 for s in held))}
    return train, held, counts


def general_sequences(prep: Prepared, tok: PreTrainedTokenizerBase, max_total: int,
                      max_tokens: int = 128) -> list[list[int]]:
    """General-corpus documents as the analysis feeds them (at most ``max_tokens`` each), up to ``max_total`` tokens."""
    docs = load_general_corpus(prep.path / "general_corpus.jsonl")
    out, total = [], 0
    for ids in tok(docs)["input_ids"]:
        ids = ids[:max_tokens]
        if len(ids) < 2 or total + len(ids) > max_total:
            continue
        out.append(ids)
        total += len(ids) - 1
    return out


def last_token_acts(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], layers: list[int],
                    long_tokens: int = 512) -> torch.Tensor:
    """Residuals at the last token of every prompt, (n, n_layers, d_model): prompts longer than
    ``long_tokens`` in small batches (eager attention memory grows with the square of the length)."""
    lengths = [len(ids) for ids in tok(prompts)["input_ids"]]
    out = None
    for long, batch_size in ((False, 64), (True, 2)):
        idx = [i for i, n in enumerate(lengths) if (n > long_tokens) == long]
        if not idx:
            continue
        acts = capture_last_token(model, tok, [prompts[i] for i in idx], layers=layers, batch_size=batch_size,
                                  progress=False)
        if out is None:
            out = torch.empty((len(prompts), *acts.shape[1:]), dtype=acts.dtype)
        out[torch.tensor(idx)] = acts
    return out


def sae_config(recipe: Recipe, device: torch.device, seed: int) -> SAETrainConfig:
    return SAETrainConfig(d_sae=recipe.sae_width, steps=recipe.sae_steps, batch_size=recipe.sae_batch,
                          lr=recipe.sae_lr, threshold_lr=recipe.sae_threshold_lr, target_l0=recipe.sae_target_l0,
                          sparsity_warmup_steps=min(1000, recipe.sae_steps // 5),
                          lr_warmup_steps=min(100, recipe.sae_steps // 10), seed=seed, device=str(device),
                          log_every=max(1, recipe.sae_steps // 10))


def next_target(target: float, ev: dict[str, Any]) -> float:
    """The L0 target of a retry: higher when reconstruction fell short, lower when L0 overshot."""
    if ev["mean_l0"] > 100:
        return max(12.0, target * 0.75)
    if ev["fve"] < 0.8:
        return min(95.0, target * 1.2)
    return target


def attempt_rank(ev: dict[str, Any]) -> tuple:
    """Order of preference among SAE attempts: targets met, then L0 in range, then reconstruction."""
    return meets_targets(ev), 10 <= ev["mean_l0"] <= 100, ev["fve"]


def fit_saes(acts: dict[int, torch.Tensor], held: dict[int, torch.Tensor], recipe: Recipe, device: torch.device,
             deadline: float) -> dict[int, tuple[SAETrainResult, list[dict[str, Any]]]]:
    """Train all layers' SAEs together; layers that miss the targets are trained again (together)
    with another L0 target, at most ``sae_retries`` times and while the time ``deadline`` allows.
    Returns ``{layer: (best result, attempts)}``."""
    targets = {layer: recipe.sae_target_l0 for layer in acts}
    tried: dict[int, list] = {layer: [] for layer in acts}
    pending = sorted(acts)
    for round_ in range(recipe.sae_retries + 1):
        started = time.perf_counter()
        results = train_saes([acts[layer] for layer in pending], sae_config(recipe, device, recipe.seed + round_),
                             eval_acts=[held[layer] for layer in pending],
                             target_l0=[targets[layer] for layer in pending], log=log,
                             names=[f"layer {layer}" for layer in pending])
        for layer, result in zip(pending, results):
            tried[layer].append(result)
        round_s = time.perf_counter() - started
        retry = {}
        for layer, result in zip(pending, results):
            ev = result.stats["eval"]
            new_target = next_target(targets[layer], ev)
            if not meets_targets(ev) and new_target != targets[layer]:
                retry[layer] = new_target
                log(f"layer {layer}: FVE {ev['fve']:.3f}, L0 {ev['mean_l0']:.1f}, dead {ev['dead_fraction']:.3f} "
                    f"misses the targets")
        if not retry or round_ == recipe.sae_retries:
            break
        if time.perf_counter() + round_s > deadline:
            log(f"no time left for another SAE round ({round_s:.0f} s) within the time budget; keeping the best so far")
            break
        log(f"training again with L0 targets {retry}")
        targets.update(retry)
        pending = sorted(retry)
    out = {}
    for layer, results in tried.items():
        best = max(results, key=lambda r: attempt_rank(r.stats["eval"]))
        attempts = [{"target_l0": r.stats["target_l0"], "fve": r.stats["eval"]["fve"],
                     "mean_l0": r.stats["eval"]["mean_l0"], "dead_fraction": r.stats["eval"]["dead_fraction"],
                     "train_time_s": r.stats["train_time_s"], "chosen": r is best} for r in results]
        out[layer] = (best, attempts)
    return out


def collect_sae_data(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prep: Prepared, recipe: Recipe,
                     device: torch.device) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Activations ``{set: {layer: (n_tokens, d_model)}}`` for the sets train, heldout, general and
    (``(n_tasks, n_layers, d_model)``) last; the sequence counts; the collection time in seconds."""
    layers = list(range(recipe.n_layers))
    train_seqs, held_seqs, counts = sae_sequences(prep, recipe)
    store = device if device.type == "cuda" else torch.device("cpu")
    t0 = time.perf_counter()
    acts = collect_activations(model, train_seqs, layers, recipe.collect_batch, PAD_ID, store_device=store)
    held = collect_activations(model, held_seqs, layers, recipe.collect_batch, PAD_ID, store_device=store)
    general = collect_activations(model, general_sequences(prep, tok, recipe.sae_general_tokens), layers,
                                  recipe.collect_batch, PAD_ID, store_device=store)
    last = last_token_acts(model, tok, [t["prompt"] for t in prep.tasks], layers)       # (n_tasks, n_layers, d)
    if recipe.sae_prompt_end_copies > 0:
        # The analysis reads the residual at the last prompt token: give those positions more weight.
        for i, layer in enumerate(layers):
            extra = last[:, i].repeat(recipe.sae_prompt_end_copies, 1).to(store)
            acts[layer] = torch.cat([acts[layer], extra])
    collect_s = time.perf_counter() - t0
    counts["prompt_end_rows_added"] = int(last.shape[0] * max(recipe.sae_prompt_end_copies, 0))
    log(f"activations: {acts[0].shape[0]:,} training rows, {counts['heldout_tokens']:,} held out, "
        f"{general[0].shape[0]:,} general-corpus tokens, {last.shape[0]} last prompt tokens ({collect_s:.1f} s)")
    return {"train": acts, "heldout": held, "general": general, "last": last}, counts, collect_s


def train_all_saes(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prep: Prepared, recipe: Recipe,
                   device: torch.device, out: Path, deadline: float) -> dict[str, Any]:
    """Train, evaluate and save (``out/saes/layer_{L}``) every layer's SAE; returns training.json's ``saes``."""
    data, counts, collect_s = collect_sae_data(model, tok, prep, recipe, device)
    held, general, last = data["heldout"], data["general"], data["last"]
    summary: dict[str, Any] = {"data": counts, "collect_time_s": round(collect_s, 1), "layers": {}}
    t1 = time.perf_counter()
    fitted = fit_saes(data["train"], held, recipe, device, deadline)
    summary["train_time_s"] = round(time.perf_counter() - t1, 1)
    for layer in range(recipe.n_layers):
        result, attempts = fitted[layer]
        ev = result.stats["eval"]
        extra_evals = {"general_corpus": evaluate_sae(result.params, general[layer], device=device),
                       "mbpp_last_prompt_token": evaluate_sae(result.params, last[:, layer], device=device)}
        unseen = torch.cat([held[layer], general[layer]])
        extra_evals["dead_fraction_heldout_and_general"] = evaluate_sae(result.params, unseen,
                                                                        device=device)["dead_fraction"]
        result.stats.update(extra_evals)
        result.stats["attempts"] = attempts
        result.stats["meets_targets"] = meets_targets(ev)
        save_sae(result, out / "saes" / f"layer_{layer}",
                 extra={"layer": layer, "site": "resid_post", "model": "pva-tiny"})
        summary["layers"][str(layer)] = {"heldout": ev, **extra_evals, "attempts": attempts,
                                         "target_l0": result.stats["target_l0"],
                                         "final_lambda": result.stats["final_lambda"],
                                         "meets_targets": result.stats["meets_targets"],
                                         "train_time_s": round(sum(a["train_time_s"] for a in attempts), 2)}
        log(f"layer {layer}: held-out FVE {ev['fve']:.3f}, mean L0 {ev['mean_l0']:.1f}, dead "
            f"{ev['dead_fraction']:.3f}; general FVE {extra_evals['general_corpus']['fve']:.3f}; "
            f"last-prompt-token FVE {extra_evals['mbpp_last_prompt_token']['fve']:.3f}")
    summary["config"] = dataclasses.asdict(sae_config(recipe, device, recipe.seed))
    return summary
