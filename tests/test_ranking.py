import torch

from pva_sae.sae.general_filter import cache_key, word_prefixes
from pva_sae.stats.latents import rank_latents


def fake_scores(n_latents=6):
    fc = torch.tensor([0.9, 0.1, 0.5, 0.8, 0.0, 0.3])[:n_latents]
    fi = torch.tensor([0.1, 0.7, 0.5, 0.2, 0.0, 0.9])[:n_latents]
    t = (fc - fi) * 10
    return {"f_correct": fc, "f_incorrect": fi, "sep_correct": fc - fi, "sep_incorrect": fi - fc,
            "t_correct": t, "t_incorrect": -t, "mean_correct": fc, "mean_incorrect": fi}


def test_rank_latents_orders_and_filters():
    scores = {0: fake_scores(), 3: fake_scores()}
    scores[3]["sep_correct"] = scores[3]["sep_correct"] * 0.5
    general = {0: torch.tensor([0.5, 0, 0, 0, 0, 0]), 3: torch.zeros(6)}  # latent 0 of layer 0 is "general"
    table = rank_latents(scores, general, max_general=0.02, n_top=2, link=lambda layer, i: f"L{layer}/{i}")
    overall = [r for r in table if r["scope"] == "overall" and r["metric"] == "separation" and r["direction"] == "correct"]
    assert [(r["layer"], r["latent"], r["rank"]) for r in overall] == [(0, 3, 1), (3, 0, 2)]
    assert overall[1]["neuronpedia"] == "L3/0"
    layer0 = [r for r in table if r["scope"] == "layer" and r["layer"] == 0 and r["metric"] == "separation"
              and r["direction"] == "incorrect"]
    assert [r["latent"] for r in layer0] == [1, 5]
    assert all(not (r["layer"] == 0 and r["latent"] == 0) for r in table)
    assert {r["metric"] for r in table} == {"separation", "t"}


def test_word_prefixes_are_seeded_and_end_on_a_word():
    docs = ["alpha beta gamma delta", "one two", "x"]
    a, b = word_prefixes(docs, seed=1), word_prefixes(docs, seed=1)
    assert a == b
    for doc, prefix in zip(docs, a):
        assert doc.startswith(prefix) and prefix and not prefix.endswith(" ")
    many = ["w " * 50] * 20
    assert len(set(map(len, word_prefixes(many, seed=0)))) > 1


def test_cache_key_depends_on_every_part():
    base = {"model": "m", "seed": 1}
    assert cache_key(base) == cache_key(dict(base))
    assert cache_key(base) != cache_key({**base, "seed": 2})
