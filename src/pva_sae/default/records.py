"""The build's JSON records (``prepare.json``, ``training.json``), version stamps and console log line.

Why not :mod:`pva_sae.rundir.atomic` (the run artifacts' reader and writer): its JSON format is
not the records' (two spaces of indent and ASCII escapes; the shipped ``training.json`` has one
space and keeps non-ASCII), and it imports pyarrow at module level, which the ``train`` step (on a
GPU machine with torch, transformers, tokenizers, numpy and safetensors) does not otherwise need.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from pva_sae.rundir.manifest import git_commit, package_versions

BUILD_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "safetensors")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def now() -> str:
    """Local time with its UTC offset, as every record's ``created`` field."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON (one space of indent, non-ASCII kept, final newline), via a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def versions() -> dict[str, Any]:
    """Python, platform, the build's packages, CUDA and GPU name, and the git commit of the checkout."""
    return {"python": platform.python_version(), "platform": platform.platform(),
            **package_versions(BUILD_PACKAGES),
            "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "git_commit": git_commit()}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
