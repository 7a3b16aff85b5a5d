"""A registry override: an extra JSON file, named by ``PVA_SAE_REGISTRY_OVERRIDE``, that replaces fields
of registered models and SAE releases.

For tests against a stand-in of the hub at reduced shapes: the model key stays ``gemma-2-2b`` and the
code path stays the real one; only the shapes the registry declares (n_layers, d_model, d_sae) change.
Its format::

    {"models": [{"key": "gemma-2-2b", "n_layers": 4, "d_model": 64}],
     "releases": [{"key": "gemma-scope-2b-pt-res", "n_layers": 4, "d_model": 64, "d_sae": 256}]}
"""

from __future__ import annotations

import json
import logging
import os
from functools import cache
from typing import Any

from pva_sae.errors import InputError

log = logging.getLogger(__name__)

ENV = "PVA_SAE_REGISTRY_OVERRIDE"


@cache
def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{ENV}={path} cannot be read as a registry override ({exc}); fix the file or unset "
                         f"{ENV}") from None
    log.warning("registry override %s is active (%s)", path, ENV)
    return data


def apply_override(entries: tuple[dict[str, Any], ...], section: str) -> tuple[dict[str, Any], ...]:
    """``entries`` with the fields of the override file's ``section`` entries merged in, by key."""
    path = os.environ.get(ENV)
    if not path:
        return entries
    changes = {item["key"]: item for item in _read(path).get(section, [])}
    unknown = sorted(set(changes) - {entry["key"] for entry in entries})
    if unknown:
        raise InputError(f"registry override {path} names unregistered {section} {unknown}; valid keys: "
                         f"{', '.join(entry['key'] for entry in entries)}")
    return tuple({**entry, **changes.get(entry["key"], {})} for entry in entries)
