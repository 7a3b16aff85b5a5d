"""The run manifest: what produced a run, written before any work starts.

Records versions (package, Python, torch, transformers), the git commit of the source tree when it is
a checkout, the platform and device, the model id and resolved revision, data hashes and seeds, so
that a result can be traced back and reproduced.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from pva_sae import __version__


def git_commit(path: Path | None = None) -> str | None:
    """Commit of the checkout holding the package (with '+dirty' if modified), or None outside git."""
    where = path or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def package_versions(names: tuple[str, ...] = ("torch", "transformers", "tokenizers", "safetensors",
                                                 "numpy", "pyarrow", "scipy", "scikit-learn")) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def base_manifest(stage: str, seeds: dict[str, int]) -> dict[str, Any]:
    return {
        "stage": stage,
        "pva_sae_version": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "argv": sys.argv,
        "versions": package_versions(),
        "seeds": seeds,
    }


def device_info(device: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device)}
    try:

        if getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(device)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info
