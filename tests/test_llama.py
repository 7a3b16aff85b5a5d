"""Llama-3.1-8B with LlamaScope: the loader against SAELens' own conversion, and the pipeline on a tiny Llama.

The fixture (written by ``write_fixture`` from its seed into a temporary directory) is a LlamaScope checkpoint at tiny shapes in the
repository's real layout (``Llama3_1-8B-Base-L3R-8x/hyperparams.json`` and ``checkpoints/final.safetensors``,
torch Linear keys), with ``saelens_expected.npz``: what SAELens' ``SAE.from_pretrained("llama_scope_lxr_8x",
"l3r_8x")`` returned for those files (weights, and encode / decode of the stored inputs). Regenerate it
with SAELens installed: ``python tests/test_llama.py``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pva_sae.sae.jumprelu import JumpReLUSAE
from pva_sae.sae.loaders import load_sae_file
from pva_sae.sae.registry import load_sae

FIXTURE = Path(__file__).parent / "fixtures" / "llamascope"
LAYER, D_MODEL, D_SAE = 3, 16, 128  # 8x expansion, as the LXR-8x release
FOLDER = f"Llama3_1-8B-Base-L{LAYER}R-8x"
# SAELens pretrained_saes.yaml, llama_scope_lxr_8x / l3r_8x: norm_scaling_factor 20.177339901477833
# = sqrt(4096) / 3.171875. The fixture's average input norm gives the same factor at d_model 16.
NORM_IN = math.sqrt(D_MODEL) / 20.177339901477833


# --------------------------------------------------------------------------- the fixture


def write_fixture(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A LlamaScope layer folder with the keys and hyperparams fields of the released files."""
    g = torch.Generator().manual_seed(seed)
    state = {"encoder.weight": torch.randn(D_SAE, D_MODEL, generator=g) / math.sqrt(D_MODEL),   # (d_sae, d_model)
             "encoder.bias": torch.randn(D_SAE, generator=g) * 0.1,
             "decoder.weight": torch.randn(D_MODEL, D_SAE, generator=g) * 0.1,                  # (d_model, d_sae)
             "decoder.bias": torch.randn(D_MODEL, generator=g) * 0.01}
    hp = {"d_model": D_MODEL, "d_sae": D_SAE, "hook_point_in": f"blocks.{LAYER}.hook_resid_post",
          "hook_point_out": f"blocks.{LAYER}.hook_resid_post", "use_decoder_bias": True,
          "apply_decoder_bias_to_pre_encoder": False, "act_fn": "jumprelu", "jump_relu_threshold": 0.05,
          "top_k": 8, "norm_activation": "dataset-wise",
          "dataset_average_activation_norm": {"in": NORM_IN, "out": NORM_IN},
          "sparsity_include_decoder_norm": True, "init_decoder_norm": 0.5, "decoder_exactly_fixed_norm": False}
    folder = root / FOLDER
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(state, str(folder / "checkpoints" / "final.safetensors"))
    (folder / "hyperparams.json").write_text(json.dumps(hp, indent=2) + "\n")
    x = torch.randn(32, D_MODEL, generator=g) * (NORM_IN / math.sqrt(D_MODEL))  # residual-sized inputs
    return {"x": x.numpy()}


def saelens_load(root: Path):
    """SAELens' ``SAE.from_pretrained("llama_scope_lxr_8x", "l{L}r_8x")``, its hub downloads served from ``root``."""
    import sae_lens.loading.pretrained_sae_loaders as loaders
    from sae_lens import SAE

    def local_download(repo_id, filename, subfolder=None, **_):
        assert repo_id == "fnlp/Llama3_1-8B-Base-LXR-8x", repo_id
        return str(root / (subfolder or "") / filename)

    original = loaders.hf_hub_download
    loaders.hf_hub_download = local_download
    try:
        return SAE.from_pretrained("llama_scope_lxr_8x", f"l{LAYER}r_8x", device="cpu", dtype="float32")
    finally:
        loaders.hf_hub_download = original


def saelens_outputs(sae, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        xt = torch.from_numpy(x)
        acts = sae.encode(xt)
        out = {"acts": acts, "recon": sae.decode(acts)}
        out.update({name: getattr(sae, name) for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
    return {k: v.detach().float().numpy() for k, v in out.items()}


def ours(root: Path):
    return load_sae("llamascope-8b-res", LAYER, local_dir=root, expected_d_model=None)


def compare(sae, expected: dict[str, np.ndarray]) -> None:
    assert isinstance(sae, JumpReLUSAE)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        np.testing.assert_allclose(getattr(sae, name).numpy(), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    x = torch.from_numpy(expected["x"])
    acts = sae.encode(x)
    np.testing.assert_array_equal(acts.numpy() > 0, expected["acts"] > 0)
    np.testing.assert_allclose(acts.numpy(), expected["acts"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sae.decode(acts).numpy(), expected["recon"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- loader vs SAELens


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory) -> Path:
    """The LlamaScope layer folder, written from its seed (deterministic: the files SAELens read for the stored
    outputs); only SAELens' outputs are kept in the repository."""
    root = tmp_path_factory.mktemp("llamascope")
    write_fixture(root)
    return root


def test_llamascope_loader_matches_saelens_stored_outputs(monkeypatch, checkpoint_root):
    monkeypatch.setattr("pva_sae.sae.registry._registry", _with_fixture_width())
    expected = dict(np.load(FIXTURE / "saelens_expected.npz"))
    sae = ours(checkpoint_root)
    compare(sae, expected)
    l0 = float((expected["acts"] > 0).sum(1).mean())
    assert 2 <= l0 <= 40, l0  # the fixture exercises both sides of the threshold
    assert sae.meta["preprocessing"]["threshold_convention"] == "saelens"
    assert sae.meta["preprocessing"]["input_scale"] == pytest.approx(20.177339901477833)


def test_the_lm_saes_reading_of_the_same_files_differs(checkpoint_root):
    """Read as lm-saes' training-space threshold (times decoder norms), the files fire far more latents: the
    registry's 'saelens' convention is what makes the released SAEs sparse (SAELens PR #483)."""
    expected = dict(np.load(FIXTURE / "saelens_expected.npz"))
    sae = load_sae_file(checkpoint_root / FOLDER / "checkpoints" / "final.safetensors")
    acts = sae.encode(torch.from_numpy(expected["x"]))
    assert (acts > 0).sum(1).float().mean() > 2 * (expected["acts"] > 0).sum(1).mean()


def test_llamascope_loader_matches_saelens_live(tmp_path, monkeypatch):
    try:
        import sae_lens  # noqa: F401
    except ImportError:
        pytest.skip("sae-lens is not installed (optional: pip install 'pva-sae[saelens]'); "
                    "test_llamascope_loader_matches_saelens_stored_outputs checks the stored SAELens outputs")
    monkeypatch.setattr("pva_sae.sae.registry._registry", _with_fixture_width())
    from pva_sae.sae.loaders import convert_saelens

    inputs = write_fixture(tmp_path, seed=1)
    theirs = saelens_load(tmp_path)
    expected = {**inputs, **saelens_outputs(theirs, inputs["x"])}
    compare(ours(tmp_path), expected)
    compare(convert_saelens(theirs), expected)  # the SAELens object converted to our classes agrees too


def _with_fixture_width():
    """The registry with the LlamaScope release at the fixture's shapes (d_model 16, 128 latents)."""
    from pva_sae.sae import registry

    entries = registry._registry()

    def patched():
        return tuple({**e, "d_model": D_MODEL, "d_sae": D_SAE} if e["key"] == "llamascope-8b-res" else e
                     for e in entries)

    return patched


# --------------------------------------------------------------------------- the pipeline on a tiny Llama

N_LAYERS, WIDTH, TOP_K = 2, 64, 4
COMMON = ["generation.max_new_tokens=4", "generation.batch_size=10", "checkpoint.resume=auto"]
VALIDATION = ["validation.temperatures=[0.0, 1.0]", "validation.samples_per_temperature=1",
              "validation.robustness_max_tasks=4", "validation.bootstrap_resamples=50", "validation.probe_folds=2",
              "validation.probe_cs=3"]
STEERING = ["steering.alpha_grid=[0.5, 4.0]", "steering.refine_steps=1", "steering.n_controls=3",
            "steering.tuning_controls=1", "steering.control_max_separation=1.0", "steering.max_tasks=6",
            "steering.tuning_max_tasks=4", "steering.n_permutations=100", "steering.bootstrap_resamples=100"]


def make_tiny_llama(out: Path) -> Path:
    """A random-weight 2-layer LlamaForCausalLM (d_model 64) with the test BPE tokenizer, in HF format."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from pva_sae.default.tiny import BOS_ID, EOS_ID, PAD_ID, build_bpe_tokenizer, mbpp_texts

    tokenizer = build_bpe_tokenizer(mbpp_texts(), vocab_size=512)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=128,
                         num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                         pad_token_id=PAD_ID, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_topk_saes(root: Path, seed: int = 0) -> None:
    """TopK SAEs for every layer in the LlamaScope layout (torch Linear keys, hyperparams.json)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    for layer in range(N_LAYERS):
        dec = torch.nn.functional.normalize(torch.randn(WIDTH, 8 * WIDTH, generator=g), dim=0)  # (d_model, d_sae)
        folder = root / f"Llama3_1-8B-Base-L{layer}R-8x"
        (folder / "checkpoints").mkdir(parents=True)
        save_file({"encoder.weight": dec.T.contiguous(), "encoder.bias": torch.zeros(8 * WIDTH),
                   "decoder.weight": dec, "decoder.bias": torch.zeros(WIDTH)},
                  str(folder / "checkpoints" / "final.safetensors"))
        (folder / "hyperparams.json").write_text(json.dumps({
            "d_model": WIDTH, "d_sae": 8 * WIDTH, "act_fn": "topk", "top_k": TOP_K, "norm_activation": "dataset-wise",
            "dataset_average_activation_norm": {"in": math.sqrt(WIDTH), "out": math.sqrt(WIDTH)},
            "apply_decoder_bias_to_pre_encoder": False, "sparsity_include_decoder_norm": True,
            "hook_point_in": f"blocks.{layer}.hook_resid_post", "hook_point_out": f"blocks.{layer}.hook_resid_post"}))


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """Build (labels planted) and analysis of 30 tasks on a tiny Llama with LlamaScope-format TopK SAEs."""
    from conftest import replace_dataset

    from pva_sae.config import resolve_config
    from pva_sae.rundir.paths import RunDir
    from pva_sae.stages.analyze import analyze
    from pva_sae.stages.build import build_dataset

    base = tmp_path_factory.mktemp("llama")
    model_dir = make_tiny_llama(base / "tiny-llama")
    make_topk_saes(base / "saes")
    override = base / "registry_override.json"
    override.write_text(json.dumps({"releases": [{"key": "llamascope-8b-res", "n_layers": N_LAYERS, "d_model": WIDTH,
                                                  "d_sae": 8 * WIDTH}]}))
    mp = pytest.MonkeyPatch()
    mp.setenv("PVA_SAE_REGISTRY_OVERRIDE", str(override))
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}  # doc {i}"}) + "\n"
                              for i in range(25)))
    common = [f"model.name={model_dir}", f"output.run_dir={base / 'run'}", *COMMON]
    build_dataset(resolve_config(overrides=common + ["data.end_idx=29"]), progress=False)
    run = RunDir.at(base / "run")
    dataset = json.loads(run.dataset_json.read_text())
    for record in dataset["records"]:  # a random model solves nothing: plant labels to exercise both classes
        record["passed"] = record["task_id"] % 3 == 0
    replace_dataset(run, dataset)
    cfg = resolve_config(overrides=common + [
        "analysis.sae_release=llamascope-8b-res", f"analysis.sae_local_dir={base / 'saes'}",
        f"analysis.general_corpus={corpus}", f"analysis.cache_dir={base / 'cache'}", "analysis.top_k=5",
        "analysis.general_max_frequency=0.5"])
    summary = analyze(cfg, progress=False)
    yield cfg, run, summary, model_dir
    mp.undo()


def test_auto_backend_is_hf_for_llama_and_fast_is_refused():
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from pva_sae.model.fastgen import FastGenError
    from pva_sae.model.generation import resolve_backend

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    on_cuda = SimpleNamespace(model=model, device=torch.device("cuda"), path_or_id="tiny-llama")
    assert resolve_backend("auto", on_cuda) == "hf"
    with pytest.raises(FastGenError, match="Gemma-2 only"):
        resolve_backend("fast", on_cuda)


def test_hooks_resolve_llama_layers_at_resid_post(llama_run):
    from pva_sae.config import ModelConfig
    from pva_sae.model.capture import capture_last_token
    from pva_sae.model.hooks import decoder_layers
    from pva_sae.model.registry import load_model

    _, _, _, model_dir = llama_run
    loaded = load_model(ModelConfig(name=str(model_dir), device="cpu"))
    assert loaded.family == "llama" and (loaded.n_layers, loaded.d_model) == (N_LAYERS, WIDTH)
    assert len(decoder_layers(loaded.model)) == N_LAYERS
    prompts = ["def add(a, b):", "# Solution:\nx = 1"]
    acts = capture_last_token(loaded.model, loaded.tokenizer, prompts, layers=[0, 1], site="resid_post",
                              batch_size=2)                                        # (n, layers, d_model)
    for i, prompt in enumerate(prompts):
        enc = loaded.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            hidden = loaded.model(**enc, output_hidden_states=True).hidden_states
        # resid_post of layer L = hidden_states[L + 1]; the last entry has the final norm applied
        torch.testing.assert_close(acts[i, 0], hidden[1][0, -1], rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model.model.norm(acts[i, 1]), hidden[2][0, -1], rtol=1e-4, atol=1e-4)


def test_analysis_on_llama_with_topk_saes(llama_run):
    from pva_sae.rundir.artifacts import read_neuronpedia_list
    from pva_sae.rundir.paths import AnalysisPaths

    _, run, summary, _ = llama_run
    assert run.is_done("analyze") and summary["release"] == "llamascope-8b-res"
    for layer in ("0", "1"):
        meta = summary["saes"][layer]
        assert (meta["arch"], meta["k"], meta["d_sae"]) == ("topk", TOP_K, 8 * WIDTH)
        assert summary["sharing"][layer] == {
            "saelens": {"release": "llama_scope_lxr_8x", "sae_id": f"l{layer}r_8x"},
            "neuronpedia": {"model": "llama3.1-8b", "source": f"{layer}-llamascope-res-32k"}}
    top = summary["top"]["correct"][0]
    assert top["neuronpedia"] == f"https://www.neuronpedia.org/llama3.1-8b/{top['layer']}-llamascope-res-32k/{top['latent']}"
    body = read_neuronpedia_list(AnalysisPaths.of(run))
    listed = {(f["layer"], f["index"]) for f in body["features"]}
    chosen = summary["chosen"]["steering"]["correct"]
    assert (f"{chosen['layer']}-llamascope-res-32k", chosen["latent"]) in listed
    assert summary["neuronpedia_list"]["n_features"] == len(body["features"]) > 0
    assert summary["neuronpedia_list"]["quick_list"].startswith("https://www.neuronpedia.org/quick-list/")


def test_report_links_llamascope_latents_to_neuronpedia(llama_run):
    from pva_sae.stages.report import write_report

    _, run, summary, _ = llama_run
    html_path, md_path = write_report(run.root)
    top = summary["top_by_t"]["incorrect"][0]
    name = f"L{top['layer']}:{top['latent']}"
    url = f"https://www.neuronpedia.org/llama3.1-8b/{top['layer']}-llamascope-res-32k/{top['latent']}"
    assert f"<a href='{url}'>{name}</a>" in html_path.read_text()
    assert f"[{name}]({url})" in md_path.read_text()
    assert "SAELens: release llama_scope_lxr_8x, ids l0r_8x, l1r_8x. Neuronpedia sources 0-llamascope-res-32k, " \
           "1-llamascope-res-32k" in md_path.read_text()


@pytest.mark.gpu
def test_llama_builds_on_cuda_through_the_hf_backend(tmp_path):
    """On CUDA, generation.backend=auto picks the HF backend for Llama (the fast decoder is Gemma-2 only)."""
    from pva_sae.config import resolve_config
    from pva_sae.rundir.atomic import read_json
    from pva_sae.rundir.paths import RunDir
    from pva_sae.stages.build import build_dataset

    model_dir = make_tiny_llama(tmp_path / "tiny-llama")
    cfg = resolve_config(overrides=[f"model.name={model_dir}", f"output.run_dir={tmp_path / 'run'}", *COMMON,
                                    "model.device=cuda", "generation.backend=auto", "data.end_idx=9"])
    build_dataset(cfg, progress=False)
    run = RunDir.at(tmp_path / "run")
    plan = read_json(run.batch_plan)
    assert plan["backend"] == "hf" and plan["device"].startswith("cuda") and run.is_done("build")


@pytest.mark.slow
def test_validate_and_steer_on_llama(llama_run, tmp_path_factory):
    import shutil

    from pva_sae.config import resolve_config
    from pva_sae.rundir.paths import RunDir
    from pva_sae.stages.steer import steer
    from pva_sae.stages.validate import validate

    cfg, run, _, _ = llama_run
    dest = tmp_path_factory.mktemp("llama-steer") / "run"
    shutil.copytree(run.root, dest)
    data = {k: v for k, v in cfg.to_dict().items() if k != "validation"}
    cfg = resolve_config(base=data, overrides=[f"output.run_dir={dest}", "checkpoint.resume=auto", *VALIDATION])
    validate(cfg, progress=False)
    cfg = resolve_config(base=cfg.to_dict(), overrides=STEERING)
    res = steer(cfg, progress=False)
    done = RunDir.at(dest)
    assert done.is_done("validate") and done.is_done("steer")
    for direction in ("correct", "incorrect"):
        d = res["directions"][direction]
        assert d["target"]["label"] == f"L{d['target']['layer']}:{d['target']['latent']}"
        assert d["net_effect"]["target"]["n"] == res["tasks"]["validation"] and len(d["controls"]) == 3


if __name__ == "__main__":  # regenerate the fixture (needs sae-lens)
    import importlib.metadata

    FIXTURE.mkdir(parents=True, exist_ok=True)
    inputs = write_fixture(FIXTURE)
    outputs = saelens_outputs(saelens_load(FIXTURE), inputs["x"])
    np.savez_compressed(FIXTURE / "saelens_expected.npz", **inputs, **outputs)
    (FIXTURE / "SOURCE.md").write_text(
        f"Written by `python tests/test_llama.py` with sae-lens {importlib.metadata.version('sae-lens')}: a random "
        f"LlamaScope checkpoint (d_model {D_MODEL}, {D_SAE} latents, layer {LAYER}) in the layout of "
        f"fnlp/Llama3_1-8B-Base-LXR-8x, and saelens_expected.npz = SAELens' SAE.from_pretrained('llama_scope_lxr_8x', "
        f"'l{LAYER}r_8x') of it: W_enc, W_dec, b_enc, b_dec, threshold, and acts = encode(x), recon = decode(acts).\n")
    print(f"wrote {FIXTURE}; mean L0 {float((outputs['acts'] > 0).sum(1).mean()):.1f}", file=sys.stderr)
