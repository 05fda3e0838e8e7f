"""Tests of the resampled AUROC and the paired bootstrap of an AUROC difference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from rosmap_geneformer.analysis.evaluation.patient_level import (
    paired_auroc_difference,
    resampled_auroc,
)
from rosmap_geneformer.errors import InputError


def _donors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alternating labels, a good method (label + noise) and a weaker one (more noise)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    good = labels + rng.normal(0.0, 0.8, n)
    weak = labels + rng.normal(0.0, 2.0, n)
    return labels, good, weak


# --------------------------------------------------------------------------------------------
# resampled_auroc


def test_resampled_auroc_with_unit_weights_is_the_auroc_ties_included() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.5, 0.5, 0.5, 0.7, 0.2, 0.9])  # ties across classes at 0.5
    pos, neg = scores[labels == 1], scores[labels == 0]
    value = resampled_auroc(pos, neg, np.ones((1, pos.size)), np.ones((1, neg.size)))
    assert value.shape == (1,)
    assert value[0] == pytest.approx(roc_auc_score(labels, scores))


def test_resampled_auroc_weights_act_as_repeated_donors() -> None:
    pos, neg = np.array([0.9, 0.3, 0.6]), np.array([0.4, 0.1])
    w_pos = np.array([[2, 0, 1], [0, 3, 0]])
    w_neg = np.array([[1, 1], [2, 0]])
    values = resampled_auroc(pos, neg, w_pos, w_neg)
    for row in range(2):
        p = np.repeat(pos, w_pos[row])
        n = np.repeat(neg, w_neg[row])
        labels = np.r_[np.ones(p.size), np.zeros(n.size)]
        assert values[row] == pytest.approx(roc_auc_score(labels, np.r_[p, n]))


# --------------------------------------------------------------------------------------------
# paired_auroc_difference


def test_identical_scores_differ_by_zero_with_p_one() -> None:
    labels, good, _ = _donors(30, seed=0)
    result = paired_auroc_difference(labels, good, good.copy(), n_boot=200, seed=0)
    assert result == {
        "difference": 0.0,
        "ci_low": 0.0,
        "ci_high": 0.0,
        "p_value": 1.0,
        "n_boot": 200,
    }


def test_a_perfect_method_beats_a_random_one() -> None:
    rng = np.random.default_rng(3)
    labels = np.arange(40) % 2
    perfect = labels + rng.uniform(0.0, 0.5, 40)  # every positive above every negative
    random = rng.uniform(0.0, 1.0, 40)
    n_boot = 500
    result = paired_auroc_difference(labels, perfect, random, n_boot=n_boot, seed=1)
    expected = 1.0 - roc_auc_score(labels, random)
    assert result["difference"] == pytest.approx(expected)
    assert result["difference"] > 0.2
    assert 0.0 < result["ci_low"] <= result["difference"] <= result["ci_high"] <= 1.0
    # No resample favours the random method: p is the floor 1 / n_boot.
    assert result["p_value"] == pytest.approx(1.0 / n_boot)
    assert result["n_boot"] == n_boot


def test_the_difference_is_the_auroc_difference_and_is_seeded() -> None:
    labels, good, weak = _donors(50, seed=1)
    result = paired_auroc_difference(labels, good, weak, n_boot=300, seed=4)
    assert result["difference"] == pytest.approx(
        roc_auc_score(labels, good) - roc_auc_score(labels, weak)
    )
    assert result["ci_low"] <= result["difference"] <= result["ci_high"]
    assert 0.0 < result["p_value"] <= 1.0
    assert result == paired_auroc_difference(labels, good, weak, n_boot=300, seed=4)
    assert result != paired_auroc_difference(labels, good, weak, n_boot=300, seed=5)


def test_swapping_the_methods_negates_the_difference() -> None:
    labels, good, weak = _donors(40, seed=2)
    forward = paired_auroc_difference(labels, good, weak, n_boot=400, seed=0)
    backward = paired_auroc_difference(labels, weak, good, n_boot=400, seed=0)
    assert forward["difference"] != 0.0
    assert backward["difference"] == pytest.approx(-forward["difference"])
    assert backward["ci_low"] == pytest.approx(-forward["ci_high"])
    assert backward["ci_high"] == pytest.approx(-forward["ci_low"])
    assert backward["p_value"] == pytest.approx(forward["p_value"])


def test_the_result_does_not_depend_on_donor_order() -> None:
    labels, good, weak = _donors(40, seed=5)
    reference = paired_auroc_difference(labels, good, weak, n_boot=400, seed=0)
    rng = np.random.default_rng(11)
    for _ in range(3):
        order = rng.permutation(labels.size)
        shuffled = paired_auroc_difference(
            labels[order], good[order], weak[order], n_boot=400, seed=0
        )
        assert shuffled["difference"] == pytest.approx(reference["difference"])
        assert shuffled["ci_low"] == pytest.approx(reference["ci_low"])
        assert shuffled["ci_high"] == pytest.approx(reference["ci_high"])
        assert shuffled["p_value"] == pytest.approx(reference["p_value"])


def test_the_bootstrap_keeps_the_pairing() -> None:
    # Two methods that agree on every donor up to a constant shift have the same AUROC on every
    # resample: a paired bootstrap gives a zero-width interval, an unpaired one would not.
    labels, good, _ = _donors(30, seed=6)
    result = paired_auroc_difference(labels, good, good + 5.0, n_boot=200, seed=0)
    assert (result["difference"], result["ci_low"], result["ci_high"]) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("labels", [[1, 1, 1, 1], [0, 0, 0]])
def test_a_missing_class_gives_none(labels: list[int]) -> None:
    scores = np.linspace(0.1, 0.9, len(labels))
    result = paired_auroc_difference(labels, scores, scores[::-1], n_boot=100, seed=0)
    assert result == {
        "difference": None,
        "ci_low": None,
        "ci_high": None,
        "p_value": None,
        "n_boot": 100,
    }


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(InputError, match="differ in length"):
        paired_auroc_difference([0, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2], n_boot=10)
    with pytest.raises(InputError, match="outside 0..1"):
        paired_auroc_difference([0, 2], [0.1, 0.2], [0.1, 0.2], n_boot=10)
