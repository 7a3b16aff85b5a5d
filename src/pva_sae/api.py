"""Python API for notebooks: the seed's quick start in one call.

    >>> import pva_sae
    >>> records = pva_sae.build_dataset(model="google/gemma-2-9b", start_idx=0, end_idx=99, save_format="both")

Each keyword maps to one config field; anything else goes through ``overrides``
(``{"generation.temperature": 0.5}``) or a config file.
"""

from __future__ import annotations

from typing import Any

from pva_sae.config import Config
from pva_sae.model.registry import resolve_for_model
from pva_sae.stages.build import build_dataset as _build


def make_config(model: str | None = None, *, start_idx: int | None = None, end_idx: int | None = None,
                save_format: str | None = None, run_dir: str | None = None, resume: str | None = None,
                resume_from: str | None = None, config_file: str | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """A validated Config from keyword arguments (None keeps the default or file value)."""
    pairs = {"model.name": model, "data.start_idx": start_idx, "data.end_idx": end_idx,
             "output.save_format": save_format, "output.run_dir": run_dir, "checkpoint.resume": resume,
             "checkpoint.resume_from": resume_from, **(overrides or {})}
    items = [f"{k}={_text(v)}" for k, v in pairs.items() if v is not None]

    return resolve_for_model(config_file, items)


def _text(value: Any) -> str:
    import json

    return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def build_dataset(model: str | None = None, start_idx: int | None = None, end_idx: int | None = None,
                  save_format: str | None = None, *, run_dir: str | None = None, resume: str = "auto",
                  resume_from: str | None = None, config_file: str | None = None,
                  overrides: dict[str, Any] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Build the labelled dataset for tasks ``start_idx..end_idx`` (inclusive) and return its records.

    ``resume`` is 'auto' here (a notebook has no prompt to answer): an interrupted build continues.
    """

    cfg = make_config(model, start_idx=start_idx, end_idx=end_idx, save_format=save_format, run_dir=run_dir,
                      resume=resume, resume_from=resume_from, config_file=config_file, overrides=overrides)
    return _build(cfg, interactive=False, progress=progress)
