"""The ``train`` command: language model, SAEs, ``training.json``, checks, evaluation, packing.

Orchestration only: each step is a function of :mod:`~pva_sae.default.lm_train`,
:mod:`~pva_sae.default.sae_run`, :mod:`~pva_sae.default.package`, :mod:`~pva_sae.default.evaluate`
and :mod:`~pva_sae.default.card`, over a directory written by :func:`pva_sae.default.prep.prepare`.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pva_sae.default.card import plot_loss
from pva_sae.default.evaluate import evaluate
from pva_sae.default.lm_train import load_saved_model, save_model, train_lm
from pva_sae.default.package import finish_assets, pack
from pva_sae.default.prepared import Prepared, load_prepared
from pva_sae.default.recipe import (
    Recipe,
    check_budget,
    count_parameters,
    projected_asset_bytes,
)
from pva_sae.default.records import directory_bytes, log, now, versions, write_json
from pva_sae.default.sae_run import train_all_saes
from pva_sae.model.registry import resolve_device

EVAL_RESERVE_S = 90.0  # of the time budget, kept for the pass@1 evaluation when it runs


def train(prepared: Path, out: Path, recipe: Recipe, device_spec: str, run_eval: bool, loss_png: Path | None,
          pack_to: Path | None = None) -> dict[str, Any]:
    """Build the asset directory ``out`` from the prepared directory; returns the final training.json record."""
    device = resolve_device(device_spec)
    prep = load_prepared(prepared)
    vocab = prep.info["vocab_size"]
    general_bytes = (prepared / "general_corpus.jsonl").stat().st_size
    projected = projected_asset_bytes(recipe, vocab, general_bytes, directory_bytes(prepared / "tokenizer"))
    check_budget(projected["total"], recipe, "the projected asset size")
    log(f"device {device}; model {count_parameters(recipe, vocab):,} parameters; projected assets "
        f"{projected['total'] / 1e6:.2f} MB")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    model, lm_stats = train_lm(prep, recipe, device)
    model_dir = save_model(model, prep, out)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model, tok = load_saved_model(model_dir, device)

    deadline = started + recipe.time_budget_s - (EVAL_RESERVE_S if run_eval else 0.0)
    sae_summary = train_all_saes(model, tok, prep, recipe, device, out, deadline=deadline)
    shutil.copyfile(prepared / "general_corpus.jsonl", out / "general_corpus.jsonl")

    record = training_record(prep, recipe, device, model.config.to_dict(), lm_stats, sae_summary,
                             round(time.perf_counter() - started, 1))
    write_json(out / "training.json", record)
    record = finish_assets(out, record, recipe)
    if loss_png is not None:
        plot_loss(record, loss_png)
    if run_eval:
        try:
            record = evaluate(out, recipe, device_spec, prepared)
        except Exception as exc:  # the assets are written; the evaluation can be rerun with `eval`
            log(f"ERROR: evaluation failed ({type(exc).__name__}: {exc}); rerun it with the `eval` command")
            record["eval_error"] = f"{type(exc).__name__}: {exc}"
            write_json(out / "training.json", record)
    if pack_to is not None:
        pack(out, pack_to, loss_png)
    print_summary(record)
    return record


def training_record(prep: Prepared, recipe: Recipe, device: torch.device, model_config: dict[str, Any],
                    lm_stats: dict[str, Any], sae_summary: dict[str, Any], total_s: float) -> dict[str, Any]:
    """training.json before the asset hashes and the evaluation are added."""
    vocab = prep.info["vocab_size"]
    return {
        "recipe": dataclasses.asdict(recipe),
        "created": now(),
        "command": " ".join(sys.argv),
        "versions": {"prepare": prep.info["versions"], "train": versions()},
        "device": str(device),
        "vocab_size": vocab,
        "parameters": count_parameters(recipe, vocab),
        "model_config": {k: v for k, v in model_config.items() if isinstance(v, (int, float, str, bool))},
        "mbpp": prep.info["mbpp"],
        "corpora": prep.info["corpora"],
        "tokens": prep.info["tokens"],
        "prepared_files": prep.info["files"],
        "tokenizer_sha256": prep.info["tokenizer_sha256"],
        "lm": lm_stats,
        "saes": sae_summary,
        "timings_s": {"prepare": prep.info["prepare_time_s"], "lm": lm_stats["train_time_s"],
                      "sae_collect": sae_summary["collect_time_s"],
                      "saes": sae_summary["train_time_s"],
                      "train_total": total_s},
    }


def print_summary(record: dict[str, Any]) -> None:
    print("\n=== pva-tiny build summary ===")
    print(f"parameters: {record['parameters']:,}   vocab: {record['vocab_size']}   device: {record['device']}")
    lm = record["lm"]
    last = lm["final_loss"] or {}
    print(f"LM: {lm['steps']} steps in {lm['train_time_s']} s; final loss corpus "
          f"{last.get('loss_corpus', float('nan')):.4f}, "
          f"mbpp {last.get('loss_mbpp', float('nan')):.4f}")
    for layer, s in record["saes"]["layers"].items():
        h = s["heldout"]
        print(f"SAE layer {layer}: FVE {h['fve']:.3f}  L0 {h['mean_l0']:.1f}  dead {h['dead_fraction']:.3f}  "
              f"targets {'met' if s['meets_targets'] else 'MISSED'}")
    if "eval" in record:
        ev = record["eval"]
        print(f"pass@1 memorized {ev['memorized']['pass_at_1']:.3f}, other {ev['other']['pass_at_1']:.3f}")
    print(f"assets: {record.get('asset_bytes', 0) / 1e6:.2f} MB; timings (s): {record['timings_s']}")
