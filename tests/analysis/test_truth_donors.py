"""Tests for scoring donor-level methods and their attention against the demo's planted donors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rosmap_geneformer import io
from rosmap_geneformer.analysis import truth
from rosmap_geneformer.errors import InputError

# Four controls, two strongly affected AD donors and two resilient ones.
SUBJECTS = ["C1", "C2", "C3", "C4", "A1", "A2", "A3", "A4"]
AD_GENE_EFFECT = [0.0, 0.0, 0.0, 0.0, 2.0, 1.5, 0.3, 0.2]
# A method that orders the donors as the planted effect does, controls below every AD donor.
GOOD_SCORE = [0.1, 0.2, 0.3, 0.4, 0.95, 0.9, 0.6, 0.5]
CV = ["C1", "C2", "C3", "A1", "A2", "A3"]


def _truth_donors() -> pd.DataFrame:
    is_ad = [s.startswith("A") for s in SUBJECTS]
    severity = [0.0, 0.0, 0.0, 0.0, 1.2, 1.0, 0.2, 0.15]
    return pd.DataFrame(
        {
            "subject": SUBJECTS,
            "ad_status": ["AD" if a else "control" for a in is_ad],
            "resilient": [s in ("A3", "A4") for s in SUBJECTS],
            "severity": severity,
            "effect_Exc": [0.5 * v for v in severity],
            "effect_Mic": [2.0 * v for v in severity],
            "ad_gene_effect": AD_GENE_EFFECT,
        }
    )


def _scores(method: str, score: list[float], *, threshold: float) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "method": method,
            "patient_id": SUBJECTS,
            "set": ["cv" if s in CV else "test" for s in SUBJECTS],
            "label": [int(s.startswith("A")) for s in SUBJECTS],
            "ad_status": ["AD" if s.startswith("A") else "control" for s in SUBJECTS],
            "score": score,
            "called": [int(v > threshold) for v in score],
        }
    )


def test_a_perfect_method_and_a_reversed_one() -> None:
    scores = pd.concat(
        [
            _scores("pseudobulk", GOOD_SCORE, threshold=0.55),
            _scores("mil_base", [-v for v in GOOD_SCORE], threshold=0.0),
        ]
    )
    result = truth.donors_against_truth(scores, _truth_donors())
    assert list(result) == ["pseudobulk", "mil_base"]
    assert list(result["pseudobulk"]) == ["cv", "test", "all"]

    good = result["pseudobulk"]["all"]
    assert (good["n_donors"], good["n_ad"], good["n_resilient"]) == (8, 4, 2)
    assert good["auroc"] == 1.0
    assert good["auroc_non_resilient"] == 1.0
    # A4 and A3 rank 5th and 6th of 8: percentiles 4.5/8 and 5.5/8.
    assert good["resilient_rank_percentile"] == pytest.approx(0.625)
    assert good["spearman_ad_gene_effect"] == pytest.approx(1.0)
    # Called above 0.55: A1, A2 and A3 (resilient), not A4 and no control.
    assert good["resilient_called_fraction"] == 0.5
    assert good["non_resilient_called_fraction"] == 1.0
    assert good["control_called_fraction"] == 0.0
    assert good["label_mismatches"] == 0

    reversed_ = result["mil_base"]["all"]
    assert reversed_["auroc"] == 0.0
    assert reversed_["auroc_non_resilient"] == 0.0
    assert reversed_["spearman_ad_gene_effect"] == pytest.approx(-1.0)
    assert reversed_["resilient_rank_percentile"] == pytest.approx(1 - 0.625)
    assert reversed_["resilient_called_fraction"] == 0.0


def test_sets_are_scored_apart() -> None:
    result = truth.donors_against_truth(
        _scores("pseudobulk", GOOD_SCORE, threshold=0.55), _truth_donors()
    )["pseudobulk"]
    cv, test = result["cv"], result["test"]
    assert (cv["n_donors"], cv["n_ad"], cv["n_resilient"]) == (6, 3, 1)
    assert cv["auroc"] == 1.0
    # A3 scores 0.6: 4th of the 6 cv donors.
    assert cv["resilient_rank_percentile"] == pytest.approx(3.5 / 6)
    assert cv["spearman_ad_gene_effect"] == pytest.approx(1.0)
    # The test set holds one control and one resilient donor: no non-resilient AD donor, and too
    # few AD donors for a correlation.
    assert (test["n_donors"], test["n_ad"], test["n_resilient"]) == (2, 1, 1)
    assert test["auroc"] == 1.0
    assert test["auroc_non_resilient"] is None
    assert test["non_resilient_called_fraction"] is None
    assert test["spearman_ad_gene_effect"] is None
    assert test["resilient_rank_percentile"] == pytest.approx(0.75)


def test_a_method_blind_to_resilient_donors() -> None:
    # Strong AD donors on top, resilient ones among the controls: AUROC suffers only from them.
    score = [0.1, 0.2, 0.5, 0.6, 0.95, 0.9, 0.3, 0.4]
    result = truth.donors_against_truth(
        _scores("proportions", score, threshold=0.55), _truth_donors()
    )["proportions"]["all"]
    assert result["auroc_non_resilient"] == 1.0
    # Each resilient donor is above 2 of the 4 controls.
    assert result["auroc"] == pytest.approx((2 * 4 + 2 + 2) / 16)
    assert result["resilient_rank_percentile"] == pytest.approx((2.5 + 3.5) / 2 / 8)
    assert result["resilient_called_fraction"] == 0.0
    assert result["control_called_fraction"] == 0.25


def test_unscored_donors_numeric_ids_and_label_mismatches() -> None:
    donors = _truth_donors()
    donors["subject"] = [str(100 + i) for i in range(len(SUBJECTS))]
    scores = _scores("cell_classifier", GOOD_SCORE, threshold=0.55)
    scores["patient_id"] = [100 + i for i in range(len(SUBJECTS))]  # read as numbers
    scores.loc[0, "score"] = np.nan
    scores.loc[1, "label"] = 1
    result = truth.donors_against_truth(scores, donors)["cell_classifier"]["all"]
    assert (result["n_donors"], result["n_unscored"]) == (7, 1)
    assert result["auroc"] == 1.0
    assert result["label_mismatches"] == 1


def test_bad_donor_scores_are_refused() -> None:
    donors = _truth_donors()
    scores = _scores("pseudobulk", GOOD_SCORE, threshold=0.55)
    stranger = scores.copy()
    stranger.loc[3, "patient_id"] = "R999"
    with pytest.raises(InputError, match="R999"):
        truth.donors_against_truth(stranger, donors)
    with pytest.raises(InputError, match="more than once"):
        truth.donors_against_truth(pd.concat([scores, scores.iloc[:1]]), donors)
    with pytest.raises(InputError, match="called"):
        truth.donors_against_truth(scores.drop(columns="called"), donors)


def _attention() -> pd.DataFrame:
    cell_types = ["Exc", "Mic", "Ast"]
    return pd.DataFrame(
        {
            "method": ["mil_finetuned"] * 3 + ["mil_base"] * 3 + ["flat"] * 3,
            "cell_type": cell_types * 3,
            "cell_share": [0.5, 0.2, 0.3] * 3,
            "attention_share": [0.25, 0.6, 0.15, 0.6, 0.1, 0.3, 0.5, 0.2, 0.3],
            "enrichment": [0.5, 3.0, 0.5, 1.2, 0.5, 1.0, 1.0, 1.0, 1.0],
        }
    )


def test_attention_is_scored_against_the_planted_cell_type_effects() -> None:
    donors = _truth_donors()
    donors["effect_Ast"] = donors["severity"] * 1.0
    # Mean effect over AD donors: Mic 2x, Ast 1x, Exc 0.5x the mean severity.
    result = truth.attention_against_truth(_attention(), donors)
    mean_severity = np.mean([1.2, 1.0, 0.2, 0.15])
    assert result["planted_effect"] == pytest.approx(
        {"Exc": 0.5 * mean_severity, "Mic": 2 * mean_severity, "Ast": mean_severity}
    )
    # A finetuned model that prefers Mic, then ties Exc and Ast; a base model the other way round.
    finetuned, base = result["methods"]["mil_finetuned"], result["methods"]["mil_base"]
    assert finetuned["ranked_cell_types"][0] == "Mic"
    assert finetuned["spearman_effect"] == pytest.approx(0.866, abs=1e-3)
    assert base["ranked_cell_types"] == ["Exc", "Ast", "Mic"]
    assert base["spearman_effect"] == pytest.approx(-1.0)
    assert base["enrichment"] == {"Exc": 1.2, "Ast": 1.0, "Mic": 0.5}
    assert "spearman_signal" not in base
    # A constant enrichment correlates with nothing.
    assert result["methods"]["flat"]["spearman_effect"] is None
    assert result["methods"]["flat"]["n_cell_types"] == 3


def test_attention_signal_and_unknown_cell_types() -> None:
    donors = _truth_donors()
    attention = pd.concat(
        [
            _attention(),
            pd.DataFrame(
                {
                    "method": ["mil_base"],
                    "cell_type": ["Foo"],
                    "cell_share": [0.1],
                    "attention_share": [0.5],
                    "enrichment": [5.0],
                }
            ),
        ]
    )
    ad_genes = pd.DataFrame(
        {
            "gene": ["TREM2", "BDNF"],
            "cell_types": ["Mic", "Exc,Mic"],
            "log2_fold_change": [1.5, -1.0],
        }
    )
    result = truth.attention_against_truth(attention, donors, truth_ad=ad_genes)
    # No effect_Ast column in this truth: Ast is unknown like Foo, and two known types are too few.
    base = result["methods"]["mil_base"]
    assert base["unknown_cell_types"] == ["Ast", "Foo"]
    assert base["ranked_cell_types"][0] == "Foo"
    assert base["n_cell_types"] == 2
    assert base["spearman_effect"] is None
    mean_severity = np.mean([1.2, 1.0, 0.2, 0.15])
    assert result["planted_signal"] == pytest.approx(
        {"Exc": 0.5 * mean_severity * 1.0, "Mic": 2 * mean_severity * 2.5}
    )
    assert result["methods"]["mil_finetuned"]["spearman_signal"] is None
    with pytest.raises(InputError, match="twice"):
        truth.attention_against_truth(pd.concat([attention, attention.iloc[:1]]), donors)
    with pytest.raises(InputError, match="effect_"):
        truth.attention_against_truth(attention, donors.drop(columns=["effect_Exc", "effect_Mic"]))


def test_read_truth_with_and_without_donors(tmp_path: Path) -> None:
    io.write_tsv(pd.DataFrame({"gene": ["APP"], "cell_types": ["Exc"]}), tmp_path / "ad_genes.tsv")
    assert set(truth.read_truth(tmp_path)) == {"ad_genes"}  # a truth folder from before donors

    donors = _truth_donors()
    donors["subject"] = ["00001", *SUBJECTS[1:]]
    io.write_tsv(donors, tmp_path / "donors.tsv")
    tables = truth.read_truth(tmp_path)
    assert set(tables) == {"ad_genes", "donors"}
    assert tables["donors"]["subject"].iloc[0] == "00001"
    assert tables["donors"]["resilient"].dtype == bool
    pd.testing.assert_frame_equal(tables["donors"], donors, check_dtype=False)

    io.write_tsv(donors.drop(columns="ad_gene_effect"), tmp_path / "donors.tsv")
    with pytest.raises(InputError, match="ad_gene_effect"):
        truth.read_truth(tmp_path)
