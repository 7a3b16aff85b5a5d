"""Content digests used in manifests, fingerprints and cache keys (one implementation of each)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex digest of a file, read in chunks (SAE files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Digest of a JSON-serialisable object with sorted keys (stable across runs and dict orders)."""
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))
