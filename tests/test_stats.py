import warnings

import numpy as np
import pytest
import torch
from scipy import stats as sps

from pva_sae.stats import latents as stats


def sparse_acts(n, d, p_fire, seed, ties=False):
    """Non-negative activations, firing with probability p_fire; with ties, values come from {0.5, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    fires = torch.rand(n, d, generator=g) < p_fire
    if ties:
        values = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (n, d), generator=g)]
    else:
        values = torch.rand(n, d, generator=g) * 5 + 0.1
    return values * fires


def labels_with(n_correct, n_incorrect, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.ones(n_correct, dtype=torch.bool), torch.zeros(n_incorrect, dtype=torch.bool)])
    return y[torch.randperm(y.numel(), generator=g)]


def scipy_t(acts, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = acts[labels].double().numpy(), acts[~labels].double().numpy()
        return sps.ttest_ind(a, b, equal_var=False, axis=0).statistic


# --------------------------------------------------------------------------- Welch t against scipy


@pytest.mark.parametrize("seed,n_c,n_i,dense,ties", [
    (0, 40, 60, True, False), (1, 7, 93, False, False), (2, 150, 350, False, True), (3, 2, 5, True, False),
])
def test_welch_t_matches_scipy(seed, n_c, n_i, dense, ties):
    labels = labels_with(n_c, n_i, seed)
    if dense:
        g = torch.Generator().manual_seed(seed)
        acts = torch.randn(n_c + n_i, 64, generator=g) * 3 + 1
    else:
        acts = sparse_acts(n_c + n_i, 300, 0.2, seed, ties=ties)
    ours = stats.welch_t(acts, labels).numpy()
    ref = scipy_t(acts, labels)
    defined = np.isfinite(ref)
    assert defined.sum() > 0.5 * ref.size
    np.testing.assert_allclose(ours[defined], ref[defined], rtol=2e-4, atol=2e-5)
    # where scipy is undefined here it is because both groups have zero variance: we report 0
    assert np.all(ours[~defined] == 0)


def test_welch_t_zero_variance_in_both_groups_is_zero():
    acts = torch.tensor([[0.0, 1.0, 3.0], [0.0, 1.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([True, True, False, False])
    t = stats.welch_t(acts, labels)
    assert t[0] == 0  # never fires: scipy says NaN
    assert t[1] == 0  # constant 1 vs constant 0: scipy says inf; documented convention is 0
    assert t[2] == pytest.approx(scipy_t(acts, labels)[2], rel=1e-5)


def test_welch_t_single_sample_group_is_nan_like_scipy():
    acts = sparse_acts(6, 10, 0.5, seed=4) + 0.01
    labels = torch.tensor([True, False, False, False, False, False])
    t = stats.welch_t(acts, labels)
    assert torch.isnan(t).all()
    assert np.isnan(scipy_t(acts, labels)).all()
    # the other statistics are still defined
    scores = stats.score_layer(acts, labels)
    assert torch.isfinite(scores["sep_correct"]).all() and torch.isnan(scores["t_correct"]).all()


def test_welch_t_by_hand():
    # correct: [1, 3] (mean 2, var 2); incorrect: [0, 0, 3] (mean 1, var 3): t = 1 / sqrt(2/2 + 3/3) = 1/sqrt 2
    acts = torch.tensor([[1.0], [3.0], [0.0], [0.0], [3.0]])
    labels = torch.tensor([True, True, False, False, False])
    assert stats.welch_t(acts, labels).item() == pytest.approx(1 / np.sqrt(2), rel=1e-6)


def test_empty_group_and_bad_shapes_raise():
    acts = torch.ones(3, 2)
    with pytest.raises(ValueError, match="no incorrect task"):
        stats.welch_t(acts, torch.tensor([True, True, True]))
    with pytest.raises(ValueError, match="no correct task"):
        stats.firing_frequencies(acts, torch.tensor([False, False, False]))
    with pytest.raises(ValueError, match="one entry per row"):
        stats.score_layer(acts, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="2-D"):
        stats.score_layer(torch.ones(3), torch.tensor([True, False, True]))


# --------------------------------------------------------------------------- frequencies and separation by hand


def test_firing_frequencies_and_separation_by_hand():
    acts = torch.tensor([
        [0.0, 2.0, 0.1],   # correct
        [1.0, 0.0, 0.2],   # correct
        [0.0, 3.0, 0.0],   # incorrect
        [0.0, 1.0, -1.0],  # incorrect (negative does not fire)
    ])
    labels = torch.tensor([True, True, False, False])
    f_c, f_i = stats.firing_frequencies(acts, labels)
    assert f_c.tolist() == [0.5, 0.5, 1.0]
    assert f_i.tolist() == [0.0, 1.0, 0.0]
    s_c, s_i = stats.separation_scores(f_c, f_i)
    assert s_c.tolist() == [0.5, -0.5, 1.0]
    assert s_i.tolist() == [-0.5, 0.5, -1.0]
    m_c, m_i = stats.mean_activations(acts, labels)
    assert m_c.tolist() == pytest.approx([0.5, 1.0, 0.15])
    assert m_i.tolist() == pytest.approx([0.0, 2.0, -0.5])


def test_labels_as_integers_and_low_precision_acts():
    acts = sparse_acts(20, 8, 0.5, seed=5)
    y_bool = labels_with(8, 12, seed=5)
    ref = stats.score_layer(acts, y_bool)
    for name, value in stats.score_layer(acts, y_bool.long()).items():
        torch.testing.assert_close(value, ref[name], equal_nan=True)
    half = stats.score_layer(acts.to(torch.bfloat16), y_bool)
    assert all(v.dtype == torch.float32 for v in half.values())
    with pytest.raises(ValueError, match="boolean"):
        stats.score_layer(acts, torch.full((20,), 2))


def test_score_layer_is_consistent_with_the_single_functions():
    acts = sparse_acts(60, 40, 0.3, seed=6)
    labels = labels_with(25, 35, seed=6)
    scores = stats.score_layer(acts, labels)
    assert set(scores) == set(stats.SCORE_KEYS)
    f_c, f_i = stats.firing_frequencies(acts, labels)
    torch.testing.assert_close(scores["f_correct"], f_c)
    torch.testing.assert_close(scores["f_incorrect"], f_i)
    torch.testing.assert_close(scores["sep_correct"], f_c - f_i)
    torch.testing.assert_close(scores["sep_incorrect"], f_i - f_c)
    torch.testing.assert_close(scores["t_correct"], stats.welch_t(acts, labels))
    torch.testing.assert_close(scores["t_incorrect"], -scores["t_correct"])
    m_c, m_i = stats.mean_activations(acts, labels)
    torch.testing.assert_close(scores["mean_correct"], m_c)
    torch.testing.assert_close(scores["mean_incorrect"], m_i)


# --------------------------------------------------------------------------- planted signal


def test_planted_latents_rank_first_on_separation_and_t():
    n, d = 500, 4096
    labels = labels_with(150, 350, seed=7)
    acts = sparse_acts(n, d, 100 / d, seed=7)  # ~100 latents fire per task, like a GemmaScope SAE
    g = torch.Generator().manual_seed(70)
    good, bad = 1234, 77
    u = torch.rand(n, generator=g)
    acts[:, good] = torch.where(labels, u < 0.8, u < 0.1) * (torch.rand(n, generator=g) * 4 + 1)
    acts[:, bad] = torch.where(labels, u < 0.15, u < 0.7) * (torch.rand(n, generator=g) * 4 + 1)
    scores = stats.score_layer(acts, labels)
    for key, latent in (("sep_correct", good), ("t_correct", good), ("sep_incorrect", bad), ("t_incorrect", bad)):
        indices, values = stats.top_k(scores[key], 3)
        assert indices[0].item() == latent, key
        assert values[0] > values[1]
    # excluding the planted latent (e.g. as a general-language latent) removes it from the ranking
    mask = torch.zeros(d, dtype=torch.bool)
    mask[good] = True
    indices, _ = stats.top_k(scores["sep_correct"], 5, exclude_mask=mask)
    assert good not in indices.tolist()


# --------------------------------------------------------------------------- top_k


def test_top_k_exclusion_nan_ties_and_short_lists():
    scores = torch.tensor([0.1, 0.9, float("nan"), 0.9, 0.5, -1.0])
    indices, values = stats.top_k(scores, 3)
    assert indices.tolist() == [1, 3, 4]          # ties keep index order, NaN skipped
    assert values.tolist() == pytest.approx([0.9, 0.9, 0.5])
    exclude = torch.tensor([False, True, False, False, False, False])
    assert stats.top_k(scores, 2, exclude_mask=exclude)[0].tolist() == [3, 4]
    indices, values = stats.top_k(scores, 10, exclude_mask=exclude)
    assert indices.tolist() == [3, 4, 0, 5]       # only the 4 that remain
    assert stats.top_k(scores, 0)[0].numel() == 0
    with pytest.raises(ValueError, match="bool tensor"):
        stats.top_k(scores, 2, exclude_mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="1-D"):
        stats.top_k(torch.zeros(2, 3), 1)


# --------------------------------------------------------------------------- all layers


def test_score_all_layers_accepts_mapping_pairs_and_function():
    labels = labels_with(10, 14, seed=8)
    per_layer = {layer: sparse_acts(24, 16, 0.4, seed=layer) for layer in (0, 3, 5)}
    expected = {layer: stats.score_layer(a, labels) for layer, a in per_layer.items()}

    def check(result, layers):
        assert list(result) == layers
        for layer in layers:
            for key in stats.SCORE_KEYS:
                torch.testing.assert_close(result[layer][key], expected[layer][key], equal_nan=True)

    check(stats.score_all_layers(per_layer, labels), [0, 3, 5])
    check(stats.score_all_layers(((k, v) for k, v in per_layer.items()), labels), [0, 3, 5])
    check(stats.score_all_layers(per_layer.__getitem__, labels, layers=[5, 0]), [5, 0])
    check(stats.score_all_layers(per_layer, labels, layers=[3]), [3])
    with pytest.raises(ValueError, match="layers="):
        stats.score_all_layers(per_layer.__getitem__, labels)


@pytest.mark.gpu
def test_score_layer_on_gpu_matches_cpu():
    acts = sparse_acts(200, 1024, 0.1, seed=9)
    labels = labels_with(60, 140, seed=9)
    cpu = stats.score_layer(acts, labels)
    gpu = stats.score_layer(acts.cuda(), labels.cuda())
    for key in stats.SCORE_KEYS:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-4, atol=1e-5, equal_nan=True)
