"""The asset directory (``assets/default``): file hashes and size budget, and moving it between machines.

Layout::

    model/                     Gemma2ForCausalLM (bfloat16 safetensors) + tokenizer, Hugging Face format
    saes/layer_{L}/params.npz  JumpReLU SAE of resid_post of layer L (GemmaScope layout, float32)
    saes/layer_{L}/stats.json  its training statistics and held-out quality
    general_corpus.jsonl       held-out standard-library documents for the general-language filter
    training.json              recipe, seeds, corpus and file hashes, loss curve, timings, versions, pass@1

:func:`finish_assets` records every file's size and sha256 in ``training.json``; :func:`pack` writes
the directory as a few flat files (a form that survives a machine that returns only a handful of
files) and :func:`unpack` rebuilds it and checks every file against those hashes.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path
from typing import Any

from pva_sae.default.recipe import Recipe, check_budget
from pva_sae.default.records import directory_bytes, log, write_json
from pva_sae.hashing import sha256_file
from pva_sae.rundir.atomic import read_json

PACKED = {"model.tar": "model", "saes.tar": "saes"}


def finish_assets(out: Path, record: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """Record every asset file's size and sha256, and fail loudly when the assets exceed the budget."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "training.json":
            files[str(p.relative_to(out))] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    record["asset_files"] = files
    write_json(out / "training.json", record)
    total = directory_bytes(out)
    record["asset_bytes"] = total
    write_json(out / "training.json", record)
    log(f"assets in {out}: {total / 1e6:.2f} MB (budget {recipe.max_asset_bytes / 1e6:.0f} MB)")
    check_budget(directory_bytes(out), recipe, f"the asset directory {out}")
    return record


def pack(assets: Path, dest: Path, loss_png: Path | None) -> None:
    """Write the assets as a few flat files (two tar archives, training.json, the loss PNG) into ``dest``.

    The general corpus is not packed: it comes from the prepared directory, which the receiving side has."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, sub in PACKED.items():
        with tarfile.open(dest / name, "w") as tar:
            tar.add(assets / sub, arcname=sub)
    shutil.copyfile(assets / "training.json", dest / "training.json")
    if loss_png is not None and loss_png.is_file():
        shutil.copyfile(loss_png, dest / "default_loss.png")
    log(f"packed {assets} into {dest}: {sorted(p.name for p in dest.iterdir())}")


def unpack(packed: Path, prepared: Path, out: Path, loss_png: Path | None, recipe: Recipe) -> None:
    """Rebuild the asset directory from :func:`pack`'s files plus the prepared general corpus, and check
    every file against the sha256 recorded in training.json."""
    record = read_json(packed / "training.json")
    for sub in PACKED.values():
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    for name in PACKED:
        with tarfile.open(packed / name) as tar:
            tar.extractall(out, filter="data")
    shutil.copyfile(prepared / "general_corpus.jsonl", out / "general_corpus.jsonl")
    shutil.copyfile(packed / "training.json", out / "training.json")
    bad = [rel for rel, meta in record["asset_files"].items()
           if not (out / rel).is_file() or sha256_file(out / rel) != meta["sha256"]]
    extra = [str(p.relative_to(out)) for p in out.rglob("*")
             if p.is_file() and p.name != "training.json" and str(p.relative_to(out)) not in record["asset_files"]]
    if bad or extra:
        raise SystemExit(f"ERROR: unpacked assets differ from training.json: mismatched {bad}, unexpected {extra}")
    if loss_png is not None and (packed / "default_loss.png").is_file():
        loss_png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(packed / "default_loss.png", loss_png)
    check_budget(directory_bytes(out), recipe, f"the asset directory {out}")
    log(f"unpacked into {out}: {len(record['asset_files'])} files verified, {directory_bytes(out) / 1e6:.2f} MB")
