"""Residual hooks: site convention, one firing per forward pass, clean removal, steering arithmetic.

The model is a random 3-layer Gemma-2 (float32, CPU, eager attention, sliding window 8 so that the
sliding layers actually slide on these prompts), using the shared tiny tokenizer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pva_sae.model.hooks import (
    CaptureHook,
    SteeringHook,
    assert_fired_once,
    decoder_layers,
    replace_residual,
    residual_of,
)

N_LAYERS = 3
PROMPTS = [
    "Write a function to find the shared elements from the given two lists.\n\nassert f(1) == 2\n\n# Solution:",
    "def add(a, b):",
    "Write a python function to count set bits.\n# Solution:",
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.padding_side == "left"
    return tokenizer


@pytest.fixture(scope="module")
def model3(tok):
    from transformers import Gemma2ForCausalLM

    from pva_sae.default.tiny import tiny_gemma2_config

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(tiny_gemma2_config(len(tok), n_layers=N_LAYERS, sliding_window=8))
    return model.eval()


@pytest.fixture(scope="module")
def batch(tok):
    return tok(PROMPTS, return_tensors="pt", padding=True)


def forward(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, use_cache=False, **kw)


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in decoder_layers(model)]


# --------------------------------------------------------------------------- layers and structures

def test_decoder_layers_finds_gemma_and_gpt2_style_layers(model3):
    assert decoder_layers(model3) is model3.model.layers
    assert decoder_layers(model3.model) is model3.model.layers

    gpt2_like = nn.Module()
    gpt2_like.transformer = nn.Module()
    gpt2_like.transformer.h = nn.ModuleList([nn.Linear(2, 2)])
    assert decoder_layers(gpt2_like) is gpt2_like.transformer.h

    with pytest.raises(ValueError, match=r"model\.layers.*transformer\.h.*LAYER_PATHS"):
        decoder_layers(nn.Linear(2, 2))


def test_residual_of_and_replace_residual_keep_structure():
    hidden, new = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    aux = torch.randn(3)

    assert residual_of(hidden) is hidden
    assert replace_residual(hidden, new) is new

    out = replace_residual((hidden, aux, None), new)
    assert isinstance(out, tuple) and len(out) == 3
    assert out[0] is new and out[1] is aux and out[2] is None
    assert residual_of((hidden, aux)) is hidden  # the tensor, not batch row 0 of it

    out = replace_residual([hidden, aux], new)
    assert isinstance(out, list) and out[0] is new and out[1] is aux

    for bad in ("x", (), (None, hidden), {"hidden": hidden}):
        with pytest.raises(TypeError, match="tensor or a tuple"):
            residual_of(bad)


# --------------------------------------------------------------------------- site convention

def test_resid_post_is_layer_output_and_hidden_states_shifted_by_one(model3, batch):
    """resid_post at L == hidden_states[L + 1] for L < n-1; hidden_states[n] is normed, so the last
    layer is checked through the final norm instead."""
    layers = list(range(N_LAYERS))
    with CaptureHook(model3, layers, positions=None) as cap:
        out = forward(model3, batch, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == N_LAYERS + 1
    for layer in layers[:-1]:
        assert torch.equal(cap.records[layer][0], hs[layer + 1])
    last = cap.records[N_LAYERS - 1][0]
    assert not torch.allclose(last, hs[-1], atol=1e-2)  # hidden_states[-1] is AFTER the final norm
    torch.testing.assert_close(model3.model.norm(last), hs[-1], rtol=0, atol=1e-5)


def test_resid_pre_is_layer_input(model3, batch):
    layers = list(range(N_LAYERS))
    with CaptureHook(model3, layers, site="resid_pre", positions=None) as cap:
        out = forward(model3, batch, output_hidden_states=True)
    for layer in layers:
        assert torch.equal(cap.records[layer][0], out.hidden_states[layer])


def test_capture_positions_and_float32_copies(model3, batch):
    with CaptureHook(model3, [1], positions=None) as full:
        forward(model3, batch)
    with CaptureHook(model3, [1]) as last, CaptureHook(model3, [1], positions=[0, -1]) as two:
        forward(model3, batch)
    everything = full.records[1][0]  # (batch, seq, d_model)
    assert last.records[1][0].shape == (len(PROMPTS), 64)
    assert torch.equal(last.records[1][0], everything[:, -1])
    assert torch.equal(two.records[1][0], everything[:, [0, -1]])
    assert everything.dtype == torch.float32 and everything.device.type == "cpu"

    bf16 = _bf16_copy(model3)
    with CaptureHook(bf16, [0]) as cap:
        forward(bf16, batch)
    assert cap.records[0][0].dtype == torch.float32


def _bf16_copy(model):
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)


# --------------------------------------------------------------------------- firing and removal

def test_each_hook_fires_once_per_forward_pass(model3, batch):
    with CaptureHook(model3, [0, 1, 2]) as cap, CaptureHook(model3, [1], site="resid_pre") as pre:
        for _ in range(3):
            forward(model3, batch)
    assert cap.calls == {0: 3, 1: 3, 2: 3} and pre.calls == {1: 3}
    assert all(len(r) == 3 for r in cap.records.values())
    assert_fired_once(cap, 3)
    assert_fired_once(pre, 3)
    with pytest.raises(AssertionError, match="fire 2 time"):
        assert_fired_once(cap, 2)


def test_hooks_fire_once_per_generate_step(model3, batch):
    steps = 5
    model_calls = []
    handle = model3.register_forward_pre_hook(lambda *a: model_calls.append(1))
    try:
        with CaptureHook(model3, [0, 2]) as cap, SteeringHook(model3, 1, torch.zeros(64), 0.0) as steer:
            _generate(model3, batch, steps)
    finally:
        handle.remove()
    assert len(model_calls) == steps  # prefill + (steps - 1) decode steps
    assert_fired_once(cap, steps)
    assert_fired_once(steer, steps)


def test_hooks_removed_after_context_and_after_error(model3, batch):
    before = hook_counts(model3)
    with CaptureHook(model3, [0, 2]), CaptureHook(model3, [1], site="resid_pre"), \
            SteeringHook(model3, 1, torch.ones(64), 1.0):
        assert hook_counts(model3) != before
    assert hook_counts(model3) == before

    with pytest.raises(RuntimeError, match="boom"):
        with CaptureHook(model3, [0, 1, 2]), SteeringHook(model3, 2, torch.ones(64), 1.0, site="resid_pre"):
            forward(model3, batch)
            raise RuntimeError("boom")
    assert hook_counts(model3) == before

    # an error raised inside a hook (wrong direction size) also leaves nothing behind
    with pytest.raises(ValueError, match="d_model"):
        with SteeringHook(model3, 0, torch.ones(7), 1.0):
            forward(model3, batch)
    assert hook_counts(model3) == before


def test_bad_layers_and_sites_raise_and_register_nothing(model3):
    before = hook_counts(model3)
    with pytest.raises(IndexError, match=r"out of range.*3 decoder layers, indices 0\.\.2"):
        CaptureHook(model3, [0, 3])
    with pytest.raises(IndexError, match="out of range"):
        CaptureHook(model3, [-1])
    with pytest.raises(IndexError, match="out of range"):
        SteeringHook(model3, 5, torch.ones(64), 1.0)
    with pytest.raises(ValueError, match="duplicate"):
        CaptureHook(model3, [1, 1])
    with pytest.raises(ValueError, match="unknown site"):
        CaptureHook(model3, [0], site="resid_mid")
    with pytest.raises(ValueError, match="unknown positions"):
        SteeringHook(model3, 0, torch.ones(64), 1.0, positions="decode")
    with pytest.raises(ValueError, match="vector"):
        SteeringHook(model3, 0, torch.ones(2, 64), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        SteeringHook(model3, 0, torch.full((64,), float("nan")), 1.0)
    hook = CaptureHook(model3, [0])
    with hook, pytest.raises(RuntimeError, match="already active"):
        hook.__enter__()
    assert hook_counts(model3) == before


# --------------------------------------------------------------------------- tuple-returning layers

class TupleLayer(nn.Module):
    """A decoder layer in the older transformers style: returns (hidden, extra)."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, hidden_states, scale=1.0):
        return hidden_states + scale * torch.tanh(self.lin(hidden_states)), "extra"


class TupleModel(nn.Module):
    """Calls its layers positionally or by keyword, and checks the extra output survives hooks."""

    def __init__(self, d: int = 8, n: int = 3, by_keyword: bool = False):
        super().__init__()
        torch.manual_seed(1)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([TupleLayer(d) for _ in range(n)])
        self.by_keyword = by_keyword

    def forward(self, x):
        for layer in self.model.layers:
            out = layer(hidden_states=x) if self.by_keyword else layer(x)
            assert isinstance(out, tuple) and out[1] == "extra"
            x = out[0]
        return x


@pytest.mark.parametrize("by_keyword", [False, True])
@pytest.mark.parametrize("site", ["resid_post", "resid_pre"])
def test_tuple_returning_layers_capture_and_steer(by_keyword, site):
    model = TupleModel(by_keyword=by_keyword)
    x = torch.randn(2, 4, 8)
    with torch.no_grad(), CaptureHook(model, [0, 1, 2], site=site, positions=None) as base:
        model(x)
    d = torch.randn(8)
    with torch.no_grad(), SteeringHook(model, 1, d, 2.0, site=site) as steer, \
            CaptureHook(model, [0, 1, 2], site=site, positions=None) as cap:
        model(x)
    assert steer.applications == 1
    assert torch.equal(cap.records[0][0], base.records[0][0])
    assert torch.equal(cap.records[1][0], base.records[1][0] + 2.0 * d)  # (batch, seq, d) exactly
    assert not torch.allclose(cap.records[2][0], base.records[2][0])


def test_steering_keeps_residual_dtype():
    model = TupleModel().to(torch.bfloat16)
    x = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    d = torch.randn(8, dtype=torch.float64)
    with torch.no_grad():
        plain = model(x)
        with SteeringHook(model, 2, d, 3.0) as steer:
            steered = model(x)
    assert steered.dtype == torch.bfloat16
    assert torch.equal(steered, plain + (3.0 * d.float()).to(torch.bfloat16))
    assert steer.delta(torch.bfloat16, "cpu").dtype == torch.bfloat16


# --------------------------------------------------------------------------- steering on Gemma-2

@pytest.mark.parametrize("site", ["resid_post", "resid_pre"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_alpha_zero_is_bit_identical(model3, batch, site, positions):
    d = torch.randn(64) * 100
    plain = forward(model3, batch).logits
    plain_gen = _generate(model3, batch, 4)
    with SteeringHook(model3, 1, d, 0.0, site=site, positions=positions) as steer:
        steered = forward(model3, batch).logits
        steered_gen = _generate(model3, batch, 4)
    assert torch.equal(plain, steered)
    assert torch.equal(plain_gen, steered_gen)
    assert steer.applications == 0 and steer.calls == {1: 1 + 4}


@pytest.mark.parametrize("site", ["resid_post", "resid_pre"])
def test_steering_adds_alpha_d_at_its_layer_only(model3, batch, site):
    """Capture entered INSIDE the steer on the same layer sees the steered residual (hooks run in
    registration order); capture entered before it sees the original."""
    layer, alpha = 1, 3.5
    d = torch.randn(64)
    with CaptureHook(model3, [0, 1, 2], site=site, positions=None) as base:
        base_logits = forward(model3, batch).logits
    with CaptureHook(model3, [1], site=site, positions=None) as before_steer, \
            SteeringHook(model3, layer, d, alpha, site=site) as steer, \
            CaptureHook(model3, [0, 1, 2], site=site, positions=None) as after_steer:
        logits = forward(model3, batch).logits
    assert_fired_once(steer, 1)
    assert steer.applications == 1
    assert torch.equal(before_steer.records[1][0], base.records[1][0])
    assert torch.equal(after_steer.records[0][0], base.records[0][0])  # upstream layer untouched
    assert torch.equal(after_steer.records[1][0], base.records[1][0] + alpha * d)  # every position, exactly
    assert not torch.allclose(after_steer.records[2][0], base.records[2][0])  # downstream changed
    assert not torch.allclose(logits, base_logits)


def _generate(model, batch, steps):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              pad_token_id=0, eos_token_id=1)


def _generate_with_capture(model, batch, steps, layer, steer=None):
    """Per generate step, the layer's resid_post (float32, all positions of that step)."""
    import contextlib

    with steer or contextlib.nullcontext(), CaptureHook(model, [layer], positions=None) as cap:
        tokens = _generate(model, batch, steps)
    return tokens, cap.records[layer]


def test_steering_generated_positions_under_generate(model3, batch):
    """'generated': the prefill (all prompt positions, seq > 1) is untouched; the first decode step
    (same token, same KV cache) is shifted by exactly alpha * d."""
    layer, alpha, steps = 1, 4.0, 5
    d = torch.randn(64)
    base_tokens, base = _generate_with_capture(model3, batch, steps, layer)
    steer = SteeringHook(model3, layer, d, alpha, positions="generated")
    tokens, steered = _generate_with_capture(model3, batch, steps, layer, steer)

    assert base[0].shape[:2] == batch["input_ids"].shape and all(r.shape[1] == 1 for r in base[1:])
    assert torch.equal(steered[0], base[0])
    assert torch.equal(tokens[:, : batch["input_ids"].shape[1] + 1], base_tokens[:, : batch["input_ids"].shape[1] + 1])
    assert torch.equal(steered[1], base[1] + alpha * d)
    assert steer.calls == {layer: steps} and steer.applications == steps - 1


def test_steering_prompt_positions_under_generate(model3, batch):
    """'prompt': the prefill is shifted by exactly alpha * d at every position of every row
    (padding included, which attention masks out), decode steps are not steered."""
    layer, alpha, steps = 1, 4.0, 5
    d = torch.randn(64)
    _, base = _generate_with_capture(model3, batch, steps, layer)
    steer = SteeringHook(model3, layer, d, alpha, positions="prompt")
    _, steered = _generate_with_capture(model3, batch, steps, layer, steer)

    assert torch.equal(steered[0], base[0] + alpha * d)
    assert steer.calls == {layer: steps} and steer.applications == 1

    steer_all = SteeringHook(model3, layer, d, alpha, positions="all")
    _generate_with_capture(model3, batch, steps, layer, steer_all)
    assert steer_all.applications == steps


def test_numpy_and_tensor_layer_indices_accepted(model3):
    import numpy as np

    assert CaptureHook(model3, [np.int64(2), torch.tensor(0)]).layers == [2, 0]
    with pytest.raises(TypeError, match="integers"):
        CaptureHook(model3, [1.0])
