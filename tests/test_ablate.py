"""Directional ablation: exact weight orthogonalization for Gemma-2, its hook equivalent, the ablation stage."""

import json

import pytest
import torch

from pva_sae.config import GenerationConfig, ModelConfig, resolve_config
from pva_sae.model.generation import Generator
from pva_sae.model.hooks import AblationHook, CaptureHook, assert_fired_once, decoder_layers
from pva_sae.model.orthogonalize import orthogonalized, untie_embeddings
from pva_sae.model.registry import load_model
from pva_sae.rundir.paths import AblationPaths

PROMPTS = ["def add(a, b):", "x = 1\nwhile True:", "import os\n# list the files of a directory"]


def _model(tiny_model_dir, dtype="float32"):
    """A private copy of the tiny Gemma-2 with post-norm gains far from 1 (so (1 + w) * d differs from d)."""
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu", dtype=dtype))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in decoder_layers(loaded.model):
            for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                norm.weight.copy_(torch.randn(norm.weight.shape, generator=g))
    assert untie_embeddings(loaded.model)
    return loaded


def _direction(d_model, seed=3):
    return torch.randn(d_model, generator=torch.Generator().manual_seed(seed))


def _residual_components(loaded, direction, **ablate) -> list[float]:
    """Largest |<r, d>| / |r| over tokens, at the embeddings and at every layer's output."""
    model, n = loaded.model, loaded.n_layers
    enc = loaded.tokenizer(PROMPTS[2:], return_tensors="pt")
    d = direction / direction.norm()
    with torch.no_grad(), CaptureHook(model, 0, site="resid_pre", positions=None) as pre, \
            CaptureHook(model, list(range(n)), positions=None) as post:
        model(**enc, use_cache=False)
    rs = [pre.records[0][0][0]] + [post.records[i][0][0] for i in range(n)]
    return [float(((r @ d).abs() / r.norm(dim=-1)).max()) for r in rs]


def test_orthogonalized_weights_leave_no_component_along_d_at_any_layer(tiny_model_dir):
    loaded = _model(tiny_model_dir)
    d = _direction(loaded.d_model)
    before = _residual_components(loaded, d)
    originals = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with orthogonalized(loaded.model, d) as names:
        after = _residual_components(loaded, d)
    assert len(names) == 1 + 2 * loaded.n_layers
    assert min(before) > 1e-3                        # a random direction is there to begin with
    assert max(after) < 1e-5                         # float32: gone at the embeddings and every layer
    for k, v in loaded.model.state_dict().items():   # restored bit for bit
        assert torch.equal(v, originals[k]), k


def test_bfloat16_orthogonalization_leaves_only_rounding(tiny_model_dir):
    loaded = _model(tiny_model_dir, "bfloat16")
    d = _direction(loaded.d_model)
    before = _residual_components(loaded, d)
    with orthogonalized(loaded.model, d):
        after = _residual_components(loaded, d)
    assert max(after) < 2e-2 and max(after) < min(before) / 5   # bf16 keeps 8 bits: ~0.4% per rounding


def test_projecting_d_out_of_the_projection_outputs_is_not_enough_for_gemma2(tiny_model_dir):
    """The earlier study's edit (d itself out of the embedding, o_proj and down_proj) leaves d after the post-norms."""
    from pva_sae.model.hooks import WRITERS
    from pva_sae.model.orthogonalize import project_out

    loaded = _model(tiny_model_dir)                  # a private copy: edited for good here
    d = _direction(loaded.d_model)
    u = d / d.norm()
    arch = WRITERS["gemma2"]
    with torch.no_grad():
        embed = loaded.model.get_input_embeddings().weight
        embed.copy_(project_out(embed, u, "rows"))
        for layer in decoder_layers(loaded.model):
            for path in (arch.attn_out, arch.mlp_out):
                weight = layer.get_submodule(path).weight
                weight.copy_(project_out(weight, u, "outputs"))
    naive = _residual_components(loaded, d)
    assert naive[0] < 1e-5 and min(naive[1:]) > 1e-3


def test_generation_with_orthogonalized_weights_equals_the_write_hooks(tiny_model_dir):
    loaded = _model(tiny_model_dir)
    d = _direction(loaded.d_model)
    gen = Generator(loaded, GenerationConfig(max_new_tokens=8, stop_strings=(), backend="hf"))
    batch = [(i, 0, p) for i, p in enumerate(PROMPTS)]

    def tokens():
        return [s.raw_completion for s in gen.generate_batch(batch, 0)]

    plain = tokens()
    with orthogonalized(loaded.model, d):
        weights = tokens()
    with AblationHook(loaded.model, d, mode="writes") as hook:
        writes = tokens()
    assert weights == writes and hook.calls[0] > 0
    enc = loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        with orthogonalized(loaded.model, d):
            lw = loaded.model(**enc).logits
        with AblationHook(loaded.model, d, mode="writes") as hook:
            lh = loaded.model(**enc).logits
        assert_fired_once(hook, 1)
        with AblationHook(loaded.model, d, mode="residual") as hook:
            lr = loaded.model(**enc).logits
        assert_fired_once(hook, 1)
        l0 = loaded.model(**enc).logits
    assert torch.allclose(lw, lh, atol=1e-4)
    assert (lw - l0).abs().max() > 1e-2              # the ablation does something
    assert (lr - lw).abs().max() > 1e-3              # residual projection is another intervention with post-norms
    assert plain == tokens()                         # every hook removed, every weight restored


def test_residual_hook_removes_d_everywhere_and_tied_embeddings_are_refused(tiny_model_dir, tiny_loaded):
    loaded = _model(tiny_model_dir)
    d = _direction(loaded.d_model)
    enc = loaded.tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad(), AblationHook(loaded.model, d, mode="residual"), \
            CaptureHook(loaded.model, list(range(loaded.n_layers)), positions=None) as cap:
        loaded.model(**enc)
    u = d / d.norm()
    assert all(float((cap.records[i][0] @ u).abs().max()) < 1e-5 for i in range(loaded.n_layers))
    with pytest.raises(ValueError, match="untie_embeddings"):
        with orthogonalized(tiny_loaded.model, d):
            pass
    with pytest.raises(ValueError, match="mode"):
        AblationHook(loaded.model, d, mode="nowhere")


def _fast_vs_hf(loaded, d, batch, **gen):
    """Greedy completions with the weights orthogonalized, from the fast decoder and from generate."""
    out = {}
    for backend in ("fast", "hf"):
        g = Generator(loaded, GenerationConfig(backend=backend, stop_strings=(), **gen))
        with orthogonalized(loaded.model, d):
            out[backend] = [s.raw_completion for s in g.generate_batch(batch, 0)]
        out[backend + "_plain"] = [s.raw_completion for s in g.generate_batch(batch, 0)]
    return out


def test_the_fast_decoder_sees_the_edited_weights(tiny_model_dir):
    """The fast decoder holds references to the parameters: in-place edits (and their undoing) reach it."""
    loaded = _model(tiny_model_dir)
    got = _fast_vs_hf(loaded, _direction(loaded.d_model), [(i, 0, p) for i, p in enumerate(PROMPTS)],
                      max_new_tokens=12)
    assert got["fast"] == got["hf"] and got["fast_plain"] == got["hf_plain"]


@pytest.mark.gpu
def test_gpu_graph_decoder_with_orthogonalized_weights_equals_generate():
    """float32 on CUDA: the captured-graph decoder, created before the edit, follows the edited weights."""
    from test_fastgen import mbpp_batch

    loaded = load_model(ModelConfig(name="pva-tiny", device="cuda", dtype="float32"))
    assert untie_embeddings(loaded.model)
    d = _direction(loaded.d_model)
    got = _fast_vs_hf(loaded, d, mbpp_batch(32, start=100), max_new_tokens=128)
    assert got["fast"] == got["hf"] and got["fast_plain"] == got["hf_plain"]
    assert got["fast"] != got["fast_plain"]


@pytest.mark.gpu
def test_gpu_bfloat16_orthogonalization_of_a_gemma2_2b_shaped_model():
    """bf16 at gemma-2-2b's width (random weights, 4 layers): what is left along d is rounding."""
    from transformers import Gemma2ForCausalLM

    from pva_sae.default.tiny import tiny_gemma2_config

    cfg = tiny_gemma2_config(4096, n_layers=4, d_model=2304, n_heads=8, n_kv_heads=4, head_dim=256, d_mlp=9216)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                norm.weight.normal_()
    untie_embeddings(model)
    d = torch.randn(2304)
    u = (d / d.norm()).cuda()
    ids = torch.randint(3, 4096, (2, 64), device="cuda")
    with torch.no_grad(), orthogonalized(model, d), \
            CaptureHook(model, list(range(4)), positions=None, device="cuda") as cap:
        model(input_ids=ids)
    worst = max(float(((cap.records[i][0] @ u).abs() / cap.records[i][0].norm(dim=-1)).max()) for i in range(4))
    assert worst < 1e-2


# --------------------------------------------------------------------------- the stage

SMALL_ABLATE = ["ablation.compare_max_tasks=3", "ablation.residual_check_tasks=2"]


@pytest.fixture(scope="module")
def ablated(analysed, tmp_path_factory):
    from test_steer import _steer_copy

    from pva_sae.stages.ablate import ablate

    cfg, run, _ = _steer_copy(analysed, tmp_path_factory, "ablate")
    cfg = resolve_config(base=cfg.to_dict(), overrides=SMALL_ABLATE)
    return cfg, run, ablate(cfg, progress=False)


@pytest.mark.slow
def test_ablation_stage_end_to_end(ablated):
    cfg, run, res = ablated
    paths = AblationPaths.of(run)
    assert run.is_done("ablate") and paths.tasks.is_file()
    assert json.loads(paths.results.read_text())["experiments"] == res["experiments"]
    steering = json.loads((run.root / "steering" / "results.json").read_text())
    n_val = res["tasks"]["validation"]
    assert n_val == steering["tasks"]["validation"]              # the steering stage's task set
    for direction in ("correct", "incorrect"):
        d = res["directions"][direction]
        latent_controls = [c["latent"] for c in steering["directions"][direction]["controls"] if c["kind"] == "latent"]
        assert [c["latent"] for c in d["controls"] if c["kind"] == "latent"] == latent_controls
        assert d["control_kinds"]["random"] == steering["directions"][direction]["control_kinds"]["random"]
        assert res["residual_check"][direction]["orthogonalized"]["max"] < 1e-4
        assert res["residual_check"][direction]["original"]["max"] > 1e-3
        pairs = res["comparison"][direction]["pairs"]
        assert pairs["weights vs write_hooks"]["same_program"] == 1.0
    assert set(res["experiments"]) == {"correct_corruption", "correct_correction", "incorrect_corruption",
                                       "incorrect_correction"}
    for e in res["experiments"].values():
        assert e["n_controls"] == 4 and set(e["holm_p"]) == {"rank_p", "permutation_p", "prediction_p",
                                                             "sign_test_p", "mcnemar_p"}
    assert res["experiments"]["correct_corruption"]["n"] + res["experiments"]["correct_correction"]["n"] == n_val
    assert (paths.plots / "target_vs_controls.png").stat().st_size > 1000
    from pva_sae.stages.report import write_report

    md = write_report(run.root)[1].read_text()
    e = res["experiments"]["correct_corruption"]
    assert "## Directional ablation" in md
    assert f"| correct | corruption | {e['target']} | {e['rate']['successes']}/{e['rate']['n']} |" in md


@pytest.mark.slow
def test_ablation_resumes_and_refuses_upstream_overrides(ablated, capsys):
    from pva_sae.cli import EXIT_USER_ERROR, main

    cfg, run, res = ablated
    assert main(["ablate", "--quiet", "--run-dir", str(run.root)]) == 0
    assert "correct_corruption: target" in capsys.readouterr().out
    assert json.loads(AblationPaths.of(run).results.read_text())["tasks"]["generated"] == 0
    assert main(["ablate", "--quiet", "--run-dir", str(run.root), "--set", "steering.max_tasks=3"]) == EXIT_USER_ERROR
    assert "steering.max_tasks" in capsys.readouterr().err
