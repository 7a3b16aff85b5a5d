"""Writing one repository into a Hugging Face hub cache, in the layout ``huggingface_hub`` reads.

``<cache>/<type>s--<owner>--<name>/blobs/<etag>`` holds each file once (etag: the sha256 of an LFS file,
the git blob sha1 of a small one); ``snapshots/<commit>/<path>`` is a relative symlink to its blob and
``refs/main`` holds the commit. The commit is a digest of every (path, etag), so the same files give the
same revision.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The hub stores files above this size (and every weight file) through LFS, whose etag is the sha256.
LFS_SUFFIXES = (".safetensors", ".npz", ".parquet", ".bin", ".model")
LFS_MIN_BYTES = 10 * 1024 * 1024


def repo_folder(cache: str | Path, repo_id: str, repo_type: str = "model") -> Path:
    """``<cache>/models--owner--name`` (or ``datasets--...``), as huggingface_hub names it."""
    return Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def _etag(path: Path) -> str:
    size = path.stat().st_size
    if path.suffix in LFS_SUFFIXES or size >= LFS_MIN_BYTES:
        digest = hashlib.sha256()
    else:  # git blob id: sha1 over 'blob <size>\0' + content
        digest = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class RepoWriter:
    """Stage files of one repository, then :meth:`commit` them into the cache under ``refs/main``."""

    def __init__(self, cache: str | Path, repo_id: str, repo_type: str = "model"):
        self.repo_id, self.repo_type = repo_id, repo_type
        self.folder = repo_folder(cache, repo_id, repo_type)
        self.staging = self.folder / "blobs" / ".staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, Path] = {}

    def path_for(self, repo_path: str) -> Path:
        """A staging path to write ``repo_path`` to directly (large files are never copied)."""
        staged = self.staging / repo_path.replace("/", "__")
        self._files[repo_path] = staged
        return staged

    def add_bytes(self, repo_path: str, data: bytes) -> None:
        self.path_for(repo_path).write_bytes(data)

    def commit(self, threads: int = 8) -> str:
        """Move the staged files into ``blobs/``, link ``snapshots/<commit>/`` and write ``refs/main``."""
        paths = sorted(self._files)
        with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL on large buffers
            etags = dict(zip(paths, pool.map(lambda p: _etag(self._files[p]), paths)))
        commit = hashlib.sha1("".join(f"{p}\0{etags[p]}\n" for p in paths).encode()).hexdigest()
        snapshot = self.folder / "snapshots" / commit
        for repo_path in paths:
            blob = self.folder / "blobs" / etags[repo_path]
            os.replace(self._files[repo_path], blob)
            link = snapshot / repo_path
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(os.path.relpath(blob, link.parent))
        (self.folder / "refs").mkdir(exist_ok=True)
        (self.folder / "refs" / "main").write_text(commit)
        self.staging.rmdir()
        return commit


# --------------------------------------------------------------------------- reading a cache


COMMIT = 40  # hex digits of a full commit hash


def _constants():
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return constants


def default_cache() -> Path:
    """The hub cache the hub clients use now (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    constants = _constants()
    if constants is not None:
        return Path(constants.HF_HUB_CACHE)
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return Path(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub")))


def hub_offline() -> bool:
    """Whether the hub clients are in offline mode (HF_HUB_OFFLINE, as huggingface_hub read it at import)."""
    constants = _constants()
    if constants is not None:
        return bool(constants.HF_HUB_OFFLINE)
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def cached_refs(repo_id: str, repo_type: str = "model", cache: str | Path | None = None) -> dict[str, str]:
    """Branch or tag -> commit of every ref of the repository in the cache ({} when it is not cached)."""
    refs = repo_folder(cache or default_cache(), repo_id, repo_type) / "refs"
    if not refs.is_dir():
        return {}
    return {str(p.relative_to(refs)): p.read_text().strip() for p in refs.rglob("*") if p.is_file()}


def explain_missing(repo_id: str, revision: str | None, filename: str | None = None, repo_type: str = "model",
                    cache: str | Path | None = None) -> str:
    """What of (repository, revision, file) the cache lacks, in one sentence; '' when all of it is there."""
    cache = Path(cache or default_cache())
    folder = repo_folder(cache, repo_id, repo_type)
    revision = revision or "main"
    if not (folder / "snapshots").is_dir():
        return f"{repo_id} is not in the Hugging Face cache {cache}"
    refs = cached_refs(repo_id, repo_type, cache)
    commit = revision if len(revision) == COMMIT and (folder / "snapshots" / revision).is_dir() else refs.get(revision)
    if commit is None or not (folder / "snapshots" / commit).is_dir():
        have = ", ".join(f"{ref} -> {sha[:12]}" for ref, sha in sorted(refs.items())) or "none"
        return (f"revision {revision!r} of {repo_id} is not in the Hugging Face cache {cache} (cached revisions: "
                f"{have})")
    if filename is not None and not (folder / "snapshots" / commit / filename).exists():
        return f"{filename} is not in the cached snapshot {commit[:12]} of {repo_id} ({cache})"
    return ""
