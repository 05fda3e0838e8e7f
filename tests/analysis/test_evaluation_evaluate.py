from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from evaluation_data import CELL_TYPES, DISEASE, cell_type_data, disease_data, evaluate_disease
from sklearn import metrics as skm

from rosmap_geneformer.analysis.evaluation.evaluate import (
    evaluate_predictions,
    predictions_frame,
    write_evaluation,
)


def test_predictions_frame_layout() -> None:
    y, probs = cell_type_data(5, seed=5)
    cell_ids = ["c3", "c1", "c4", "c0", "c2"]
    frame = predictions_frame(cell_ids, ["P"] * 5, y, probs, classes=CELL_TYPES)
    assert list(frame.columns) == [
        "cell_id",
        "patient_id",
        "true_label",
        "predicted_label",
        "p_Exc",
        "p_Inh",
        "p_Ast",
        "p_Vas/Immune",
    ]
    assert frame["cell_id"].tolist() == ["c0", "c1", "c2", "c3", "c4"]
    order = [cell_ids.index(c) for c in frame["cell_id"]]
    assert frame["true_label"].tolist() == [CELL_TYPES[i] for i in y[order]]
    assert frame["predicted_label"].tolist() == [CELL_TYPES[i] for i in probs[order].argmax(1)]
    assert frame[[f"p_{c}" for c in CELL_TYPES]].to_numpy() == pytest.approx(probs[order])
    with pytest.raises(ValueError, match="duplicate cell id"):
        predictions_frame(["a", "a"], ["P", "P"], [0, 1], [[1, 0], [0, 1]], classes=DISEASE)


def _shallow_numbers(metrics: dict) -> None:
    for section in metrics.values():
        for key, value in section.items():
            assert value is None or isinstance(value, int | float), key


def test_evaluate_predictions_disease_layout() -> None:
    data = disease_data(12, seed=6)
    result = evaluate_disease(data, n_boot=200, seed=0)
    assert set(result.metrics) == {"cell", "patient"}
    _shallow_numbers(result.metrics)
    cell, patient = result.metrics["cell"], result.metrics["patient"]
    for name in ("accuracy", "macro_f1", "balanced_accuracy"):
        assert cell[f"{name}_ci_low"] <= cell[name] <= cell[f"{name}_ci_high"]
    assert cell["auroc"] == pytest.approx(skm.roc_auc_score(data["y"], data["probs"][:, 1]))
    assert patient["n_patients"] == 12
    assert patient["n_patients_control"] == patient["n_patients_AD"] == 6
    for name in ("auroc", "accuracy", "balanced_accuracy"):
        assert patient[f"{name}_ci_low"] <= patient[name] <= patient[f"{name}_ci_high"]
    patients = result.patients
    assert patients is not None and len(patients) == 12
    assert patients["true_label"].tolist() == ["control", "AD"] * 6
    means = pd.Series(data["probs"][:, 1]).groupby(data["patient_ids"]).mean()
    assert patients["mean_p_positive"].to_numpy() == pytest.approx(means.to_numpy())
    assert result.details["positive_class"] == "AD"
    assert result.details["patient"]["confusion_matrix"]["labels"] == DISEASE
    roc = result.details["patient"]["roc_curve"]
    fpr, tpr, thresholds = skm.roc_curve(patients["label"], patients["mean_p_positive"])
    assert roc["fpr"] == pytest.approx(fpr.tolist())
    assert roc["tpr"] == pytest.approx(tpr.tolist())
    # sklearn's first threshold is +inf; stored as null so that strict JSON can hold it.
    assert roc["thresholds"][0] is None
    assert roc["thresholds"][1:] == pytest.approx(thresholds[1:].tolist())
    assert result.details["bootstrap"]["n_boot"] == 200
    json.dumps(result.metrics, allow_nan=False)
    json.dumps(result.details, allow_nan=False)
    again = evaluate_disease(data, n_boot=200, seed=0)
    assert again.metrics == result.metrics


def test_evaluate_predictions_cell_type_has_no_patient_section() -> None:
    y, probs = cell_type_data(120, seed=7)
    patients = np.repeat(["P1", "P2", "P3", "P4"], 30)
    result = evaluate_predictions(
        np.arange(120).astype(str),
        patients,
        y,
        probs,
        classes=CELL_TYPES,
        task_kind="cell_type",
        n_boot=100,
    )
    assert set(result.metrics) == {"cell"}
    assert result.patients is None
    _shallow_numbers(result.metrics)
    assert result.details["cell"]["per_class"]["Exc"]["support"] == int((y == 0).sum())


def test_evaluate_predictions_refuses_bad_task() -> None:
    y, probs = cell_type_data(10)
    args = (np.arange(10).astype(str), ["P"] * 10, y, probs)
    with pytest.raises(ValueError, match="task_kind"):
        evaluate_predictions(*args, classes=CELL_TYPES, task_kind="celltype")
    with pytest.raises(ValueError, match="two classes"):
        evaluate_predictions(*args, classes=CELL_TYPES, task_kind="disease")


# --------------------------------------------------------------------------------------------
# files


def test_write_evaluation_files_and_determinism(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = disease_data(8, cells=10, seed=8)
    result = evaluate_disease(data, n_boot=50)
    written = write_evaluation(result, "out")
    names = sorted(p.relative_to("out").as_posix() for p in written)
    assert names == [
        "confusion_matrix.png",
        "details.json",
        "live",
        "metrics.json",
        "patient_predictions.png",
        "patients.tsv",
        "predictions.tsv",
    ]
    out = tmp_path / "out"
    for png in ("confusion_matrix.png", "patient_predictions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sklearn_dir = out / "live" / "plots" / "sklearn"
    assert sorted(p.stem for p in sklearn_dir.iterdir()) == [
        f"{level}_{kind}"
        for level in ("cell", "patient")
        for kind in ("confusion_matrix", "precision_recall", "roc")
    ]
    assert not (out / "live" / "metrics.json").exists()
    assert json.loads((out / "metrics.json").read_text()) == result.metrics
    table = pd.read_csv(out / "predictions.tsv", sep="\t")
    assert len(table) == 80 and table["cell_id"].is_monotonic_increasing
    assert not list(tmp_path.rglob(".tmp-*")), "no temporary files left behind"

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_evaluation(result, "out")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after, "same evaluation, same bytes"
    with pytest.raises(ValueError, match="live_dir"):
        write_evaluation(result, "out", live_dir="out")
