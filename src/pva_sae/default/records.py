"""The build's JSON records (``prepare.json``, ``training.json``), version stamps and console log line.

The records are written by the project's one atomic JSON writer (:mod:`pva_sae.rundir.atomic`) in their
own format (one space of indent, non-ASCII kept: the shipped ``training.json`` is written so).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from pva_sae.rundir.atomic import atomic_write_json
from pva_sae.rundir.manifest import git_commit, package_versions

BUILD_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "safetensors")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def now() -> str:
    """Local time with its UTC offset, as every record's ``created`` field."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as the build's records are written (one space of indent, non-ASCII kept), atomically."""
    atomic_write_json(path, obj, indent=1, ensure_ascii=False)


def versions() -> dict[str, Any]:
    """Python, platform, the build's packages, CUDA and GPU name, and the git commit of the checkout."""
    return {"python": platform.python_version(), "platform": platform.platform(),
            **package_versions(BUILD_PACKAGES),
            "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "git_commit": git_commit()}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
