"""SAELens ids, Neuronpedia sources and pages, and the Neuronpedia list export."""

import json
import urllib.parse

import pytest

from pva_sae.errors import InputError
from pva_sae.rundir.artifacts import read_neuronpedia_list, write_neuronpedia_list
from pva_sae.rundir.paths import AnalysisPaths
from pva_sae.sae.neuronpedia import (
    check_neuronpedia_list,
    layer_sharing,
    link_fn,
    link_from_sharing,
    link_latents,
    neuronpedia_list,
    neuronpedia_source,
    neuronpedia_url,
    quick_list_url,
    saelens_id,
)
from pva_sae.sae.registry import canonical_l0, release_entry


def meta(layer, width=None, l0=None, canonical=None):
    return {"layer": layer, "width": width, "l0": l0, "canonical": canonical}


def test_gemma_2b_layer_12_canonical_ids():
    entry = release_entry("gemma-scope-2b-pt-res")
    m = meta(12, "16k", canonical_l0("gemma-scope-2b-pt-res", 12), True)
    # The SAELens pretrained_saes.yaml entry: id layer_12/width_16k/canonical, path .../average_l0_82,
    # neuronpedia gemma-2-2b/12-gemmascope-res-16k.
    assert m["l0"] == 82
    assert saelens_id(entry, m) == {"release": "gemma-scope-2b-pt-res-canonical",
                                    "sae_id": "layer_12/width_16k/canonical"}
    assert neuronpedia_source(entry, m) == {"model": "gemma-2-2b", "source": "12-gemmascope-res-16k"}
    assert link_fn(entry, {12: m})(12, 1234) == "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/1234"


def test_other_gemma_ids():
    entry = release_entry("gemma-scope-2b-pt-res")
    assert neuronpedia_source(entry, meta(5, "1m", 114, True))["source"] == "5-gemmascope-res-1m"
    # Another L0: SAELens lists it in the non-canonical release; no Neuronpedia page is claimed.
    other = meta(12, "16k", 22, False)
    assert saelens_id(entry, other) == {"release": "gemma-scope-2b-pt-res", "sae_id": "layer_12/width_16k/average_l0_22"}
    assert neuronpedia_source(entry, other) is None and link_fn(entry, {12: other}) is None
    nine = release_entry("gemma-scope-9b-pt-res")
    assert layer_sharing(nine, meta(20, "131k", 80, True)) == {
        "saelens": {"release": "gemma-scope-9b-pt-res-canonical", "sae_id": "layer_20/width_131k/canonical"},
        "neuronpedia": {"model": "gemma-2-9b", "source": "20-gemmascope-res-131k"}}


def test_llamascope_ids():
    entry = release_entry("llamascope-8b-res")
    m = meta(31, "32k", None, None)
    assert saelens_id(entry, m) == {"release": "llama_scope_lxr_8x", "sae_id": "l31r_8x"}
    assert neuronpedia_source(entry, m) == {"model": "llama3.1-8b", "source": "31-llamascope-res-32k"}


def test_embedded_default_has_no_public_ids():
    entry = release_entry("pva-tiny-res")
    assert layer_sharing(entry, meta(3)) == {"saelens": None, "neuronpedia": None}
    assert layer_sharing(None, meta(3)) == {"saelens": None, "neuronpedia": None}  # 'local' SAEs
    assert link_fn(entry, {3: meta(3)}) is None


def rows():
    return [{"layer": 12, "latent": 7, "direction": "correct", "sep_correct": 0.2214, "t_correct": 5.09,
             "role": "steering (correct)"},
            {"layer": 12, "latent": 7, "direction": "correct", "sep_correct": 0.2214},  # repeated: kept once
            {"layer": 3, "latent": 1, "direction": "incorrect", "sep_incorrect": 0.1},   # layer without pages
            {"layer": 19, "latent": 5441, "direction": "incorrect", "t_incorrect": 5.68}]


def sources():
    entry = release_entry("gemma-scope-2b-pt-res")
    return {12: neuronpedia_source(entry, meta(12, "16k", 82, True)), 3: None,
            19: neuronpedia_source(entry, meta(19, "16k", 73, True))}


def test_list_export_is_the_neuronpedia_list_body(tmp_path):
    body = neuronpedia_list("pva-sae run", "top latents", rows(), sources())
    assert set(body) == {"name", "description", "features"}
    assert body["features"] == [
        {"modelId": "gemma-2-2b", "layer": "12-gemmascope-res-16k", "index": 7,
         "description": "pva-sae L12:7, correct direction, separation 0.221, t 5.090, chosen as steering (correct)"},
        {"modelId": "gemma-2-2b", "layer": "19-gemmascope-res-16k", "index": 5441,
         "description": "pva-sae L19:5441, incorrect direction, t 5.680"}]
    paths = AnalysisPaths(tmp_path)
    write_neuronpedia_list(paths, body)
    assert read_neuronpedia_list(paths) == body
    url = quick_list_url(body)
    assert url.startswith("https://www.neuronpedia.org/quick-list/?name=pva-sae%20run&features=")
    listed = json.loads(urllib.parse.unquote(url.split("features=")[1]))
    assert listed[1] == {"modelId": "gemma-2-2b", "layer": "19-gemmascope-res-16k", "index": "5441"}
    assert quick_list_url(neuronpedia_list("empty", "", rows()[2:3], sources())) is None


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b.pop("name"), "exactly the keys"),
    (lambda b: b.update(extra=1), "exactly the keys"),
    (lambda b: b.update(name=" "), "non-empty name"),
    (lambda b: b["features"][0].update(index=-1), "not a Neuronpedia feature"),
    (lambda b: b["features"][0].update(index="7"), "not a Neuronpedia feature"),
    (lambda b: b["features"][0].update(layer="12 gemmascope"), "not a Neuronpedia feature"),
    (lambda b: b["features"][0].pop("description"), "exactly the keys"),
    (lambda b: b["features"].append(dict(b["features"][0])), "repeats"),
])
def test_invalid_lists_are_refused(tmp_path, mutate, message):
    body = neuronpedia_list("pva-sae run", "top latents", rows(), sources())
    mutate(body)
    with pytest.raises(InputError, match=message):
        check_neuronpedia_list(body)
    with pytest.raises(InputError, match=message):
        write_neuronpedia_list(AnalysisPaths(tmp_path), body)
    assert not (tmp_path / "neuronpedia.json").exists()


def test_page_url_checks_its_parts():
    assert neuronpedia_url("llama3.1-8b", "0-llamascope-res-32k", 0) == \
        "https://www.neuronpedia.org/llama3.1-8b/0-llamascope-res-32k/0"
    with pytest.raises(InputError):
        neuronpedia_url("Gemma 2", "12-gemmascope-res-16k", 1)


def test_latent_names_become_links_where_pages_exist():
    entry = release_entry("gemma-scope-2b-pt-res")
    sharing = {"12": layer_sharing(entry, meta(12, "16k", 82, True)), "3": layer_sharing(None, meta(3))}
    link = link_from_sharing(sharing)
    text = "steering L12:7 against L3:1 (L12:70 and XL12:7 too)"
    page = "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/"
    assert link_latents(text, link) == (f"steering <a href='{page}7'>L12:7</a> against L3:1 "
                                        f"(<a href='{page}70'>L12:70</a> and XL12:7 too)")
    assert link_latents(text, link, "markdown").startswith(f"steering [L12:7]({page}7) against L3:1")
    assert link_latents(text, None) == text
    assert link_from_sharing({"3": layer_sharing(None, meta(3))}) is None and link_from_sharing(None) is None


def test_report_renders_links_only_with_pages(tmp_path):
    from pva_sae.stages.report import Block, Finding, render_html, render_markdown

    blocks = [Block("p", "chosen L12:7"), Block("table", headers=["latent", "t"], rows=[["L12:7", "5.09"]]),
              Block("summary", "Summary", findings=[Finding("L12:7 predicts", "see L12:7")])]
    link = link_from_sharing({"12": layer_sharing(release_entry("gemma-scope-2b-pt-res"), meta(12, "16k", 82, True))})
    page = "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/7"
    assert render_html(blocks, link).count(f"<a href='{page}'>L12:7</a>") == 4
    assert render_markdown(blocks, tmp_path, link).count(f"[L12:7]({page})") == 4
    assert "href" not in render_html(blocks) and "](" not in render_markdown(blocks, tmp_path)


def test_local_saes_export_an_empty_list(analysed):
    """SAEs without public pages (here 'local'; the embedded default likewise): ids None, an empty list."""
    _, run, summary, _ = analysed
    assert all(ids == {"saelens": None, "neuronpedia": None} for ids in summary["sharing"].values())
    assert read_neuronpedia_list(AnalysisPaths.of(run))["features"] == []
    assert summary["neuronpedia_list"]["n_features"] == 0 and summary["neuronpedia_list"]["quick_list"] is None
    assert all(r["neuronpedia"] is None for r in summary["top"]["correct"])
    from pva_sae.stages.report import sharing_text

    assert sharing_text(summary).startswith("The SAEs of release local are not public")
