"""Tests for rosmap_geneformer.analysis.truth: scoring outputs against the planted truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rosmap_geneformer.analysis import truth


def test_planted_ad_genes_are_scored_from_their_expected_end():
    table = pd.DataFrame({"gene": [f"G{i}" for i in range(10)]})
    planted = pd.DataFrame(
        {
            "ensembl_id": ["G0", "G9", "G5", "GX"],
            "gene": ["UP1", "DOWN1", "MIC", "ABSENT"],
            "cell_types": ["Exc", "Exc,Ast", "Mic", "Exc"],
            "direction": ["up", "down", "up", "up"],
        }
    )
    deleted = truth.perturbation_against_truth(
        table, planted, perturb_type="delete", cell_types=["Exc"]
    )
    # UP1 first and DOWN1 last are both at their expected end; MIC acts elsewhere, ABSENT untested.
    assert [(g["symbol"], g["rank"]) for g in deleted["genes"]] == [("UP1", 1), ("DOWN1", 10)]
    assert [g["percentile"] for g in deleted["genes"]] == pytest.approx([0.05, 0.05])
    assert deleted["auroc"] == 1.0
    others = (np.arange(1, 9) + 0.5) / 10
    expected = stats.mannwhitneyu([0.05, 0.05], others, alternative="less").pvalue
    assert deleted["p"] == pytest.approx(expected)
    # Overexpression expects the opposite ends: both planted genes are at the worst place.
    overexpressed = truth.perturbation_against_truth(
        table, planted, perturb_type="overexpress", cell_types=["Exc"]
    )
    assert overexpressed["auroc"] == 0.0 and overexpressed["mean_percentile"] == pytest.approx(0.95)
    assert (
        truth.perturbation_against_truth(table, planted, perturb_type="delete")["planted_tested"]
        == 3
    )
    with pytest.raises(ValueError, match="perturb_type"):
        truth.perturbation_against_truth(table, planted, perturb_type="knockdown")
