from __future__ import annotations

import logging

import pytest
from evaluation_data import disease_data, patients_frame

from rosmap_geneformer.analysis.evaluation.patient_level import (
    PATIENT_COLUMNS,
    aggregate_patients,
    bootstrap_patient_ci,
    patient_metrics,
)


def test_aggregate_patients_means_sorted_and_fractions() -> None:
    patient_ids = ["P2", "P1", "P2", "P1", "P10"]
    y = [1, 0, 1, 0, 1]
    p = [0.9, 0.2, 0.4, 0.6, 0.7]
    frame = aggregate_patients(patient_ids, y, p)
    assert list(frame.columns) == list(PATIENT_COLUMNS)
    assert frame["patient_id"].tolist() == ["P1", "P10", "P2"]
    assert frame["label"].tolist() == [0, 1, 1]
    assert frame["n_cells"].tolist() == [2, 1, 2]
    assert frame["mean_p_positive"].tolist() == pytest.approx([0.4, 0.7, 0.65])
    assert frame["frac_pred_positive"].tolist() == pytest.approx([0.5, 1.0, 0.5])
    # Explicit predictions override the 0.5 rule.
    frame = aggregate_patients(patient_ids, y, p, y_pred=[0, 0, 0, 0, 0])
    assert frame["frac_pred_positive"].tolist() == [0.0, 0.0, 0.0]


def test_aggregate_patients_refuses_mixed_labels() -> None:
    with pytest.raises(ValueError, match=r"patient 'P7' has cells with different labels"):
        aggregate_patients(["P1", "P7", "P7"], [0, 0, 1], [0.1, 0.2, 0.3])


def test_patient_metrics_hand_example() -> None:
    # Pairs (positive, negative): (0.35,0.1) win, (0.35,0.4) loss, (0.8,0.1) and (0.8,0.4) win.
    patients = patients_frame([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    result = patient_metrics(patients, threshold=0.5)
    assert result["auroc"] == pytest.approx(0.75)
    assert result["auroc_defined"] is True
    assert result["accuracy"] == pytest.approx(0.75)  # 0.35 is called control
    assert result["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert (result["n_patients"], result["n_patients_negative"], result["n_patients_positive"]) == (
        4,
        2,
        2,
    )
    # The threshold is inclusive (>=), like roc_curve's: at 0.35 the 0.35 patient is called AD
    # (and the 0.4 control too); just above, it is not.
    assert patient_metrics(patients, threshold=0.35)["accuracy"] == pytest.approx(0.75)
    assert patient_metrics(patients, threshold=0.36)["accuracy"] == pytest.approx(0.5)
    assert patient_metrics(patients, threshold=0.05)["accuracy"] == pytest.approx(0.5)


def test_single_class_auroc_is_null_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    patients = patients_frame([1, 1, 1], [0.2, 0.7, 0.9])
    with caplog.at_level(logging.WARNING, logger="rosmap_geneformer.analysis.evaluation"):
        result = patient_metrics(patients)
    assert result["auroc"] is None
    assert result["auroc_defined"] is False
    assert "AUROC is undefined" in caplog.text
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["balanced_accuracy"] == pytest.approx(2 / 3)
    ci = bootstrap_patient_ci(patients, n_boot=50, seed=0)
    assert ci["auroc"] == {"value": None, "ci_low": None, "ci_high": None, "n_boot": 50}
    assert ci["accuracy"]["ci_low"] <= 2 / 3 <= ci["accuracy"]["ci_high"]


# --------------------------------------------------------------------------------------------
# bootstrap


def test_patient_bootstrap_is_seeded_and_contains_the_estimate() -> None:
    data = disease_data(30, seed=1)
    patients = aggregate_patients(data["patient_ids"], data["y"], data["probs"][:, 1])
    first = bootstrap_patient_ci(patients, n_boot=300, seed=7)
    assert first == bootstrap_patient_ci(patients, n_boot=300, seed=7)
    assert first != bootstrap_patient_ci(patients, n_boot=300, seed=8)
    point = patient_metrics(patients)
    for name in ("auroc", "accuracy", "balanced_accuracy"):
        interval = first[name]
        assert interval["value"] == pytest.approx(point[name])
        assert interval["ci_low"] <= interval["value"] <= interval["ci_high"]
        assert interval["n_boot"] == 300
        assert 0.0 <= interval["ci_low"] <= interval["ci_high"] <= 1.0


def test_patient_bootstrap_narrows_with_more_patients() -> None:
    def width(n_patients: int) -> float:
        data = disease_data(n_patients, cells=5, effect=0.1, seed=2)
        patients = aggregate_patients(data["patient_ids"], data["y"], data["probs"][:, 1])
        ci = bootstrap_patient_ci(patients, n_boot=400, seed=0)["auroc"]
        return ci["ci_high"] - ci["ci_low"]

    assert width(400) < width(16) / 2


@pytest.mark.parametrize(("n_boot", "confidence"), [(0, 0.95), (10, 1.5)])
def test_bootstrap_refuses_bad_options(n_boot: int, confidence: float) -> None:
    with pytest.raises(ValueError, match="n_boot|confidence"):
        bootstrap_patient_ci(
            patients_frame([0, 1], [0.2, 0.8]), n_boot=n_boot, confidence=confidence
        )
