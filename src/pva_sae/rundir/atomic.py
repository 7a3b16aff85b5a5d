"""Atomic file writes and the one JSON writer and reader (the Parquet writer is in ``artifacts``).

A crash (even SIGKILL) leaves either the old file or the new one, never half of one. Files get the mode
of any other file the process creates (0666 less the umask: 0644 under the usual umask 022), not the
owner-only 0600 of a bare ``mkstemp``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pva_sae.errors import InputError


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux /proc); elsewhere it is
    set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``.

    A crash (even SIGKILL) leaves either the old file or the new one, never half of one. The file's mode
    is 0666 less the umask, as for a file opened with ``open(path, "w")``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, indent: int = 2, ensure_ascii: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path) -> Any:
    """The JSON document at ``path``; a damaged file (a truncated write by another tool, a bad edit) raises
    an error naming it and how to recover, instead of a bare JSONDecodeError."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc}); it is damaged: restore it from a copy, or delete it "
                         f"and rerun the stage that writes it (for a run's config.json: rerun with the same "
                         f"command, which writes it again)") from None


def timestamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")
