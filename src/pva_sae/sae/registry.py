"""The SAE release registry and loading by (release, layer).

The registry is data (``assets/sae_releases.json``): a release names a hub repository (or a directory
inside the package), the weight-file layout and, for GemmaScope, the canonical average-L0 folder of
every layer. ``load_sae`` resolves a (release, layer) to a file, from a local mirror of the repository,
the package or the Hugging Face hub, and reads it with :func:`pva_sae.sae.loaders.load_sae_file`.
``load_layer_sae`` does the same for a run's config, including the 'local' release (GemmaScope-format
files in a directory of one's own).
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

from pva_sae.assets_index import PACKAGE_DIR, read_registry
from pva_sae.config import Config
from pva_sae.default.hub_fixture.cache import explain_missing, hub_offline
from pva_sae.default.hub_fixture.override import apply_override
from pva_sae.errors import InputError, MissingInputError
from pva_sae.sae.base import SAE, SAEError
from pva_sae.sae.loaders import load_sae_file, read_hyperparams

log = logging.getLogger(__name__)

REGISTRY_FILE = "sae_releases.json"
WIDTH = re.compile(r"^(\d+)([km]?)$")
# The release name and file layout of GemmaScope-format SAEs of one's own, under analysis.sae_local_dir.
LOCAL_RELEASE = "local"
LOCAL_TEMPLATE = "layer_{layer}/params.npz"


# --------------------------------------------------------------------------- registry


def _registry() -> tuple[dict[str, Any], ...]:
    return apply_override(read_registry(REGISTRY_FILE, "releases"), "releases")


def list_releases() -> list[dict[str, Any]]:
    """Every registered release as a dict (a copy: mutating it does not change the registry)."""
    return [copy.deepcopy(entry) for entry in _registry()]


def release_entry(release: str) -> dict[str, Any]:
    """The registry entry of ``release``; unknown keys raise an error listing the valid ones."""
    for entry in _registry():
        if entry["key"] == release:
            return entry
    valid = ", ".join(e["key"] for e in _registry())
    raise SAEError(f"unknown SAE release {release!r}; valid releases: {valid} (see `pva-sae saes`)")


def width_to_d_sae(width: str) -> int:
    """'16k' -> 16384, '1m' -> 1048576, '32768' -> 32768 (GemmaScope names widths in powers of two)."""
    match = WIDTH.match(str(width).strip().lower())
    if not match:
        raise SAEError(f"SAE width {width!r} is not of the form '16k', '1m' or a plain number")
    number, unit = int(match.group(1)), match.group(2)
    return number * {"": 1, "k": 1024, "m": 1024 * 1024}[unit]


def _check_layer(entry: dict[str, Any], layer: int) -> None:
    n_layers = entry["n_layers"]
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise SAEError(f"layer {layer!r} is out of range for SAE release {entry['key']!r}: "
                       f"it has layers 0..{n_layers - 1}")


def canonical_l0(release: str, layer: int, width: str | None = None) -> int:
    """The canonical average-L0 folder of (release, layer, width); an error says to give ``l0`` when unknown."""
    entry = release_entry(release)
    _check_layer(entry, layer)
    width = width or entry.get("default_width")
    table = entry.get("canonical_l0", {}).get(str(width))
    if table is None or str(layer) not in table:
        known = ", ".join(sorted(entry.get("canonical_l0", {}))) or "none"
        raise SAEError(
            f"release {release!r} has no canonical L0 for layer {layer} at width {width!r} (widths with a "
            f"canonical table: {known}); give the L0 explicitly (analysis.sae_l0 / l0=N, the N of the "
            f"repository folder layer_{layer}/width_{width}/average_l0_N)")
    return int(table[str(layer)])


def resolve_sae(release: str, layer: int, width: str | None = None, l0: int | None = None) -> str:
    """Path of the weight file inside the release's repository (or package directory).

    With ``l0=None`` the canonical L0 of the layer is used; the result always names an
    ``average_l0_N`` folder, never a literal ``canonical/`` folder (some were deleted from the hub).
    """
    entry = release_entry(release)
    _check_layer(entry, layer)
    template = entry["file_template"]
    if "{width}" not in template and width is not None and width != entry.get("default_width"):
        raise SAEError(f"release {release!r} has a single width ({entry.get('default_width')}); "
                       f"got width={width!r}: leave it unset")
    if "{l0}" not in template and l0 is not None:
        raise SAEError(f"release {release!r} has no L0 choice (its file is {template}); leave l0 unset")
    width = width or entry.get("default_width")
    fields: dict[str, Any] = {"layer": layer}
    if "{width}" in template:
        width_to_d_sae(width)  # validates the form
        fields["width"] = width
    if "{l0}" in template:
        if l0 is not None and (not isinstance(l0, int) or isinstance(l0, bool) or l0 <= 0):
            raise SAEError(f"l0 must be a positive integer (the N of average_l0_N), got {l0!r}")
        fields["l0"] = l0 if l0 is not None else canonical_l0(release, layer, width)
    return template.format(**fields)


# --------------------------------------------------------------------------- loading by release


def load_sae(release: str, layer: int, *, width: str | None = None, l0: int | None = None,
             local_dir: str | Path | None = None, cache_dir: str | Path | None = None,
             local_files_only: bool = False, expected_d_model: int | None = None, device: str = "cpu",
             revision: str | None = None, strict_width: bool = False) -> SAE:
    """The SAE of ``release`` at ``layer``, from ``local_dir`` (a directory mirroring the repository
    layout), the package (embedded releases) or the Hugging Face hub (``hf_hub_download``).

    ``width`` defaults to the release's default width, ``l0`` to the layer's canonical L0.
    ``meta`` records release, layer, width, l0, whether it is canonical, the file and its sha256.
    A file whose latent count differs from the width is logged, or refused with ``strict_width`` (a run).
    """
    entry = release_entry(release)
    repo_path = resolve_sae(release, layer, width, l0)
    width = width or entry.get("default_width")
    file = _locate(entry, repo_path, local_dir, cache_dir, local_files_only, revision)
    hyperparams = None
    if entry.get("hyperparams_template"):
        hp_path = entry["hyperparams_template"].format(layer=layer)
        hyperparams = read_hyperparams(_locate(entry, hp_path, local_dir, cache_dir, local_files_only, revision))
    sae = load_sae_file(file, expected_d_model, hyperparams=hyperparams, k=entry.get("k"),
                        threshold_convention=entry.get("threshold_convention", "lm-saes"))
    _check_against_entry(entry, sae, width, file, strict_width)
    used_l0 = int(re.search(r"average_l0_(\d+)", repo_path).group(1)) if "{l0}" in entry["file_template"] else None
    sae.meta.update({"release": release, "layer": layer, "width": width, "l0": used_l0,
                     "canonical": _is_canonical(release, layer, width, used_l0), "repo": entry.get("repo"),
                     "repo_path": repo_path,
                     "revision": revision or entry.get("revision"), "site": entry.get("site")})
    return sae.to(device)


def _is_canonical(release: str, layer: int, width: str | None, l0: int | None) -> bool | None:
    """Whether (layer, width, l0) is the canonical SAE (None when the release has no L0 choice)."""
    if l0 is None:
        return None
    try:
        return canonical_l0(release, layer, width) == l0
    except SAEError:
        return False


def _locate(entry: dict[str, Any], repo_path: str, local_dir, cache_dir, local_files_only: bool,
            revision: str | None) -> Path:
    """Local path of ``repo_path`` of the release: under local_dir, in the package, or downloaded."""
    if local_dir is not None:
        file = Path(local_dir).expanduser() / repo_path
        if not file.is_file():
            source = entry.get("repo") or entry.get("path")
            raise SAEError(f"{file} does not exist: local_dir must mirror the layout of {source} "
                           f"(<local_dir>/{repo_path}); download that file into it or fix local_dir")
        return file
    if entry.get("path"):
        file = PACKAGE_DIR / entry["path"] / repo_path
        if not file.is_file():
            raise SAEError(f"the embedded SAEs of {entry['key']!r} are not built ({file} is missing); build them "
                           f"with `{entry.get('build', 'python scripts/train_default.py')}`")
        return file
    return Path(_hub_download(entry["repo"], repo_path, revision or entry.get("revision"), cache_dir,
                              local_files_only))


def _hub_download(repo: str, filename: str, revision: str | None, cache_dir, local_files_only: bool) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise SAEError(f"downloading {repo}/{filename} needs huggingface_hub: `pip install 'pva-sae[hub]'` "
                       f"(or huggingface_hub), or pass local_dir= a directory mirroring {repo}") from exc
    try:
        return hf_hub_download(repo_id=repo, filename=filename, revision=revision,
                               cache_dir=str(Path(cache_dir).expanduser()) if cache_dir else None,
                               local_files_only=local_files_only)
    except Exception as exc:  # the hub raises many types (offline, gated, missing file, HTTP)
        if local_files_only or hub_offline():
            why = explain_missing(repo, revision, filename, cache=cache_dir) or f"{type(exc).__name__}: {exc}"
            hint = (f"{why}, and the hub is not contacted (HF_HUB_OFFLINE / model.local_files_only); download it "
                    f"where there is network (`pva-sae download --model MODEL` fetches every file a run needs)")
        else:
            hint = (f"{type(exc).__name__}: {exc}; check the network, the revision and, for gated repositories, "
                    f"`huggingface-cli login` (or HF_TOKEN)")
        raise SAEError(f"could not fetch {repo}/{filename} from the Hugging Face hub: {hint}; or pass "
                       f"local_dir= a directory mirroring {repo}") from exc


def _check_against_entry(entry: dict[str, Any], sae: SAE, width: str | None, file: Path, strict_width: bool) -> None:
    if sae.d_model != entry["d_model"]:
        raise SAEError(f"{file} has d_model {sae.d_model} but release {entry['key']!r} is for d_model "
                       f"{entry['d_model']}: the file belongs to another release")
    want = entry.get("d_sae") or (width_to_d_sae(width) if width else None)
    if want is not None and sae.d_sae != want and not strict_width:
        log.warning("%s has %d latents, not the %d of width %s", file, sae.d_sae, want, width)
    elif want is not None and sae.d_sae != want:
        raise SAEError(f"{file} has {sae.d_sae} latents but release {entry['key']!r} at width {width} has {want}: "
                       f"the file is not the SAE its path names (another width or release, or a damaged copy); "
                       f"delete it and download it again")


# --------------------------------------------------------------------------- a run's SAEs


def resolve_release(cfg: Config, model_key: str) -> str:
    """``analysis.sae_release``, or with 'auto' the first registered release for ``model_key``."""
    if cfg.analysis.sae_release != "auto":
        return cfg.analysis.sae_release
    matches = [r["key"] for r in list_releases() if model_key in r.get("models", [r.get("model")])]
    if not matches:
        raise InputError(f"no SAE release is registered for model {model_key!r}; pass --set analysis.sae_release=... "
                         f"(one of: {', '.join(r['key'] for r in list_releases())})")
    return matches[0]


def load_layer_sae(cfg: Config, release: str, layer: int, d_model: int) -> SAE:
    """A registered release, or 'local': GemmaScope-format files at <sae_local_dir>/layer_{L}/params.npz."""
    if release == LOCAL_RELEASE:
        if not cfg.analysis.sae_local_dir:
            raise InputError("analysis.sae_release='local' needs analysis.sae_local_dir (a directory holding "
                             f"{LOCAL_TEMPLATE})")
        path = Path(cfg.analysis.sae_local_dir).expanduser() / LOCAL_TEMPLATE.format(layer=layer)
        if not path.is_file():
            raise MissingInputError(f"no SAE for layer {layer}: {path} is missing (expected {LOCAL_TEMPLATE} under "
                                    "analysis.sae_local_dir, or restrict analysis.layers)")
        sae = load_sae_file(path, expected_d_model=d_model)
        sae.meta.update({"release": LOCAL_RELEASE, "layer": layer, "canonical": False})
        return sae
    return load_sae(release, layer, width=cfg.analysis.sae_width, l0=cfg.analysis.sae_l0,
                    local_dir=cfg.analysis.sae_local_dir, expected_d_model=d_model,
                    local_files_only=cfg.model.local_files_only, strict_width=True)
