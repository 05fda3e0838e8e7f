from __future__ import annotations

import json

import numpy as np
import pytest
from evaluation_data import CELL_TYPES, DISEASE, cell_type_data, disease_data
from sklearn import metrics as skm

from rosmap_geneformer.analysis.evaluation.cell_level import bootstrap_cell_ci, cell_metrics


def test_cell_metrics_agree_with_sklearn_multiclass() -> None:
    y, probs = cell_type_data()
    pred = probs.argmax(axis=1)
    result = cell_metrics(y, probs, classes=CELL_TYPES)
    assert result["n_cells"] == len(y)
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    expected = skm.confusion_matrix(y, pred, labels=range(len(CELL_TYPES)))
    assert result["confusion_matrix"] == expected.tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=range(len(CELL_TYPES))
    )
    for i, name in enumerate(CELL_TYPES):
        row = result["per_class"][name]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]
    assert "auroc" not in result, "multiclass gets no ROC (as in Geneformer)"


def test_confusion_matrix_rows_are_true_classes() -> None:
    # Two cells of class 0 predicted as class 2; one class-2 cell predicted as 1.
    y = np.array([0, 0, 1, 2])
    probs = np.array(
        [[0.1, 0.1, 0.8], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1], [0.1, 0.6, 0.3]], dtype=np.float32
    )
    result = cell_metrics(y, probs, classes=["a", "b", "c"])
    assert result["confusion_matrix"] == [[0, 0, 2], [0, 1, 0], [0, 1, 0]]
    assert result["per_class"]["a"] == {
        "precision": None,  # never predicted: undefined, not 0
        "recall": 0.0,
        "f1": 0.0,
        "support": 2,
        "n_predicted": 0,
    }


def test_macro_f1_skips_classes_absent_from_truth_and_predictions() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.9, 0.0], [0.3, 0.7, 0.0]])
    result = cell_metrics(y, probs, classes=["a", "b", "c"])
    pred = probs.argmax(axis=1)
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert result["per_class"]["c"]["f1"] is None
    assert result["per_class"]["c"]["support"] == 0


def test_binary_auroc_uses_probability_of_classes_1() -> None:
    data = disease_data(10, seed=3)
    result = cell_metrics(data["y"], data["probs"], classes=DISEASE)
    assert result["positive_class"] == "AD"
    assert result["auroc"] == pytest.approx(skm.roc_auc_score(data["y"], data["probs"][:, 1]))
    # Geneformer's curve: TPR interpolated at 100 evenly spaced FPRs, starting at 0.
    fpr, tpr, _ = skm.roc_curve(data["y"], data["probs"][:, 1])
    grid = np.linspace(0, 1, 100)
    expected = np.interp(grid, fpr, tpr)
    expected[0] = 0.0
    assert result["roc_curve"]["fpr"] == pytest.approx(grid.tolist())
    assert result["roc_curve"]["tpr"] == pytest.approx(expected.tolist())
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize(
    ("y", "probs", "match"),
    [
        ([0, 1], [[2.0, -1.0], [0.5, 0.3]], "not logits"),
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], "outside 0..1"),
        ([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]], "shape"),
        ([0.5, 1], [[0.5, 0.5], [0.5, 0.5]], "integer class ids"),
        ([0, 1], [[np.nan, 0.5], [0.5, 0.5]], "NaN"),
    ],
)
def test_cell_metrics_refuses_bad_input(y: list, probs: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cell_metrics(np.array(y), np.array(probs), classes=DISEASE)


# --------------------------------------------------------------------------------------------
# bootstrap


def test_cell_bootstrap_is_clustered_by_patient() -> None:
    y, probs = cell_type_data(200, seed=4)
    pred = probs.argmax(axis=1)
    one_patient = bootstrap_cell_ci(
        ["P1"] * len(y), y, pred, n_classes=len(CELL_TYPES), n_boot=100, seed=0
    )
    # Every resample is the one patient with all their cells: no spread at all. A bootstrap over
    # cells would pretend the 200 cells are independent and give a nonzero width here.
    for interval in one_patient.values():
        assert interval["ci_low"] == pytest.approx(interval["value"])
        assert interval["ci_high"] == pytest.approx(interval["value"])
    patients = np.repeat([f"P{i}" for i in range(10)], 20)
    ci = bootstrap_cell_ci(patients, y, pred, n_classes=len(CELL_TYPES), n_boot=300, seed=0)
    assert ci == bootstrap_cell_ci(patients, y, pred, n_classes=len(CELL_TYPES), n_boot=300, seed=0)
    point = cell_metrics(y, probs, classes=CELL_TYPES)
    for name in ("accuracy", "macro_f1", "balanced_accuracy"):
        assert ci[name]["value"] == pytest.approx(point[name])
        assert ci[name]["ci_low"] < ci[name]["value"] < ci[name]["ci_high"]


def test_cell_bootstrap_stratified_needs_one_label_per_patient() -> None:
    with pytest.raises(ValueError, match="patient 'P1'"):
        bootstrap_cell_ci(
            ["P1", "P1", "P2"], [0, 1, 1], [0, 1, 1], n_classes=2, n_boot=10, stratify_by_label=True
        )
