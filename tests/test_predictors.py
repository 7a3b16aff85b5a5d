"""Predictors: sealed validation labels, fitted baselines, planted signals."""

import numpy as np
import pytest

from pva_sae.stats.classify import auroc
from pva_sae.stats.predictors import Features, LeakageError, SealedLabels, fit_predictors, random_scores


class FixedSAE:
    """An 'SAE' whose latent 0 is the first residual coordinate (ReLU), for tests."""

    class W:
        device = "cpu"

    W_enc = W()

    def encode(self, x):
        return x.clamp(min=0)


def planted(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < 0.4
    acts = rng.normal(size=(n, 1, d)).astype(np.float32)
    acts[:, 0, 0] += np.where(correct, 1.5, 0.0)       # latent 0: fires more on correct tasks
    acts[:, 0, 3] += np.where(correct, 0.0, 1.0)       # a second, dense signal for the probe
    ids = list(range(100, 100 + n))
    split_of = {t: ("sae" if i % 10 < 5 else "tuning" if i % 10 == 5 else "validation") for i, t in enumerate(ids)}
    feats = Features(acts, ids, [0])
    feats.add_latent(FixedSAE(), 0, 0)
    labels = dict(zip(ids, correct.tolist()))
    return feats, labels, split_of, ids


def split(split_of, ids, name):
    return [t for t in ids if split_of[t] == name]


SELECTION = {"correct": {"layer": 0, "latent": 0}, "incorrect": {"layer": 0, "latent": 0}}


def test_sealed_split_cannot_be_read_until_unsealed():
    sealed = SealedLabels({1: True, 2: False}, {1: "sae", 2: "validation"})
    assert sealed([1]).tolist() == [True]
    with pytest.raises(LeakageError, match="validation"):
        sealed([1, 2])
    sealed.unseal("validation")
    assert sealed([2]).tolist() == [False]


def test_fitting_reads_only_sae_and_tuning_labels():
    feats, labels, split_of, ids = planted()
    sealed = SealedLabels(labels, split_of)
    preds = fit_predictors(SELECTION, feats, sealed, split(split_of, ids, "sae"), split(split_of, ids, "tuning"),
                           folds=3, n_cs=4, seed=0)
    assert set(sealed.reads) == {"sae", "tuning"}
    assert {p.name for p in preds} == {"latent", "latent_fires", "probe", "diff_means", "majority", "always_positive",
                                       "random"}


def test_choices_do_not_depend_on_validation_labels():
    feats, labels, split_of, ids = planted()
    flipped = {t: (not v if split_of[t] == "validation" else v) for t, v in labels.items()}
    args = (split(split_of, ids, "sae"), split(split_of, ids, "tuning"))
    a = fit_predictors(SELECTION, feats, SealedLabels(labels, split_of), *args, folds=3, n_cs=4, seed=0)
    b = fit_predictors(SELECTION, feats, SealedLabels(flipped, split_of), *args, folds=3, n_cs=4, seed=0)
    assert [p.as_dict() for p in a] == [p.as_dict() for p in b]


def test_planted_signal_is_recovered_on_validation():
    feats, labels, split_of, ids = planted(n=600)
    preds = fit_predictors(SELECTION, feats, SealedLabels(labels, split_of), split(split_of, ids, "sae"),
                           split(split_of, ids, "tuning"), folds=3, n_cs=4, seed=0)
    val = split(split_of, ids, "validation")
    y = np.array([labels[t] for t in val])
    by = {(p.direction, p.name): p for p in preds}
    assert auroc(by["correct", "latent"].score(feats, val), y) > 0.75
    assert auroc(by["correct", "probe"].score(feats, val), y) > 0.85     # sees both planted coordinates
    assert auroc(by["incorrect", "probe"].score(feats, val), ~y) > 0.85
    assert auroc(by["correct", "diff_means"].score(feats, val), y) > 0.8
    assert 0.35 < auroc(by["correct", "random"].score(feats, val), y) < 0.65
    assert by["correct", "majority"].info["majority_class"] == "incorrect"
    assert by["incorrect", "majority"].score(feats, val).min() >= by["incorrect", "majority"].threshold
    always = by["correct", "always_positive"]
    assert (always.score(feats, val) >= always.threshold).all()


def test_random_scores_depend_on_task_id_only():
    assert random_scores(3, [5, 9]).tolist() == [random_scores(3, [5])[0], random_scores(3, [9])[0]]
    assert random_scores(3, [5])[0] != random_scores(4, [5])[0]
