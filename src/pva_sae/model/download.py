"""Everything a run of a registered hub model needs, fetched once: `pva-sae download --model M`.

A run of a hub model reads three kinds of files: the model snapshot (config, generation config,
tokenizer, weight shards and their index: what ``from_pretrained`` asks for), the SAE file of every
analysed layer (``hf_hub_download``) and, when the general-language filter uses it, the general corpus
(``datasets.load_dataset('NeelNanda/pile-10k')``; offline, ``datasets`` reads only the prepared copy
an online load leaves in ``HF_DATASETS_CACHE``, so the download also prepares it). :func:`needed_files`
lists them with their sizes from the hub API, :func:`download` fetches them into the Hugging Face cache,
and :func:`check_cache` verifies, without the network, that a cache holds all of them. Afterwards
``HF_HUB_OFFLINE=1`` runs never contact the hub.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pva_sae.config import Config
from pva_sae.data.mbpp import HUB_CONFIG, HUB_DATASET
from pva_sae.default.hub_fixture.cache import default_cache, explain_missing, repo_folder
from pva_sae.errors import InputError, MissingInputError, PvaSaeError
from pva_sae.sae.general_filter import PILE_10K, resolve_general_corpus
from pva_sae.sae.registry import release_entry, resolve_release, resolve_sae

# The files of a model repository that transformers reads (other formats and folders are skipped).
MODEL_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model")


class DownloadError(PvaSaeError, RuntimeError):
    """The hub refused or could not be reached; the message says why and what to do."""


@dataclass
class HubFile:
    role: str                  # 'model' | 'sae' | 'corpus' | 'mbpp'
    repo_id: str
    repo_type: str             # 'model' | 'dataset'
    filename: str
    revision: str
    size: int | None = None    # bytes, as the hub API reports them (None: unknown)


# --------------------------------------------------------------------------- what a run needs


def _model_entry(cfg: Config, model_entry: dict[str, Any] | None) -> dict[str, Any]:
    if model_entry is None or "hf_id" not in model_entry:
        raise InputError(f"`pva-sae download` is for registered hub models; {cfg.model.name!r} is "
                         f"{'an embedded model that ships with the package' if model_entry else 'not one'} "
                         f"(see `pva-sae models`)")
    return model_entry


def _revision(cfg: Config, entry: dict[str, Any]) -> str:
    return cfg.model.revision if cfg.model.revision != "main" else (entry.get("revision") or "main")


def sae_files(cfg: Config, entry: dict[str, Any]) -> list[HubFile]:
    """The SAE file (and hyperparameter file, if the release has one) of every analysed layer."""
    if cfg.analysis.sae_local_dir or cfg.analysis.sae_release == "local":
        return []
    release = release_entry(resolve_release(cfg, entry["key"]))
    if not release.get("repo"):
        return []
    layers = list(cfg.analysis.layers) if cfg.analysis.layers is not None else list(range(entry["n_layers"]))
    paths = [resolve_sae(release["key"], layer, cfg.analysis.sae_width, cfg.analysis.sae_l0) for layer in layers]
    if release.get("hyperparams_template"):
        paths += [release["hyperparams_template"].format(layer=layer) for layer in layers]
    return [HubFile("sae", release["repo"], "model", path, release.get("revision") or "main") for path in paths]


def _corpus_repos(cfg: Config, entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, dataset repo) of the datasets a run loads through `datasets`."""
    repos = []
    if resolve_general_corpus(cfg, entry) == "pile-10k":
        repos.append(("corpus", PILE_10K))
    if cfg.data.source == "hub":
        repos.append(("mbpp", HUB_DATASET))
    return repos


def needed_files(cfg: Config, model_entry: dict[str, Any] | None, api: Any = None) -> list[HubFile]:
    """Every hub file a run of ``cfg`` reads, with sizes, from the hub API (needs the network and, for
    gated models, a token)."""
    from huggingface_hub import HfApi

    entry = _model_entry(cfg, model_entry)
    api = api or HfApi()
    files: list[HubFile] = []
    with _hub_errors(entry["hf_id"]):
        info = api.model_info(entry["hf_id"], revision=_revision(cfg, entry), files_metadata=True)
    files += [HubFile("model", entry["hf_id"], "model", s.rfilename, info.sha, s.size) for s in info.siblings
              if any(fnmatch.fnmatch(s.rfilename, p) for p in MODEL_PATTERNS)]
    saes = sae_files(cfg, entry)
    if saes:
        with _hub_errors(saes[0].repo_id):
            sizes = {p.path: getattr(p, "size", None)
                     for p in api.get_paths_info(saes[0].repo_id, [f.filename for f in saes], revision=saes[0].revision)}
        missing = [f.filename for f in saes if f.filename not in sizes]
        if missing:
            raise DownloadError(f"{saes[0].repo_id} has no {', '.join(missing)}; check analysis.sae_width / "
                                f"analysis.sae_l0 / analysis.layers")
        for f in saes:
            f.size = sizes[f.filename]
        files += saes
    for role, repo in _corpus_repos(cfg, entry):
        with _hub_errors(repo):
            info = api.dataset_info(repo, files_metadata=True)
        keep = [s for s in info.siblings if role != "mbpp" or s.rfilename.startswith(f"{HUB_CONFIG}/")]
        files += [HubFile(role, repo, "dataset", s.rfilename, info.sha, s.size) for s in keep]
    return files


class _hub_errors:
    """Turn the hub client's refusals into a DownloadError naming the fix."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, PvaSaeError):
            return False
        from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

        if isinstance(exc, GatedRepoError):
            why = (f"{self.repo_id} is gated: accept its licence on https://huggingface.co/{self.repo_id} with your "
                   f"account, then log in with `huggingface-cli login` (or set HF_TOKEN)")
        elif isinstance(exc, RepositoryNotFoundError):
            why = (f"{self.repo_id} was not found, or it is gated and no token was sent: log in with "
                   f"`huggingface-cli login` (or set HF_TOKEN) after accepting its licence on the hub")
        elif isinstance(exc, OfflineModeIsEnabled):
            why = ("HF_HUB_OFFLINE is set, so the hub is not contacted; unset it to download, or use --check to "
                   "verify the cache offline")
        else:
            why = f"{type(exc).__name__}: {exc}; check the network connection to huggingface.co"
        raise DownloadError(f"could not query {self.repo_id}: {why}") from exc


# --------------------------------------------------------------------------- downloading


def download(files: list[HubFile]) -> None:
    """Fetch ``files`` into the Hugging Face cache and prepare the datasets for offline ``load_dataset``."""
    from huggingface_hub import hf_hub_download

    for f in files:
        with _hub_errors(f.repo_id):
            hf_hub_download(repo_id=f.repo_id, filename=f.filename, repo_type=f.repo_type, revision=f.revision)
    for repo in sorted({(f.repo_id, f.role) for f in files if f.repo_type == "dataset"}):
        _prepare_dataset(*repo)


def _prepare_dataset(repo_id: str, role: str) -> None:
    try:
        import datasets
    except ImportError:
        raise DownloadError(f"{repo_id} is in the hub cache, but offline runs read it through the `datasets` "
                            f"package, which is not installed: `pip install datasets` and rerun, or point "
                            f"analysis.general_corpus at the Parquet file in the cache") from None
    with _hub_errors(repo_id):
        if role == "mbpp":
            datasets.load_dataset(repo_id, HUB_CONFIG)
        else:
            datasets.load_dataset(repo_id, split="train")


# --------------------------------------------------------------------------- checking a cache offline


def check_cache(cfg: Config, model_entry: dict[str, Any] | None, cache: str | Path | None = None
                ) -> tuple[list[tuple[HubFile, Path]], list[str]]:
    """(files present with their paths, problems) for a run of ``cfg`` from the hub cache, offline.

    The model's file list is its cached index (every shard it names must be there); datasets must also
    have the prepared copy ``datasets`` reads offline.
    """
    entry = _model_entry(cfg, model_entry)
    cache = Path(cache or default_cache())
    present: list[tuple[HubFile, Path]] = []
    problems: list[str] = []
    revision = _revision(cfg, entry)
    missing = explain_missing(entry["hf_id"], revision, "config.json", cache=cache)
    if missing:
        problems.append(missing)
    else:
        snapshot = _snapshot(cache, entry["hf_id"], "model", revision)
        names = [p.name for p in sorted(snapshot.iterdir()) if any(fnmatch.fnmatch(p.name, m) for m in MODEL_PATTERNS)]
        names += _indexed_shards(snapshot, names)
        for name in dict.fromkeys(names):
            _record(HubFile("model", entry["hf_id"], "model", name, snapshot.name), snapshot / name, present, problems)
    for f in sae_files(cfg, entry):
        why = explain_missing(f.repo_id, f.revision, f.filename, cache=cache)
        if why:
            problems.append(why)
        else:
            _record(f, _snapshot(cache, f.repo_id, "model", f.revision) / f.filename, present, problems)
    for role, repo in _corpus_repos(cfg, entry):
        why = explain_missing(repo, "main", "README.md", "dataset", cache=cache)
        if why:
            problems.append(why)
            continue
        snapshot = _snapshot(cache, repo, "dataset", "main")
        for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
            _record(HubFile(role, repo, "dataset", str(path.relative_to(snapshot)), snapshot.name), path,
                    present, problems)
        if not _prepared(repo, snapshot.name):
            problems.append(f"{repo} has no prepared copy in the datasets cache, which `datasets.load_dataset` "
                            f"needs offline")
    return present, problems


def _snapshot(cache: Path, repo_id: str, repo_type: str, revision: str) -> Path:
    folder = repo_folder(cache, repo_id, repo_type)
    commit = revision if (folder / "snapshots" / revision).is_dir() else (folder / "refs" / revision).read_text().strip()
    return folder / "snapshots" / commit


def _indexed_shards(snapshot: Path, names: list[str]) -> list[str]:
    import json

    index = snapshot / "model.safetensors.index.json"
    if not index.is_file():
        return []
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def _record(f: HubFile, path: Path, present: list, problems: list) -> None:
    if path.is_file():
        f.size = path.stat().st_size
        present.append((f, path))
    else:
        problems.append(f"{f.filename} of {f.repo_id} is named by the cache but missing (broken link {path})")


def _prepared(repo_id: str, commit: str) -> bool:
    try:
        from datasets import config as datasets_config
    except ImportError:
        return False
    owner, name = repo_id.split("/")
    root = Path(datasets_config.HF_DATASETS_CACHE) / f"{owner}___{name}"
    return any(p.is_dir() for p in root.glob(f"*/*/{commit}"))


# --------------------------------------------------------------------------- what to tell the user


def format_files(files: list[HubFile]) -> list[str]:
    """One line per file (size, repository, path) and a total per role."""
    lines = []
    for f in files:
        size = f"{f.size / 1e6:10.1f} MB" if f.size is not None else "      size ?"
        lines.append(f"{size}  {f.repo_id}  {f.filename}")
    for role in dict.fromkeys(f.role for f in files):
        total = sum(f.size or 0 for f in files if f.role == role)
        lines.append(f"{role}: {sum(f.role == role for f in files)} files, {total / 1e9:.2f} GB")
    lines.append(f"total: {len(files)} files, {sum(f.size or 0 for f in files) / 1e9:.2f} GB")
    return lines


def offline_instructions(cfg: Config) -> str:
    return (f"Every file is in the Hugging Face cache ({default_cache()}). Run offline with the same cache:\n"
            f"    HF_HUB_OFFLINE=1 pva-sae run --model {cfg.model.name}\n"
            f"(set HF_HOME, or HF_HUB_CACHE and HF_DATASETS_CACHE, the same way as for this download; keep the "
            f"same analysis.layers / SAE settings, or download again with them).")


def raise_if_incomplete(problems: list[str], cfg: Config) -> None:
    if problems:
        raise MissingInputError(f"the cache cannot serve an offline run of {cfg.model.name}: "
                                + "; ".join(dict.fromkeys(problems))
                                + f". With network access (and, for gated models, a token), run "
                                  f"`pva-sae download --model {cfg.model.name}` with the same settings")
