"""Attention to prompt sections: sections from the template, masses from eager attention, the stage."""

import json

import numpy as np
import pytest
import torch

from pva_sae.config import resolve_config
from pva_sae.data import mbpp
from pva_sae.rundir.artifacts import load_attention_masses
from pva_sae.rundir.paths import AttentionPaths
from pva_sae.stages.attention import (
    SECTIONS,
    differences,
    encode_sections,
    last_token_masses,
    section_spans,
    task_sections,
)

CHANGED = "### Tests {{given}}\n{tests}\n\n### Task\n{text}\n{initiator}"


def _decoded(tokenizer, prompt, onehot):
    """Per section, the text of its tokens."""
    ids = tokenizer(prompt)["input_ids"]
    return {s: tokenizer.decode([i for i, row in zip(ids, onehot) if row[k]]) for k, s in enumerate(SECTIONS)}


@pytest.mark.parametrize("template", [None, CHANGED])
def test_sections_are_found_from_the_template(template, tiny_loaded):
    task = mbpp.load_tasks("packaged")[0]
    overrides = [] if template is None else [f"prompt.template={template}"]
    cfg = resolve_config(overrides=overrides + ["prompt.initiator=# Your code here"])
    prompt, spans = task_sections(task, cfg)
    onehot = encode_sections(tiny_loaded.tokenizer, prompt, spans)
    assert onehot.sum(axis=1).tolist() == [1] * onehot.shape[0]          # one section per token
    assert onehot[0, SECTIONS.index("bos")] == 1 and onehot[:, SECTIONS.index("bos")].sum() == 1
    text = _decoded(tiny_loaded.tokenizer, prompt, onehot)
    assert task.test_list[0].strip()[7:] in text["tests"] and task.test_list[-1].strip()[-5:] in text["tests"]
    assert task.text.strip()[5:30] in text["description"] and "assert" not in text["description"]
    assert "Your code here" in text["initiator"] and "assert" not in text["initiator"]
    if template == CHANGED:
        assert "Tests {given}" in text["other"] and "Task" in text["other"]
        assert prompt.index(task.test_list[0].strip()) < prompt.index(task.text.strip()[:20])


def test_section_spans_walk_the_template():
    prompt, spans = section_spans("A{text}B{{c}}{tests}{initiator}", {"text": "xy", "tests": "t", "initiator": "#"})
    assert prompt == "AxyB{c}t#"
    assert spans == {"description": [(1, 3)], "tests": [(7, 8)], "initiator": [(8, 9)]}


def test_masses_sum_to_one_per_head_with_padding(tiny_loaded):
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    cfg = resolve_config()
    tasks = mbpp.load_tasks("packaged")[:3]
    built = [task_sections(t, cfg) for t in tasks]
    enc = tok([p for p, _ in built], return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()                           # rows of different lengths: padded
    with torch.no_grad():
        out = model(**enc, output_attentions=True, use_cache=False)
    masses = last_token_masses(out.attentions, enc["attention_mask"], [encode_sections(tok, p, s) for p, s in built])
    assert masses.shape == (3, tiny_loaded.n_layers, model.config.num_attention_heads, len(SECTIONS))
    np.testing.assert_allclose(masses.sum(axis=-1), 1.0, atol=1e-5)
    assert (masses >= 0).all() and masses[..., SECTIONS.index("tests")].mean() > 0


def test_eager_weights_have_the_sliding_window_applied(tiny_model_dir):
    from pva_sae.config import ModelConfig
    from pva_sae.model.registry import load_model

    loaded = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    loaded.model.config.sliding_window = 3
    enc = loaded.tokenizer(["def add(a, b):\n    return a + b"], return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(**enc, output_attentions=True, use_cache=False)
    kinds = loaded.model.config.layer_types
    for layer, att in enumerate(out.attentions):
        old = att[0, :, -1, :-3]                                          # keys outside a window of 3
        if kinds[layer] == "sliding_attention":
            assert float(old.abs().max()) == 0.0
        else:
            assert float(old.sum()) > 0.0
    assert "sliding_attention" in kinds and "full_attention" in kinds


@pytest.mark.gpu
def test_gpu_bfloat16_masses_of_the_default_model_sum_to_one():
    """bf16 on CUDA: eager weights come back in bf16 (softmax in float32, then cast), so sums hold to rounding."""
    from pva_sae.config import ModelConfig
    from pva_sae.model.registry import load_model

    loaded = load_model(ModelConfig(name="pva-tiny", device="cuda", dtype="bfloat16"))
    cfg = resolve_config()
    built = [task_sections(t, cfg) for t in mbpp.load_tasks("packaged")[:16]]
    enc = loaded.tokenizer([p for p, _ in built], return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        out = loaded.model(**enc, output_attentions=True, use_cache=False)
    masses = last_token_masses(out.attentions, enc["attention_mask"],
                               [encode_sections(loaded.tokenizer, p, s) for p, s in built])
    np.testing.assert_allclose(masses.sum(axis=-1), 1.0, atol=2e-2)


def test_differences_are_paired_by_task():
    rng = np.random.default_rng(0)
    base = rng.dirichlet(np.ones(len(SECTIONS)), size=(20, 2, 3))           # (n, L, H, S)
    steered = base.copy()
    steered[:, 1, 2, SECTIONS.index("tests")] += 0.1
    steered[:, 1, 2, SECTIONS.index("bos")] -= 0.1
    res = differences(steered, base, n_resamples=200, seed=0, level=0.95)
    tests = res["per_head"]["tests"]
    assert tests["estimate"][1][2] == pytest.approx(0.1) and tests["low"][1][2] == pytest.approx(0.1)
    assert tests["estimate"][0][0] == pytest.approx(0.0)
    assert res["overall"]["tests"]["estimate"] == pytest.approx(0.1 / 6)
    assert res["per_layer"]["bos"][1]["estimate"] == pytest.approx(-0.1 / 3)


# --------------------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def read(analysed, tmp_path_factory):
    from test_steer import _steer_copy

    from pva_sae.stages.attention import attention

    cfg, run, steered = _steer_copy(analysed, tmp_path_factory, "attention")
    cfg = resolve_config(base=cfg.to_dict(), overrides=["attention.bootstrap_resamples=200"])
    return cfg, run, steered, attention(cfg, progress=False)


@pytest.mark.slow
def test_attention_stage_end_to_end(read, capsys):
    from pva_sae.cli import main

    cfg, run, steered, res = read
    paths = AttentionPaths.of(run)
    assert run.is_done("attention") and res["sums_to_one"] < 1e-5
    assert json.loads(paths.results.read_text())["differences"] == res["differences"]
    masses, task_ids, sections = load_attention_masses(paths)
    assert sections == list(SECTIONS) and set(masses) == {"baseline", "steer_correct", "steer_incorrect"}
    assert masses["baseline"].shape == (len(task_ids), res["n_layers"], res["n_heads"], len(SECTIONS))
    for direction in ("correct", "incorrect"):
        assert res["steering"][direction]["alpha"] == steered["directions"][direction]["target"]["alpha_abs"]
        d = res["differences"][direction]
        assert set(d["overall"]) == set(SECTIONS) and d["n"] == len(task_ids)
        assert np.asarray(d["per_head"]["tests"]["estimate"]).shape == (res["n_layers"], res["n_heads"])
        assert abs(sum(d["overall"][s]["estimate"] for s in SECTIONS)) < 1e-5   # masses move, their sum stays 1
    assert not torch.equal(masses["baseline"], masses["steer_correct"])
    for name in ("sections.png", "tests_by_head.png"):
        assert (paths.plots / name).stat().st_size > 1000
    from pva_sae.stages.report import write_report

    md = write_report(run.root)[1].read_text()
    assert "## Attention to prompt sections" in md and "| baseline |" in md
    assert main(["attention", "--quiet", "--run-dir", str(run.root)]) == 0
    assert "steering correct: bos" in capsys.readouterr().out
