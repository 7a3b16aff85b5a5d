"""Sharing a run's latents: SAELens ids, Neuronpedia sources and pages, a Neuronpedia list export.

Pure functions over a release's registry entry (``assets/sae_releases.json``) and an SAE's ``meta``
(``layer``, ``width``, ``l0``, ``canonical`` as :func:`pva_sae.sae.registry.load_sae` records them):

* ``saelens_id``: the ``(release, sae_id)`` that ``sae_lens.SAE.from_pretrained`` takes for the same
  file, e.g. ``("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")``, or by L0
  ``("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")``; LlamaScope
  ``("llama_scope_lxr_8x", "l12r_8x")``. The templates are the ids of SAELens' ``pretrained_saes.yaml``.
* ``neuronpedia_source``: Neuronpedia's model id and source (``gemma-2-2b`` / ``12-gemmascope-res-16k``,
  ``llama3.1-8b`` / ``12-llamascope-res-32k``); GemmaScope pages exist for the canonical SAEs only.
  A latent's page is ``https://www.neuronpedia.org/<model>/<source>/<index>``.
* ``neuronpedia_list``: the body Neuronpedia's list endpoint (``POST /api/list/new-with-features``)
  takes: ``{"name", "description", "features": [{"modelId", "layer", "index", "description"}]}``, where
  ``layer`` holds the source id (Neuronpedia's name for it); ``quick_list_url`` opens the same latents
  as a quick list without an account. ``check_neuronpedia_list`` validates such a body.

Releases without these registry fields (the embedded default, ``local`` SAEs) have neither id: their
latents have no public page.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

from pva_sae.errors import InputError

NEURONPEDIA = "https://www.neuronpedia.org"
PAGE = NEURONPEDIA + "/{model}/{source}/{index}"
QUICK_LIST = NEURONPEDIA + "/quick-list/?name={name}&features={features}"
# Model ids and sources are lowercase words joined by '-', '.' or '_' (e.g. llama3.1-8b, 12-gemmascope-res-16k).
ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
LIST_KEYS = ("name", "description", "features")
FEATURE_KEYS = ("modelId", "layer", "index", "description")


def _fields(meta: dict[str, Any]) -> dict[str, Any]:
    return {"layer": int(meta["layer"]), "width": meta.get("width"), "l0": meta.get("l0")}


def saelens_id(entry: dict[str, Any] | None, meta: dict[str, Any]) -> dict[str, str] | None:
    """``{"release", "sae_id"}`` of the SAE in SAELens, or None when SAELens does not list it.

    A canonical SAE (or one of a release without an L0 choice, ``canonical`` None) gets the canonical
    id; another L0 the per-L0 id when the release has one.
    """
    spec = (entry or {}).get("saelens")
    if not spec:
        return None
    fields = _fields(meta)
    if meta.get("canonical") is False:
        if "release_by_l0" not in spec or fields["l0"] is None:
            return None
        return {"release": spec["release_by_l0"], "sae_id": spec["sae_id_by_l0"].format(**fields)}
    return {"release": spec["release"], "sae_id": spec["sae_id"].format(**fields)}


def neuronpedia_source(entry: dict[str, Any] | None, meta: dict[str, Any]) -> dict[str, str] | None:
    """``{"model", "source"}`` of the SAE on Neuronpedia, or None when it has no pages there."""
    spec = (entry or {}).get("neuronpedia_ids")
    if not spec or (spec.get("canonical_only") and meta.get("canonical") is False):
        return None
    return {"model": spec["model"], "source": spec["source"].format(**_fields(meta))}


def neuronpedia_url(model: str, source: str, index: int) -> str:
    """The page of latent ``index`` of ``source`` on Neuronpedia."""
    if not (ID.match(model) and ID.match(source)) or not isinstance(index, int) or index < 0:
        raise InputError(f"not a Neuronpedia feature: model {model!r}, source {source!r}, index {index!r} "
                         f"(ids are lowercase, e.g. gemma-2-2b / 12-gemmascope-res-16k; the index is >= 0)")
    return PAGE.format(model=model, source=source, index=index)


def layer_sharing(entry: dict[str, Any] | None, meta: dict[str, Any]) -> dict[str, Any]:
    """Per analysed layer: ``{"saelens": {...} | None, "neuronpedia": {...} | None}`` (for summary.json)."""
    return {"saelens": saelens_id(entry, meta), "neuronpedia": neuronpedia_source(entry, meta)}


def link_fn(entry: dict[str, Any] | None, metas: dict[int, dict[str, Any]]):
    """``link(layer, index) -> url | None`` over the analysed layers' SAE metas; None when no layer has pages."""
    sources = {layer: neuronpedia_source(entry, meta) for layer, meta in metas.items()}
    if not any(sources.values()):
        return None

    def link(layer: int, index: int) -> str | None:
        source = sources.get(layer)
        return neuronpedia_url(source["model"], source["source"], int(index)) if source else None

    return link


def feature(source: dict[str, str], index: int, description: str) -> dict[str, Any]:
    """One entry of a Neuronpedia list (``FEATURE_KEYS``)."""
    return {"modelId": source["model"], "layer": source["source"], "index": int(index), "description": description}


def latent_description(row: dict[str, Any]) -> str:
    """A one-line description of a ranked-latent row (direction, separation, Welch t)."""
    parts = [f"pva-sae L{row['layer']}:{row['latent']}", f"{row['direction']} direction"]
    key = "correct" if row["direction"] == "correct" else "incorrect"
    for name, label in ((f"sep_{key}", "separation"), (f"t_{key}", "t")):
        if isinstance(row.get(name), (int, float)):
            parts.append(f"{label} {row[name]:.3f}")
    if row.get("role"):
        parts.append(f"chosen as {row['role']}")
    return ", ".join(parts)


def neuronpedia_list(name: str, description: str, rows: Iterable[dict[str, Any]],
                     sources: dict[int, dict[str, str] | None]) -> dict[str, Any]:
    """The list body for ``rows`` (ranked-latent rows: ``layer``, ``latent``, ``direction`` ...), once per
    (layer, latent) in the order given; rows of layers without a Neuronpedia source are left out."""
    features, seen = [], set()
    for row in rows:
        key = (int(row["layer"]), int(row["latent"]))
        source = sources.get(key[0])
        if source is None or key in seen:
            continue
        seen.add(key)
        features.append(feature(source, key[1], latent_description(row)))
    body = {"name": name, "description": description, "features": features}
    check_neuronpedia_list(body)
    return body


def quick_list_url(body: dict[str, Any]) -> str | None:
    """A neuronpedia.org quick-list link showing the list's latents (None for an empty list)."""
    if not body["features"]:
        return None
    features = [{"modelId": f["modelId"], "layer": f["layer"], "index": str(f["index"])} for f in body["features"]]
    return QUICK_LIST.format(name=urllib.parse.quote(body["name"]),
                             features=urllib.parse.quote(json.dumps(features, separators=(",", ":"))))


def check_neuronpedia_list(body: Any) -> None:
    """Raise an ``InputError`` naming the first problem when ``body`` is not a Neuronpedia list body."""
    if not isinstance(body, dict) or set(body) != set(LIST_KEYS):
        got = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise InputError(f"a Neuronpedia list is an object with exactly the keys {', '.join(LIST_KEYS)}; got {got}")
    if not isinstance(body["name"], str) or not body["name"].strip():
        raise InputError("a Neuronpedia list needs a non-empty name")
    if not isinstance(body["description"], str):
        raise InputError("a Neuronpedia list's description must be a string")
    if not isinstance(body["features"], list):
        raise InputError("a Neuronpedia list's features must be a list")
    seen = set()
    for i, feat in enumerate(body["features"]):
        if not isinstance(feat, dict) or set(feat) != set(FEATURE_KEYS):
            raise InputError(f"feature {i} must have exactly the keys {', '.join(FEATURE_KEYS)}; got {feat!r}")
        neuronpedia_url(feat["modelId"], feat["layer"], feat["index"])  # validates ids and index
        if not isinstance(feat["description"], str):
            raise InputError(f"feature {i}: description must be a string")
        key = (feat["modelId"], feat["layer"], feat["index"])
        if key in seen:
            raise InputError(f"feature {i} repeats {key}: a list holds each latent once")
        seen.add(key)


LATENT = re.compile(r"\bL(\d+):(\d+)\b")  # how reports and tables name a latent: L<layer>:<index>


def link_from_sharing(sharing: dict[str, dict[str, Any]] | None):
    """``link(layer, index) -> url | None`` from summary.json's ``sharing``; None when no layer has pages."""
    sources = {int(layer): ids.get("neuronpedia") for layer, ids in (sharing or {}).items()}
    if not any(sources.values()):
        return None

    def link(layer: int, index: int) -> str | None:
        source = sources.get(int(layer))
        return neuronpedia_url(source["model"], source["source"], int(index)) if source else None

    return link


def link_latents(text: str, link, fmt: str = "html") -> str:
    """Every ``L<layer>:<index>`` in ``text`` as a link to its Neuronpedia page (``fmt`` 'html' or 'markdown');
    names of layers without pages, and all of them when ``link`` is None, are left as they are. ``text`` is
    already escaped for HTML."""
    if link is None:
        return text

    def one(match: re.Match) -> str:
        url = link(int(match.group(1)), int(match.group(2)))
        if url is None:
            return match.group(0)
        return f"<a href='{url}'>{match.group(0)}</a>" if fmt == "html" else f"[{match.group(0)}]({url})"

    return LATENT.sub(one, text)
