"""The package's data files: where they live, and the one reader of the JSON registries."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"


@lru_cache(maxsize=None)
def read_registry(filename: str, key: str) -> tuple[dict[str, Any], ...]:
    """The entries under ``key`` of ``assets/<filename>`` (cached; callers copy before mutating)."""
    with open(ASSETS_DIR / filename, encoding="utf-8") as fh:
        return tuple(json.load(fh)[key])
