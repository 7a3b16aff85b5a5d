import hashlib
import json
import logging
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pva_sae.sae import registry
from pva_sae.sae.base import SAEError
from pva_sae.sae.jumprelu import JumpReLUSAE
from pva_sae.sae.loaders import (
    GEMMASCOPE_KEYS,
    convert_saelens,
    load_sae_file,
    load_saelens,
    save_gemmascope_npz,
)
from pva_sae.sae.registry import canonical_l0, list_releases, load_sae, resolve_sae
from pva_sae.sae.topk import TopKSAE


def hand_sae():
    """d_model 3, d_sae 4, weights chosen so every activation can be checked by hand."""
    W_enc = torch.tensor([[1.0, 0.0, 0.0, 1.0],
                          [0.0, 1.0, 0.0, 1.0],
                          [0.0, 0.0, 1.0, 0.0]])          # (3, 4)
    b_enc = torch.tensor([0.0, -0.5, 0.125, 0.0])
    threshold = torch.tensor([0.5, 0.25, 0.25, 1.0])
    W_dec = torch.tensor([[3.0, 4.0, 0.0],               # norm 5
                          [0.0, 1.0, 0.0],
                          [0.0, 0.0, 1.0],
                          [1.0, 0.0, 0.0]])              # (4, 3)
    b_dec = torch.tensor([10.0, 20.0, 30.0])             # large: would change every pre-activation if subtracted
    return dict(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, threshold=threshold)


def random_sae(d_model, d_sae, seed=0, unit_rows=True):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_model, generator=g)
    if unit_rows:
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    return dict(W_enc=W_dec.T.clone(), W_dec=W_dec, b_enc=torch.randn(d_sae, generator=g) * 0.1,
                b_dec=torch.randn(d_model, generator=g) * 0.1, threshold=torch.rand(d_sae, generator=g) * 0.2)


@pytest.fixture
def hand_npz(tmp_path):
    return save_gemmascope_npz(tmp_path / "params.npz", **hand_sae())


# --------------------------------------------------------------------------- params.npz layout and encode/decode


def test_save_gemmascope_npz_writes_exactly_the_gemmascope_layout(hand_npz):
    with np.load(hand_npz) as archive:
        assert sorted(archive.files) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
        shapes = {k: archive[k].shape for k in archive.files}
        assert all(archive[k].dtype == np.float32 for k in archive.files)
    assert shapes == {"W_enc": (3, 4), "W_dec": (4, 3), "b_enc": (4,), "b_dec": (3,), "threshold": (4,)}


def test_jumprelu_encode_decode_by_hand(hand_npz):
    sae = load_sae_file(hand_npz)
    assert (sae.d_model, sae.d_sae) == (3, 4)
    x = torch.tensor([[1.0, 0.625, 0.0],     # pre = [1, 0.125, 0.125, 1.625]
                      [0.5, 0.75, 0.125],    # pre = [0.5, 0.25, 0.25, 1.25]: three exactly at threshold
                      [-1.0, 0.0, 1.0]])     # pre = [-1, -0.5, 1.125, -1]
    acts = sae.encode(x)
    expected = torch.tensor([[1.0, 0.0, 0.0, 1.625],   # 0.125 < 0.25 for latents 1 and 2
                             [0.0, 0.0, 0.0, 1.25],    # pre == threshold does not fire (strict >)
                             [0.0, 0.0, 1.125, 0.0]])  # negative pre never fires
    torch.testing.assert_close(acts, expected)
    # no b_dec subtraction: the same numbers as the formula without it
    params = hand_sae()
    pre = x @ params["W_enc"] + params["b_enc"]
    torch.testing.assert_close(acts, torch.relu(pre) * (pre > params["threshold"]))
    recon = torch.tensor([[1.0 * 3 + 1.625, 1.0 * 4, 0.0]]) + params["b_dec"]
    torch.testing.assert_close(sae.decode(acts[:1]), recon)
    torch.testing.assert_close(sae(x), sae.decode(acts))


def test_encode_casts_bfloat16_input_up_to_float32(hand_npz):
    sae = load_sae_file(hand_npz)
    x = torch.tensor([[1.0, 0.625, 0.0], [0.5, 0.75, 0.125]], dtype=torch.bfloat16)
    acts = sae.encode(x)
    assert acts.dtype == torch.float32
    torch.testing.assert_close(acts, sae.encode(x.float()))
    assert sae.decode(acts.to(torch.bfloat16)).dtype == torch.float32
    with pytest.raises(SAEError, match="expects d_model 3"):
        sae.encode(torch.zeros(2, 5))


def test_encode_works_on_any_leading_shape(hand_npz):
    sae = load_sae_file(hand_npz)
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    assert sae.encode(x).shape == (2, 5, 4)
    torch.testing.assert_close(sae.encode(x)[1, 2], sae.encode(x[1, 2]))


def test_decoder_norms_unit_direction_and_meta(hand_npz, caplog):
    with caplog.at_level(logging.WARNING, logger="pva_sae.sae.loaders"):
        sae = load_sae_file(hand_npz)
    assert "not unit-norm" in caplog.text and "max 5.0000" in caplog.text
    torch.testing.assert_close(sae.decoder_norms, torch.tensor([5.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(sae.unit_direction(0), torch.tensor([0.6, 0.8, 0.0]))
    assert sae.unit_direction(3).norm().item() == pytest.approx(1.0)
    with pytest.raises(SAEError, match="out of range"):
        sae.unit_direction(4)
    meta = sae.meta
    assert meta["sha256"] == hashlib.sha256(hand_npz.read_bytes()).hexdigest()
    assert meta["path"] == str(hand_npz)
    assert (meta["decoder_norm_min"], meta["decoder_norm_max"], meta["decoder_norm_mean"]) == (1.0, 5.0, 2.0)
    assert meta["arch"] == "jumprelu" and meta["d_sae"] == 4


def test_sae_modules_move_print_and_pickle(hand_npz, tmp_path):
    sae = load_sae_file(hand_npz)
    assert repr(sae) == "JumpReLUSAE(d_model=3, d_sae=4)"
    assert sae.to("cpu") is sae and {name for name, _ in sae.named_buffers()} == set(GEMMASCOPE_KEYS)
    torch.save(sae, tmp_path / "sae.pt")
    again = torch.load(tmp_path / "sae.pt", weights_only=False)
    assert isinstance(again, JumpReLUSAE) and again.meta == sae.meta
    torch.testing.assert_close(again.threshold, sae.threshold)


def test_unit_norm_decoder_does_not_warn(tmp_path, caplog):
    path = save_gemmascope_npz(tmp_path / "params.npz", **random_sae(8, 16))
    with caplog.at_level(logging.WARNING, logger="pva_sae.sae.loaders"):
        load_sae_file(path)
    assert "unit-norm" not in caplog.text


# --------------------------------------------------------------------------- load errors


def test_missing_file(tmp_path):
    with pytest.raises(SAEError, match="does not exist"):
        load_sae_file(tmp_path / "nope" / "params.npz")


def test_missing_and_extra_keys_are_named(tmp_path):
    arrays = {k: v.numpy() for k, v in hand_sae().items()}
    path = tmp_path / "missing.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if k != "threshold"})
    with pytest.raises(SAEError, match="missing threshold"):
        load_sae_file(path)
    path = tmp_path / "extra.npz"
    np.savez(path, **arrays, log_feature_sparsity=np.zeros(4, np.float32))
    with pytest.raises(SAEError, match="unexpected log_feature_sparsity"):
        load_sae_file(path)


def test_wrong_shape_is_named(tmp_path):
    arrays = {k: v.numpy() for k, v in hand_sae().items()}
    arrays["W_dec"] = arrays["W_dec"].T.copy()
    path = tmp_path / "params.npz"
    np.savez(path, **arrays)
    with pytest.raises(SAEError, match=r"W_dec has shape \(3, 4\), expected \(4, 3\)"):
        load_sae_file(path)


def test_d_model_mismatch_with_the_model(hand_npz):
    with pytest.raises(SAEError, match="SAE expects d_model 3 but the model has 256: wrong release for this model"):
        load_sae_file(hand_npz, expected_d_model=256)
    assert load_sae_file(hand_npz, expected_d_model=3).d_model == 3


def test_corrupted_and_truncated_npz(tmp_path, hand_npz):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(SAEError, match="not a readable .npz"):
        load_sae_file(garbage)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(hand_npz.read_bytes()[:-40])
    with pytest.raises(SAEError, match="not a readable .npz"):
        load_sae_file(truncated)


def test_non_finite_values_are_refused(tmp_path):
    params = hand_sae()
    params["W_enc"][1, 2] = float("nan")
    path = save_gemmascope_npz(tmp_path / "params.npz", **params)
    with pytest.raises(SAEError, match="W_enc has 1 non-finite"):
        load_sae_file(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "sae.pt"
    path.write_bytes(b"x")
    with pytest.raises(SAEError, match="unsupported SAE file type"):
        load_sae_file(path)


# --------------------------------------------------------------------------- registry


def test_gemmascope_canonical_paths():
    assert resolve_sae("gemma-scope-2b-pt-res", 0) == "layer_0/width_16k/average_l0_105/params.npz"
    assert resolve_sae("gemma-scope-2b-pt-res", 12) == "layer_12/width_16k/average_l0_82/params.npz"
    assert resolve_sae("gemma-scope-2b-pt-res", 16) == "layer_16/width_16k/average_l0_78/params.npz"
    assert resolve_sae("gemma-scope-2b-pt-res", 25) == "layer_25/width_16k/average_l0_116/params.npz"
    assert resolve_sae("gemma-scope-9b-pt-res", 0) == "layer_0/width_16k/average_l0_129/params.npz"
    assert resolve_sae("gemma-scope-9b-pt-res", 20) == "layer_20/width_16k/average_l0_68/params.npz"
    assert resolve_sae("gemma-scope-9b-pt-res", 41) == "layer_41/width_16k/average_l0_113/params.npz"
    assert resolve_sae("gemma-scope-9b-pt-res", 9, width="131k") == "layer_9/width_131k/average_l0_75/params.npz"
    assert resolve_sae("gemma-scope-2b-pt-res", 7, l0=22) == "layer_7/width_16k/average_l0_22/params.npz"
    assert canonical_l0("gemma-scope-2b-pt-res", 19, "65k") == 115


def test_every_gemmascope_layer_has_a_canonical_16k_path():
    for key, n_layers in (("gemma-scope-2b-pt-res", 26), ("gemma-scope-9b-pt-res", 42)):
        for layer in range(n_layers):
            path = resolve_sae(key, layer)
            assert path.startswith(f"layer_{layer}/width_16k/average_l0_") and "canonical" not in path


def test_registry_errors():
    with pytest.raises(SAEError, match="unknown SAE release 'gemma-scope-7b'.*gemma-scope-2b-pt-res"):
        resolve_sae("gemma-scope-7b", 0)
    with pytest.raises(SAEError, match=r"layer 26 is out of range.*0\.\.25"):
        resolve_sae("gemma-scope-2b-pt-res", 26)
    with pytest.raises(SAEError, match="out of range"):
        resolve_sae("gemma-scope-2b-pt-res", -1)
    with pytest.raises(SAEError, match="no canonical L0 for layer 0 at width '32k'.*give the L0 explicitly"):
        resolve_sae("gemma-scope-2b-pt-res", 0, width="32k")
    assert resolve_sae("gemma-scope-2b-pt-res", 0, width="32k", l0=40).endswith("average_l0_40/params.npz")
    with pytest.raises(SAEError, match="positive integer"):
        resolve_sae("gemma-scope-2b-pt-res", 0, l0=0)
    with pytest.raises(SAEError, match="no L0 choice"):
        resolve_sae("llamascope-8b-res", 3, l0=50)
    with pytest.raises(SAEError, match="not of the form"):
        resolve_sae("gemma-scope-2b-pt-res", 0, width="wide")


def test_list_releases_and_other_paths():
    releases = {r["key"]: r for r in list_releases()}
    assert set(releases) >= {"pva-tiny-res", "gemma-scope-2b-pt-res", "gemma-scope-9b-pt-res", "llamascope-8b-res"}
    assert releases["gemma-scope-2b-pt-res"]["model"] == "gemma-2-2b"
    assert releases["llamascope-8b-res"]["repo"] == "fnlp/Llama3_1-8B-Base-LXR-8x"
    releases["pva-tiny-res"]["n_layers"] = 99  # a copy
    assert {r["key"]: r for r in list_releases()}["pva-tiny-res"]["n_layers"] == 6
    assert resolve_sae("llamascope-8b-res", 3) == "Llama3_1-8B-Base-L3R-8x/checkpoints/final.safetensors"
    assert resolve_sae("pva-tiny-res", 5) == "layer_5/params.npz"


# --------------------------------------------------------------------------- load_sae: local_dir, package, hub


def write_mirror(root, repo_path, d_model, d_sae, seed=0):
    params = random_sae(d_model, d_sae, seed)
    return save_gemmascope_npz(root / repo_path, **params), params


def test_load_sae_from_local_dir_mirror(tmp_path):
    path, params = write_mirror(tmp_path, "layer_3/width_16k/average_l0_59/params.npz", 2304, 8)
    sae = load_sae("gemma-scope-2b-pt-res", 3, local_dir=tmp_path, expected_d_model=2304)
    torch.testing.assert_close(sae.W_enc, params["W_enc"])
    meta = sae.meta
    assert (meta["release"], meta["layer"], meta["width"], meta["l0"], meta["canonical"]) == (
        "gemma-scope-2b-pt-res", 3, "16k", 59, True)
    assert meta["repo_path"] == "layer_3/width_16k/average_l0_59/params.npz"
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(SAEError, match="SAE expects d_model 2304 but the model has 256"):
        load_sae("gemma-scope-2b-pt-res", 3, local_dir=tmp_path, expected_d_model=256)
    with pytest.raises(SAEError, match="must mirror the layout of google/gemma-scope-2b-pt-res"):
        load_sae("gemma-scope-2b-pt-res", 4, local_dir=tmp_path)


def test_load_sae_explicit_l0_is_not_canonical(tmp_path):
    write_mirror(tmp_path, "layer_3/width_16k/average_l0_20/params.npz", 2304, 8)
    sae = load_sae("gemma-scope-2b-pt-res", 3, l0=20, local_dir=tmp_path)
    assert sae.meta["l0"] == 20 and sae.meta["canonical"] is False


def test_load_sae_file_of_another_release(tmp_path):
    write_mirror(tmp_path, "layer_3/width_16k/average_l0_59/params.npz", 64, 8)
    with pytest.raises(SAEError, match="d_model 64 but release 'gemma-scope-2b-pt-res' is for d_model 2304"):
        load_sae("gemma-scope-2b-pt-res", 3, local_dir=tmp_path)


def test_embedded_release_missing_then_built(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "PACKAGE_DIR", tmp_path)
    with pytest.raises(SAEError, match="python scripts/train_default.py"):
        load_sae("pva-tiny-res", 0)
    write_mirror(tmp_path / "assets/default/saes", "layer_0/params.npz", 256, 32)
    sae = load_sae("pva-tiny-res", 0, expected_d_model=256)
    assert sae.meta["release"] == "pva-tiny-res" and sae.meta["l0"] is None and sae.d_sae == 32


def fake_hub(monkeypatch, tmp_path, fail=None):
    calls = []

    def hf_hub_download(**kwargs):
        calls.append(kwargs)
        if fail:
            raise fail
        path, _ = write_mirror(tmp_path / "cache", kwargs["filename"], 2304, 8)
        return str(path)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    return calls


def test_load_sae_from_hub_uses_the_resolved_path(tmp_path, monkeypatch):
    calls = fake_hub(monkeypatch, tmp_path)
    sae = load_sae("gemma-scope-2b-pt-res", 5, cache_dir=tmp_path / "hf", local_files_only=True)
    assert calls == [{"repo_id": "google/gemma-scope-2b-pt-res", "filename": "layer_5/width_16k/average_l0_68/params.npz",
                      "revision": "main", "cache_dir": str(tmp_path / "hf"), "local_files_only": True}]
    assert sae.meta["repo"] == "google/gemma-scope-2b-pt-res" and sae.meta["l0"] == 68


def test_hub_failures_say_what_to_do(tmp_path, monkeypatch):
    fake_hub(monkeypatch, tmp_path, fail=OSError("offline"))
    with pytest.raises(SAEError, match="could not fetch google/gemma-scope-2b-pt-res.*offline.*local_dir"):
        load_sae("gemma-scope-2b-pt-res", 5)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(SAEError, match="needs huggingface_hub"):
        load_sae("gemma-scope-2b-pt-res", 5)


# --------------------------------------------------------------------------- TopK and LlamaScope


def test_topk_keeps_exactly_k():
    params = random_sae(8, 32, seed=1)
    del params["threshold"]
    sae = TopKSAE(**params, k=5)
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(2)) * 3
    acts = sae.encode(x)
    relu_pre = torch.relu(x @ params["W_enc"] + params["b_enc"])
    assert ((relu_pre > 0).sum(1) >= 5).all()
    assert ((acts > 0).sum(1) == 5).all()
    kept = acts > 0
    torch.testing.assert_close(acts[kept], relu_pre[kept])
    assert (relu_pre[~kept].reshape(20, -1).max(1).values <= acts.max(1).values).all()
    assert (acts.masked_fill(~kept, float("inf")).min(1).values >= relu_pre.masked_fill(kept, 0).max(1).values).all()
    with pytest.raises(SAEError, match="k must be an integer"):
        TopKSAE(**params, k=0)


def test_topk_rank_scale_changes_the_choice_not_the_values():
    W_enc = torch.eye(3)
    sae = TopKSAE(W_enc, torch.eye(3), torch.zeros(3), torch.zeros(3), k=1,
                  rank_scale=torch.tensor([1.0, 10.0, 1.0]))
    acts = sae.encode(torch.tensor([[2.0, 0.5, 0.0]]))
    torch.testing.assert_close(acts, torch.tensor([[0.0, 0.5, 0.0]]))  # 0.5 * 10 > 2 * 1


def write_llamascope(root, layer, d_model, d_sae, hyperparams, seed=0):
    """A checkpoint in the LlamaScope repository layout: torch Linear weights, transposed relative to ours."""
    g = torch.Generator().manual_seed(seed)
    state = {"encoder.weight": torch.randn(d_sae, d_model, generator=g),
             "encoder.bias": torch.randn(d_sae, generator=g) * 0.1,
             "decoder.weight": torch.randn(d_model, d_sae, generator=g) * 0.5,
             "decoder.bias": torch.randn(d_model, generator=g) * 0.1}
    folder = root / f"Llama3_1-8B-Base-L{layer}R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    save_file(state, str(folder / "checkpoints" / "final.safetensors"))
    if hyperparams is not None:
        (folder / "hyperparams.json").write_text(json.dumps(hyperparams))
    return folder / "checkpoints" / "final.safetensors", state


def reference_llamascope(state, hp, x):
    """Straight from the lm-saes encode/decode definitions, without any folding."""
    d_model = state["encoder.weight"].shape[1]
    s_in = d_model ** 0.5 / hp["dataset_average_activation_norm"]["in"]
    s_out = d_model ** 0.5 / hp["dataset_average_activation_norm"]["out"]
    xs = x * s_in
    if hp["apply_decoder_bias_to_pre_encoder"]:
        xs = xs - state["decoder.bias"]
    pre = xs @ state["encoder.weight"].T + state["encoder.bias"]
    scores = pre * state["decoder.weight"].norm(dim=0) if hp["sparsity_include_decoder_norm"] else pre
    if hp["act_fn"] == "jumprelu":
        acts = pre * (scores > hp["jump_relu_threshold"])
    else:
        kth = scores.clamp(min=0).topk(hp["top_k"], dim=-1).values[..., -1:]
        acts = pre.clamp(min=0) * (scores.clamp(min=0) >= kth)
    recon = (acts @ state["decoder.weight"].T + state["decoder.bias"]) / s_out
    return acts, recon


@pytest.mark.parametrize("act_fn,include_norm,sub_bias", [("jumprelu", True, False), ("jumprelu", False, True),
                                                          ("topk", True, False), ("topk", False, False)])
def test_llamascope_checkpoint_matches_the_reference_encoder(tmp_path, act_fn, include_norm, sub_bias):
    hp = {"d_model": 16, "act_fn": act_fn, "top_k": 4, "jump_relu_threshold": 0.75, "norm_activation": "dataset-wise",
          "dataset_average_activation_norm": {"in": 29.125, "out": 12.5}, "apply_decoder_bias_to_pre_encoder": sub_bias,
          "sparsity_include_decoder_norm": include_norm, "hook_point_in": "blocks.3.hook_resid_post"}
    path, state = write_llamascope(tmp_path, 3, 16, 48, hp)
    sae = load_sae_file(path)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(3)) * 20
    acts, recon = reference_llamascope(state, hp, x)
    torch.testing.assert_close(sae.encode(x), acts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.decode(sae.encode(x)), recon, rtol=1e-4, atol=1e-4)
    assert sae.meta["preprocessing"]["input_scale"] == pytest.approx(4 / 29.125)
    assert sae.meta["arch"] == ("topk" if act_fn == "topk" else "jumprelu")


def test_llamascope_release_from_local_dir(tmp_path):
    hp = {"act_fn": "topk", "top_k": 6, "norm_activation": "dataset-wise",
          "dataset_average_activation_norm": {"in": 8.0, "out": 8.0}, "apply_decoder_bias_to_pre_encoder": False,
          "sparsity_include_decoder_norm": False}
    write_llamascope(tmp_path, 7, 4096, 16, hp)
    sae = load_sae("llamascope-8b-res", 7, local_dir=tmp_path, expected_d_model=4096)
    assert sae.k == 6 and sae.meta["k"] == 6 and sae.meta["layer"] == 7
    assert sae.meta["repo_path"] == "Llama3_1-8B-Base-L7R-8x/checkpoints/final.safetensors"


def test_llamascope_without_hyperparams_and_bad_keys(tmp_path, caplog):
    path, _ = write_llamascope(tmp_path, 1, 8, 12, None)
    with caplog.at_level(logging.WARNING, logger="pva_sae.sae.loaders"):
        sae = load_sae_file(path, k=3)
    assert "no hyperparams.json" in caplog.text and sae.k == 3
    with pytest.raises(SAEError, match="needs k"):
        load_sae_file(path)
    bad = tmp_path / "bad.safetensors"
    save_file({"encoder.weight": torch.zeros(4, 2), "decoder.weight": torch.zeros(2, 4), "extra": torch.zeros(1)},
              str(bad))
    with pytest.raises(SAEError, match="missing encoder.bias, decoder.bias; unexpected extra"):
        load_sae_file(bad)
    with pytest.raises(SAEError, match="cannot be folded"):
        load_sae_file(path, hyperparams={"act_fn": "topk", "top_k": 2, "norm_activation": "token-wise"})


def test_gemmascope_layout_in_safetensors(tmp_path):
    params = random_sae(6, 10)
    path = tmp_path / "sae.safetensors"
    save_file({k: v.contiguous() for k, v in params.items()}, str(path))
    sae = load_sae_file(path)
    torch.testing.assert_close(sae.threshold, params["threshold"])


# --------------------------------------------------------------------------- SAELens interop


def test_load_saelens_without_sae_lens(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)
    with pytest.raises(SAEError, match="pip install sae-lens"):
        load_saelens("gemma-scope-2b-pt-res-canonical", "layer_0/width_16k/canonical")


def test_convert_saelens_folds_b_dec_and_keeps_jumprelu():
    params = random_sae(5, 7, seed=4)
    cfg = types.SimpleNamespace(architecture=lambda: "jumprelu", normalize_activations="none",
                                apply_b_dec_to_input=True)
    fake = types.SimpleNamespace(cfg=cfg, **params)
    sae = convert_saelens(fake)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(5))
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    torch.testing.assert_close(sae.encode(x), torch.relu(pre) * (pre > params["threshold"]), rtol=1e-5, atol=1e-6)
    cfg.normalize_activations = "expected_average_only_in"
    with pytest.raises(SAEError, match="load it with pva_sae.sae.registry.load_sae"):
        convert_saelens(fake)


# --------------------------------------------------------------------------- import cost


def test_importing_the_package_cli_and_config_does_not_import_torch():
    # Library modules that need torch import it at the top; the package and the CLI stay cheap by importing lazily.
    code = "import sys, pva_sae, pva_sae.cli, pva_sae.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
