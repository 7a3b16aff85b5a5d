"""JumpReLU SAE training: straight-through gradients, unit folding, a planted dictionary, saving, activations."""

import json
import math

import numpy as np
import pytest
import torch

from pva_sae.sae.train import (
    SAETrainConfig,
    _fold_scale,
    collect_activations,
    encode_jumprelu,
    evaluate_sae,
    input_scale,
    jumprelu_ste,
    meets_targets,
    save_sae,
    step_ste,
    train_sae,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices run faster on one thread, and a busy machine then slows the test less."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def planted(n: int, d: int = 64, m: int = 64, k: float = 4, seed: int = 0):
    """x = sparse non-negative codes @ D + offset + noise, D with m unit rows; returns (x, D)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    active = torch.rand(n, m, generator=g) < k / m
    codes = active * (torch.rand(n, m, generator=g) * 2 + 1)
    return codes @ D + 0.5 + 0.05 * torch.randn(n, d, generator=g), D


# --------------------------------------------------------------------------- straight-through estimators

def test_jumprelu_forward_and_pseudo_derivatives():
    eps = 0.1
    pre = torch.tensor([[0.30, 0.52, 1.20], [0.48, 0.10, 0.99]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 1.0], requires_grad=True)
    out = jumprelu_ste(pre, theta, eps)
    assert torch.allclose(out.detach(), torch.tensor([[0.0, 0.52, 1.2], [0.0, 0.0, 0.0]]))
    out.sum().backward()
    # d/dpre = H(pre - theta); d/dtheta = -(theta / eps) K((pre - theta) / eps), K = 1 on (-1/2, 1/2), summed
    # over rows: one entry of each column lies within eps/2 of its threshold (0.48, 0.52, 0.99).
    assert torch.equal(pre.grad, torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(theta.grad, torch.tensor([-5.0, -5.0, -10.0]))


def test_step_pseudo_derivative_and_no_input_gradient():
    eps = 0.1
    pre = torch.tensor([[0.52, 2.0], [0.1, 0.98]], requires_grad=True)
    theta = torch.tensor([0.5, 1.0], requires_grad=True)
    h = step_ste(pre, theta, eps)
    assert torch.equal(h.detach(), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    h.sum().backward()
    assert pre.grad is None or torch.count_nonzero(pre.grad) == 0
    assert torch.allclose(theta.grad, torch.tensor([-1 / eps, -1 / eps]))


# --------------------------------------------------------------------------- units and evaluation

def test_folding_the_input_scale_gives_the_same_reconstruction():
    g = torch.Generator().manual_seed(1)
    d, f, s = 8, 16, 0.37
    norm = {"W_enc": torch.randn(d, f, generator=g), "b_enc": torch.randn(f, generator=g) * 0.1,
            "W_dec": torch.randn(f, d, generator=g), "b_dec": torch.randn(d, generator=g),
            "log_threshold": torch.full((f,), math.log(0.2))}
    x = torch.randn(32, d, generator=g) * 3
    xn = x * s
    pre = xn @ norm["W_enc"] + norm["b_enc"]
    acts = torch.relu(pre) * (pre > 0.2)
    recon_norm = acts @ norm["W_dec"] + norm["b_dec"]
    raw = {k: torch.as_tensor(v) for k, v in _fold_scale(norm, s).items()}
    recon_raw = encode_jumprelu(x, raw) @ raw["W_dec"] + raw["b_dec"]
    assert torch.allclose(recon_raw * s, recon_norm, atol=1e-5)
    assert set(raw) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}


def test_input_scale_gives_unit_mean_squared_norm():
    x = torch.randn(1000, 5) * 7 + 2
    s = input_scale(x)
    assert (x * s).pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=1e-5)


def test_evaluate_on_a_hand_built_exact_sae():
    # Latents +e_i and -e_i reconstruct any 2-d vector exactly; the threshold 0 fires on every non-zero sign.
    eye = torch.eye(2)
    params = {"W_enc": torch.cat([eye, -eye], 1), "W_dec": torch.cat([eye, -eye], 0), "b_enc": torch.zeros(4),
              "b_dec": torch.zeros(2), "threshold": torch.zeros(4)}
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, -1.0]])
    ev = evaluate_sae(params, x)
    assert ev["fve"] == pytest.approx(1.0)
    assert ev["mean_l0"] == pytest.approx(2.0)
    assert ev["dead_fraction"] == 0.0
    params["threshold"] = torch.tensor([0.0, 0.0, 0.0, 5.0])  # latent 3 (-e_2 above 5) never fires
    assert evaluate_sae(params, x)["dead_fraction"] == pytest.approx(0.25)


def test_meets_targets():
    good = {"fve": 0.85, "mean_l0": 40, "dead_fraction": 0.1}
    assert meets_targets(good)
    assert not meets_targets({**good, "fve": 0.79})
    assert not meets_targets({**good, "mean_l0": 120})
    assert not meets_targets({**good, "mean_l0": 5})
    assert not meets_targets({**good, "dead_fraction": 0.3})


# --------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def planted_result():
    torch.set_num_threads(1)
    x, D = planted(40_000)
    cfg = SAETrainConfig(d_sae=96, steps=500, batch_size=512, lr=3e-3, threshold_lr=3e-2, sparsity_coefficient=3e-2,
                         sparsity_warmup_steps=100, lr_warmup_steps=20, target_l0=4.0, target_l0_rate=0.02,
                         dead_after_tokens=20_000, device="cpu", seed=0, log_every=100)
    return train_sae(x[:35_000], cfg, eval_acts=x[35_000:]), D


def test_planted_dictionary_is_recovered(planted_result):
    result, D = planted_result
    ev = result.stats["eval"]
    assert ev["fve"] > 0.9
    assert 2.0 <= ev["mean_l0"] <= 8.0
    assert ev["dead_fraction"] < 0.5
    W_dec = torch.as_tensor(result.params["W_dec"])                        # (d_sae, d)
    best = (D @ W_dec.t()).max(dim=1).values                                # best cosine per planted feature
    assert (best > 0.9).float().mean() > 0.8


def test_trained_sae_is_in_raw_units_with_unit_decoder_rows(planted_result):
    result, _ = planted_result
    p = result.params
    assert all(v.dtype == np.float32 for v in p.values())
    assert np.allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, atol=1e-4)
    assert (p["threshold"] > 0).all()
    assert result.stats["input_scale"] > 0 and result.history
    assert result.history[-1]["step"] == 499


def test_training_is_deterministic():
    x, _ = planted(4_000, d=16, m=16, seed=3)
    cfg = SAETrainConfig(d_sae=32, steps=30, batch_size=256, device="cpu", seed=5, sparsity_warmup_steps=10,
                         lr_warmup_steps=5)
    a, b = train_sae(x, cfg), train_sae(x, cfg)
    for key in a.params:
        assert np.array_equal(a.params[key], b.params[key])


def test_save_sae_writes_a_loadable_gemmascope_file(tmp_path, planted_result):
    from pva_sae.sae.loaders import load_sae_file

    result, _ = planted_result
    path = save_sae(result, tmp_path / "layer_0", extra={"layer": 0})
    sae = load_sae_file(path, expected_d_model=64)
    x, _ = planted(100, seed=9)
    p = {k: torch.as_tensor(v) for k, v in result.params.items()}
    assert torch.allclose(sae.encode(x), encode_jumprelu(x, p))
    stats = json.loads((tmp_path / "layer_0" / "stats.json").read_text())
    assert stats["layer"] == 0 and stats["arch"] == "jumprelu" and "eval" in stats["stats"]
    assert stats["config"]["d_sae"] == 96


def test_bad_input_shape_is_refused():
    with pytest.raises(ValueError, match="n_tokens, d_model"):
        train_sae(torch.zeros(10), SAETrainConfig(device="cpu"))


# --------------------------------------------------------------------------- activations

def test_collect_activations_matches_hidden_states(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    seqs = [tok(t)["input_ids"] for t in ("def f(x):\n    return x + 1\n", "import os", "a = [1, 2, 3]\nprint(a)")]
    layers = [0, 1]
    acts = collect_activations(model, seqs, layers, batch_size=2, pad_id=tok.pad_token_id)
    assert acts[0].shape == (sum(len(s) - 1 for s in seqs), model.config.hidden_size)
    start = 0
    for s in seqs:
        with torch.no_grad():
            hidden = model(torch.tensor([s]), output_hidden_states=True).hidden_states
        n = len(s) - 1
        # hidden_states[L + 1] is the output of layer L, except the last entry, which is after the final norm.
        assert torch.allclose(acts[0][start:start + n], hidden[1][0, 1:], atol=1e-5)
        start += n
    single = collect_activations(model, seqs[:1], layers, batch_size=1, pad_id=tok.pad_token_id)
    assert torch.allclose(single[1], acts[1][:len(seqs[0]) - 1], atol=1e-5)  # padding changes nothing


def test_collect_activations_keeps_the_first_token_when_asked(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    seqs = [tok("x = 1")["input_ids"]]
    acts = collect_activations(model, seqs, [1], skip_first=False, pad_id=tok.pad_token_id)
    assert acts[1].shape[0] == len(seqs[0])


def test_token_batches_bound_padding_and_keep_order():
    from pva_sae.sae.train import token_batches

    lengths = [3, 4, 4, 10, 40, 41, 200]
    batches = token_batches(lengths, batch_size=3, max_batch_tokens=100)
    assert [i for b in batches for i in b] == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 100
    assert [6] in batches  # longer than the budget: alone


def test_train_model_saes_writes_one_loadable_sae_per_layer(tiny_loaded, tmp_path):
    from pva_sae.sae.loaders import load_sae_file
    from pva_sae.sae.train import train_model_saes

    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 3}\n" for i in range(40)]
    seqs = [tok(t)["input_ids"] for t in texts]
    cfg = SAETrainConfig(d_sae=32, steps=20, batch_size=128, device="cpu", sparsity_warmup_steps=5, lr_warmup_steps=2)
    results = train_model_saes(model, seqs, [0, 1], tmp_path, cfg, pad_id=tok.pad_token_id)
    assert set(results) == {0, 1}
    for layer in (0, 1):
        sae = load_sae_file(tmp_path / f"layer_{layer}" / "params.npz", expected_d_model=model.config.hidden_size)
        assert sae.d_sae == 32 and "eval" in results[layer].stats


def test_saes_trained_together_keep_their_own_targets():
    from pva_sae.sae.train import train_saes

    x, _ = planted(20_000, d=32, m=48, k=6, seed=4)
    cfg = SAETrainConfig(d_sae=64, steps=300, batch_size=512, lr=3e-3, threshold_lr=3e-2, sparsity_coefficient=3e-2,
                         sparsity_warmup_steps=60, lr_warmup_steps=10, target_l0_rate=0.03, device="cpu", seed=1)
    sparse, dense = train_saes([x[:18_000], x[:18_000] * 5.0], cfg, eval_acts=[x[18_000:], x[18_000:] * 5.0],
                               target_l0=[3.0, 12.0], names=["sparse", "dense"])
    assert sparse.stats["eval"]["mean_l0"] < dense.stats["eval"]["mean_l0"]
    assert sparse.stats["target_l0"] == 3.0 and dense.stats["trained_together"] == 2
    assert sparse.stats["input_scale"] == pytest.approx(dense.stats["input_scale"] * 5.0, rel=1e-5)
    assert dense.stats["eval"]["fve"] > 0.6
