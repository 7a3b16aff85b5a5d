"""Timestamped log files in the run directory, plus concise console output."""

from __future__ import annotations

import logging
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(path: Path | None, console_level: int = logging.WARNING) -> Path | None:
    """Send pva_sae's log records to ``path`` (everything from INFO) and to stderr (warnings).

    Handlers from an earlier call are replaced, so stages run in one process each get their own file.
    """
    logger = logging.getLogger("pva_sae")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        if getattr(handler, "_pva_sae", False):
            logger.removeHandler(handler)
            handler.close()
    console = logging.StreamHandler()
    console.setLevel(console_level)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    console._pva_sae = True  # type: ignore[attr-defined]
    logger.addHandler(console)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path, encoding="utf-8")
        fh.setLevel(logging.INFO)
        fh.setFormatter(logging.Formatter(_FORMAT))
        fh._pva_sae = True  # type: ignore[attr-defined]
        logger.addHandler(fh)
    logger.propagate = False
    return path
