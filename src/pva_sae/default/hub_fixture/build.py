"""Building the whole fixture: the three repositories, the prepared dataset and, at tiny shapes, the
registry override declaring them."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pva_sae.default.hub_fixture import gemma, gemmascope, pile
from pva_sae.default.hub_fixture.cache import RepoWriter, repo_folder
from pva_sae.default.hub_fixture.override import ENV
from pva_sae.default.tiny import mbpp_texts
from pva_sae.sae.registry import release_entry

log = logging.getLogger(__name__)

SCALES = ("full", "tiny")
RELEASE_KEY = "gemma-scope-2b-pt-res"
MODEL_KEY = "gemma-2-2b"
OVERRIDE_FILE = "registry_override.json"
# Calibration of the SAE thresholds: rows x tokens of residuals per layer.
CALIBRATION = {"full": (32, 65), "tiny": (32, 33)}


@dataclass
class FixtureSummary:
    root: Path
    scale: str
    commits: dict[str, str] = field(default_factory=dict)        # repo id -> commit written to refs/main
    seconds: dict[str, float] = field(default_factory=dict)      # part -> wall time
    bytes_on_disk: dict[str, int] = field(default_factory=dict)  # repo id -> size of its blobs
    mean_l0: dict[int, float] = field(default_factory=dict)      # SAE layer -> average L0 on calibration tokens
    override: Path | None = None
    datasets_cache: Path | None = None

    def environment(self) -> dict[str, str]:
        """The variables that point the hub clients (and, at tiny shapes, the registries) at the fixture."""
        env = {"HF_HOME": str(self.root), "HF_HUB_CACHE": str(self.root / "hub"),
               "HF_DATASETS_CACHE": str(self.root / "datasets"), "HF_HUB_OFFLINE": "1"}
        if self.override is not None:
            env[ENV] = str(self.override)
        return env

    def lines(self) -> list[str]:
        out = [f"hub fixture ({self.scale}) in {self.root}"]
        for repo, commit in self.commits.items():
            out.append(f"  {repo:<30} {commit}  {self.bytes_on_disk[repo] / 1e9:8.3f} GB")
        out.append(f"  total {sum(self.bytes_on_disk.values()) / 1e9:.3f} GB; "
                   + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        if self.mean_l0:
            out.append("  SAE mean L0 on calibration tokens: "
                       + " ".join(f"{layer}:{l0:.0f}" for layer, l0 in sorted(self.mean_l0.items())))
        if self.datasets_cache is None:
            out.append("  `datasets` is not installed: no prepared copy for load_dataset; use "
                       f"--set analysis.general_corpus={self.pile_shard()}")
        out.append("  use it with: " + " ".join(f"{k}={v}" for k, v in self.environment().items()))
        return out

    def pile_shard(self) -> Path:
        folder = repo_folder(self.root / "hub", pile.REPO_ID, "dataset")
        return folder / "snapshots" / self.commits[pile.REPO_ID] / pile.SHARD


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / "blobs").iterdir() if p.is_file())


def _texts() -> list[str]:
    return [*mbpp_texts(), *(text for text, _ in pile.shipped_documents())]


def build_hub_fixture(root: str | Path, scale: str = "tiny", layers: list[int] | None = None, seed: int = 0,
                      dtype: str = "bfloat16", device: str = "cpu", n_docs: int = pile.N_DOCS) -> FixtureSummary:
    """Write the fixture under ``root`` (replacing one already there). ``layers``: the GemmaScope layers to
    write (default: every layer of the scale's model)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    root = Path(root).expanduser().resolve()
    hub = root / "hub"
    for part in (hub, root / "datasets"):
        if part.exists():
            shutil.rmtree(part)
    shape, sae_shape = gemma.SHAPES[scale], gemmascope.SAE_SHAPES[scale]
    layers = sorted(set(range(shape.n_layers) if layers is None else layers))
    bad = [layer for layer in layers if not 0 <= layer < shape.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the {scale} model has layers 0..{shape.n_layers - 1}")
    summary = FixtureSummary(root=root, scale=scale)
    texts = _texts()

    started = time.perf_counter()
    writer = RepoWriter(hub, gemma.REPO_ID)
    with tempfile.TemporaryDirectory() as tmp:
        gemma.write_model_repo(writer, texts, shape, seed, dtype, Path(tmp))
    summary.commits[gemma.REPO_ID] = writer.commit()
    summary.seconds["model"] = time.perf_counter() - started

    started = time.perf_counter()
    snapshot = writer.folder / "snapshots" / summary.commits[gemma.REPO_ID]
    residuals = _calibration(snapshot, texts, layers, scale, device)
    summary.seconds["calibration"] = time.perf_counter() - started

    started = time.perf_counter()
    writer = RepoWriter(hub, gemmascope.REPO_ID)
    table = {int(k): int(v) for k, v in release_entry(RELEASE_KEY)["canonical_l0"][gemmascope.WIDTH].items()}
    summary.mean_l0 = gemmascope.write_sae_repo(writer, residuals, table, sae_shape, seed)
    summary.commits[gemmascope.REPO_ID] = writer.commit()
    summary.seconds["saes"] = time.perf_counter() - started

    started = time.perf_counter()
    writer = RepoWriter(hub, pile.REPO_ID, "dataset")
    pile.write_dataset_repo(writer, n_docs, seed)
    summary.commits[pile.REPO_ID] = writer.commit()
    summary.datasets_cache = pile.prepare_datasets_cache(root / "datasets", summary.pile_shard(),
                                                         summary.commits[pile.REPO_ID])
    summary.seconds["pile"] = time.perf_counter() - started

    for repo, repo_type in ((gemma.REPO_ID, "model"), (gemmascope.REPO_ID, "model"), (pile.REPO_ID, "dataset")):
        summary.bytes_on_disk[repo] = _du(repo_folder(hub, repo, repo_type))
    if scale != "full":
        summary.override = root / OVERRIDE_FILE
        summary.override.write_text(json.dumps(_override(shape, sae_shape), indent=2) + "\n")
    return summary


def _override(shape: gemma.ModelShape, sae_shape: gemmascope.SAEShape) -> dict:
    return {"models": [{"key": MODEL_KEY, "n_layers": shape.n_layers, "d_model": shape.d_model}],
            "releases": [{"key": RELEASE_KEY, "n_layers": shape.n_layers, "d_model": shape.d_model,
                          "d_sae": sae_shape.d_sae}]}


def _calibration(snapshot: Path, texts: list[str], layers: list[int], scale: str, device: str):
    """Residuals of the written model, loaded from its snapshot as the pipeline loads it."""
    device_ = torch.device(device)
    dtype = torch.bfloat16 if device_.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=dtype, attn_implementation="eager").to(device_)
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    n_rows, n_tokens = CALIBRATION[scale]
    long_texts = [t for t in texts if len(t) >= 8 * n_tokens][:: max(1, len(texts) // (4 * n_rows))]
    residuals = gemmascope.calibration_residuals(model.eval(), tokenizer, long_texts[: 4 * n_rows], layers, n_tokens,
                                                 max_rows=n_rows)
    del model
    return residuals  # on ``device``: the thresholds are calibrated there
