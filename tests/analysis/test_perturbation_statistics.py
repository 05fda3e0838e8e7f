"""Tests for rosmap_geneformer.analysis.perturbation.statistics: state shifts, the rank-sum
tests, BH FDR and the ranked table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rosmap_geneformer.analysis.perturbation import statistics

# ------------------------------------------------------------------------------------------
# Statistics


def test_benjamini_hochberg_matches_scipy():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.5, 0.0001, 0.04, 0.9])
    np.testing.assert_allclose(
        statistics.benjamini_hochberg(p), stats.false_discovery_control(p, method="bh")
    )
    # By hand for three tests: sorted 0.01, 0.02, 0.04 -> 0.03, 0.03, 0.04.
    np.testing.assert_allclose(
        statistics.benjamini_hochberg([0.04, 0.01, 0.02]), [0.04, 0.03, 0.03]
    )
    with_nan = statistics.benjamini_hochberg([0.01, np.nan, 0.02])
    assert np.isnan(with_nan[1])
    np.testing.assert_allclose(with_nan[[0, 2]], [0.02, 0.02])


def test_shift_statistics_rank_sum_against_the_pooled_null():
    rng = np.random.default_rng(0)
    shifts = {
        5: rng.normal(0.5, 0.1, 20),
        6: rng.normal(0.0, 0.1, 30),
        7: rng.normal(0.0, 0.1, 25),
    }
    table = statistics.shift_statistics(shifts, null_size=100_000, seed=0)
    null = np.concatenate([shifts[5], shifts[6], shifts[7]])
    for gene, values in shifts.items():
        assert table.loc[gene, "mean_shift"] == pytest.approx(values.mean())
        assert table.loc[gene, "p"] == pytest.approx(stats.ranksums(values, null).pvalue)
        assert table.loc[gene, "n_cells"] == values.size
    np.testing.assert_allclose(
        table["fdr"], stats.false_discovery_control(table["p"].to_numpy(), method="bh")
    )
    assert table.loc[5, "fdr"] < 1e-4
    # A downsampled null is seeded: same seed, same numbers.
    small = statistics.shift_statistics(shifts, null_size=30, seed=3)
    again = statistics.shift_statistics(shifts, null_size=30, seed=3)
    pd.testing.assert_frame_equal(small, again)
    assert statistics.pooled_null(shifts, size=30, seed=3).size == 30


def test_state_shifts_are_cosine_differences():
    original = np.array([1.0, 0.0])
    perturbed = np.array([[1.0, 1.0], [0.0, 1.0]])
    shifts = statistics.state_shifts(perturbed, original, {"goal": np.array([0.0, 2.0])})
    np.testing.assert_allclose(shifts["goal"], [np.sqrt(0.5), 1.0])


def test_perturbation_table_ranks_by_goal_or_net_shift():
    goal = {5: np.array([0.3, 0.3]), 6: np.array([0.2, 0.2]), 7: np.array([0.1, 0.1])}
    start = {5: np.array([0.3, 0.3]), 6: np.array([-0.1, -0.1]), 7: np.array([0.0, 0.0])}
    net = {t: goal[t] - start[t] for t in goal}
    shifts = {"control": goal, "AD": start, "net": net}
    cosines = {t: np.array([0.9, 0.9]) for t in goal}
    by_goal = statistics.perturbation_table(shifts, cosines, goal_state="control")
    by_net = statistics.perturbation_table(shifts, cosines, goal_state="control", rank_by="net")
    assert by_goal.index.tolist() == [5, 6, 7]
    assert by_net.index.tolist() == [6, 7, 5]
    assert list(by_net.columns) == [
        "mean_shift",
        "p",
        "fdr",
        "n_cells",
        "AD_mean_shift",
        "AD_p",
        "AD_fdr",
        "net_mean_shift",
        "net_p",
        "net_fdr",
        "mean_cosine_to_original",
    ]
    assert by_net.loc[6, "net_mean_shift"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="rank_by"):
        statistics.perturbation_table(
            {"control": goal}, cosines, goal_state="control", rank_by="net"
        )
