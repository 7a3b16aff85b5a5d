"""Last-token capture: agreement with hidden_states, independence of batching and padding, one forward
pass per batch, original order, and the activations file format.

Tolerance: a prompt captured alone (no padding) and inside a left-padded batch agree to within
PAD_TOL = 1e-4 in float32 (observed: about 2e-6 on the tiny model; padding changes the shapes of the
matrix products, hence the summation order, not the maths).
"""

from __future__ import annotations

import math

import pytest
import torch

from pva_sae.model.capture import capture_last_token, left_pad, tokenize_prompts
from pva_sae.model.hooks import decoder_layers
from pva_sae.rundir.artifacts import load_activations, save_activations

PAD_TOL = 1e-4
N_LAYERS = 3
PROMPTS = [
    "Write a function to find the shared elements from the given two lists.\n\n"
    "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n\n# Solution:",
    "def add(a, b):",
    "x",
    "Write a python function to identify non-prime numbers.\n# Solution:",
    "Write a function to find the n largest integers from a given list of numbers, returned in descending order.",
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model3(tok):
    from transformers import Gemma2ForCausalLM

    from pva_sae.default.tiny import tiny_gemma2_config

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(tiny_gemma2_config(len(tok), n_layers=N_LAYERS, sliding_window=8))
    return model.eval()


def alone(model, tok, prompt):
    """hidden_states of one unpadded prompt: tuple of (1, seq, d_model)."""
    with torch.no_grad():
        return model(**tok(prompt, return_tensors="pt"), output_hidden_states=True, use_cache=False).hidden_states


def maxdiff(a, b):
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- values

def test_shape_dtype_and_default_layers(model3, tok):
    acts = capture_last_token(model3, tok, PROMPTS, progress=False)
    assert acts.shape == (len(PROMPTS), N_LAYERS, 64)
    assert acts.dtype == torch.float32 and acts.device.type == "cpu"
    assert torch.isfinite(acts).all()


def test_matches_hidden_states_of_each_prompt_alone(model3, tok):
    """resid_post at L == hidden_states[L+1][:, -1] for L < n-1; resid_pre at L == hidden_states[L][:, -1]."""
    post = capture_last_token(model3, tok, PROMPTS, batch_size=4, progress=False)
    pre = capture_last_token(model3, tok, PROMPTS, site="resid_pre", batch_size=4, progress=False)
    for i, prompt in enumerate(PROMPTS):
        hs = alone(model3, tok, prompt)
        for layer in range(N_LAYERS):
            if layer < N_LAYERS - 1:
                assert maxdiff(post[i, layer], hs[layer + 1][0, -1]) < PAD_TOL
            assert maxdiff(pre[i, layer], hs[layer][0, -1]) < PAD_TOL
        # the last entry of hidden_states is after the final norm
        assert maxdiff(model3.model.norm(post[i, -1]), hs[-1][0, -1]) < PAD_TOL


def test_independent_of_batch_composition_order_and_padding(model3, tok):
    one_by_one = capture_last_token(model3, tok, PROMPTS, batch_size=1, progress=False)
    for batch_size in (2, 3, len(PROMPTS)):
        for sort in (True, False):
            acts = capture_last_token(model3, tok, PROMPTS, batch_size=batch_size, sort_by_length=sort,
                                      progress=False)
            assert maxdiff(acts, one_by_one) < PAD_TOL, (batch_size, sort)
    # the short prompt padded next to a much longer one, in either position of the batch
    for pair in ([PROMPTS[2], PROMPTS[0]], [PROMPTS[0], PROMPTS[2]]):
        acts = capture_last_token(model3, tok, pair, batch_size=2, sort_by_length=False, progress=False)
        row = pair.index(PROMPTS[2])
        assert maxdiff(acts[row], one_by_one[2]) < PAD_TOL


def test_rows_follow_original_order(model3, tok):
    acts = capture_last_token(model3, tok, PROMPTS, batch_size=2, progress=False)
    reversed_acts = capture_last_token(model3, tok, PROMPTS[::-1], batch_size=2, progress=False)
    assert maxdiff(acts, reversed_acts.flip(0)) < PAD_TOL
    # distinct prompts give distinct rows, so a permutation bug could not hide
    assert maxdiff(acts[0], acts[1]) > 1e-2


def test_layer_subset_columns_follow_request(model3, tok):
    full = capture_last_token(model3, tok, PROMPTS, progress=False)
    sub = capture_last_token(model3, tok, PROMPTS, layers=[2, 0], progress=False)
    assert sub.shape == (len(PROMPTS), 2, 64)
    assert torch.equal(sub[:, 0], full[:, 2]) and torch.equal(sub[:, 1], full[:, 0])


def test_one_forward_per_batch_stopping_after_last_layer(model3, tok):
    """Each batch is one forward pass, and the pass stops after the highest requested layer."""
    forwards, layer_calls = [], [0] * N_LAYERS
    handles = [model3.register_forward_pre_hook(lambda *a: forwards.append(1))]
    for i, module in enumerate(decoder_layers(model3)):
        handles.append(module.register_forward_pre_hook(lambda *a, i=i: layer_calls.__setitem__(i, layer_calls[i] + 1)))
    try:
        capture_last_token(model3, tok, PROMPTS, layers=[0, 1], batch_size=2, progress=False)
    finally:
        for h in handles:
            h.remove()
    n_batches = math.ceil(len(PROMPTS) / 2)
    assert len(forwards) == n_batches
    assert layer_calls == [n_batches, n_batches, 0]


def test_training_mode_restored(model3, tok):
    expected = capture_last_token(model3, tok, PROMPTS[:2], progress=False)
    model3.train()
    try:
        acts = capture_last_token(model3, tok, PROMPTS[:2], progress=False)
        assert model3.training
    finally:
        model3.eval()
    assert torch.equal(acts, expected)


def test_works_with_load_model(tiny_loaded):
    acts = capture_last_token(tiny_loaded.model, tiny_loaded.tokenizer, PROMPTS, batch_size=2, progress=False)
    assert acts.shape == (len(PROMPTS), tiny_loaded.n_layers, tiny_loaded.d_model)


# --------------------------------------------------------------------------- tokenising

def test_left_pad_masks_and_positions():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_max_length_keeps_bos_and_the_end(model3, tok):
    full = tokenize_prompts(tok, [PROMPTS[0]])[0]
    cut = tokenize_prompts(tok, [PROMPTS[0]], max_length=6)[0]
    assert full[0] == tok.bos_token_id and len(full) > 6
    assert cut == [tok.bos_token_id] + full[-5:]
    acts = capture_last_token(model3, tok, [PROMPTS[0]], max_length=6, progress=False)
    with torch.no_grad():
        hs = model3(input_ids=torch.tensor([cut]), output_hidden_states=True).hidden_states
    assert maxdiff(acts[0, 0], hs[1][0, -1]) < PAD_TOL


def test_bad_arguments_raise(model3, tok):
    with pytest.raises(ValueError, match="no prompts"):
        capture_last_token(model3, tok, [], progress=False)
    with pytest.raises(TypeError, match="list of strings"):
        capture_last_token(model3, tok, "one prompt", progress=False)
    with pytest.raises(ValueError, match="unknown site"):
        capture_last_token(model3, tok, PROMPTS, site="mlp_out", progress=False)
    with pytest.raises(IndexError, match="out of range"):
        capture_last_token(model3, tok, PROMPTS, layers=[3], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        capture_last_token(model3, tok, PROMPTS, batch_size=0, progress=False)


# --------------------------------------------------------------------------- file format

def test_save_load_round_trip(tmp_path):
    acts = torch.randn(4, 2, 8)
    meta = {"model": "google/gemma-2-2b", "revision": None, "seconds": "1.50"}
    path = save_activations(tmp_path / "sub" / "acts.safetensors", acts, [11, 2, 600, 3], [16, 19], "resid_pre", meta)
    got, ids, layers, site, got_meta = load_activations(path)
    assert torch.equal(got, acts)
    assert ids == [11, 2, 600, 3] and layers == [16, 19] and site == "resid_pre" and got_meta == meta
    assert [p.name for p in path.parent.iterdir()] == ["acts.safetensors"]  # no temp file left behind


def test_save_validates_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"expected \(3, 2, d_model\)"):
        save_activations(tmp_path / "a.safetensors", torch.zeros(4, 2, 8), [1, 2, 3], [0, 1], "resid_post", {})
    with pytest.raises(ValueError, match=r"expected \(4, 3, d_model\)"):
        save_activations(tmp_path / "a.safetensors", torch.zeros(4, 2, 8), [1, 2, 3, 4], [0, 1, 2], "resid_post", {})
    with pytest.raises(ValueError, match="unknown site"):
        save_activations(tmp_path / "a.safetensors", torch.zeros(1, 1, 8), [1], [0], "post", {})


def test_load_bad_files_raise_clear_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="run the capture"):
        load_activations(tmp_path / "missing.safetensors")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file.*delete it"):
        load_activations(garbage)

    other = tmp_path / "other.safetensors"
    save_file({"W_enc": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match="not a pva-sae activations file"):
        load_activations(other)

    good = save_activations(tmp_path / "good.safetensors", torch.zeros(3, 2, 4), [1, 2, 3], [0, 1], "resid_post")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match="delete it"):
        load_activations(truncated)

    inconsistent = tmp_path / "inconsistent.safetensors"
    save_file({"acts": torch.zeros(3, 2, 4), "task_ids": torch.arange(3)}, str(inconsistent),
              metadata={"format": "pva-sae/activations", "version": "1", "layers": "[0, 1, 2]",
                        "site": "resid_post", "meta": "{}"})
    with pytest.raises(ValueError, match=r"shape \(3, 2, 4\), expected \(3, 3, d_model\)"):
        load_activations(inconsistent)
