from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from rosmap_geneformer.analysis import evaluation as ev

CELL_TYPES = ["Exc", "Inh", "Ast", "Vas/Immune"]
DISEASE = ["control", "AD"]


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _cell_type_data(n_cells: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CELL_TYPES), n_cells)
    logits = rng.normal(0.0, 1.0, (n_cells, len(CELL_TYPES)))
    logits[np.arange(n_cells), y] += 1.2
    return y, _softmax(logits)


def _disease_data(
    n_patients: int, *, cells: int = 20, effect: float = 0.15, seed: int = 0
) -> dict[str, np.ndarray]:
    """Patients alternate control/AD; AD cells get a higher P(AD) on average."""
    rng = np.random.default_rng(seed)
    patient_label = np.arange(n_patients) % 2
    patients = np.repeat([f"P{i:03d}" for i in range(n_patients)], cells)
    y = np.repeat(patient_label, cells)
    shift = np.repeat(rng.normal(0.0, 0.1, n_patients), cells)  # a donor effect
    p_ad = np.clip(0.45 + effect * y + shift + rng.normal(0.0, 0.2, len(y)), 0.0, 1.0)
    return {
        "cell_ids": np.array([f"c{i:05d}" for i in range(len(y))]),
        "patient_ids": patients,
        "y": y,
        "probs": np.column_stack([1.0 - p_ad, p_ad]),
    }


def _evaluate_disease(data: dict[str, np.ndarray], **options: Any) -> ev.Evaluation:
    """``evaluate_predictions`` of ``_disease_data`` output as the disease task."""
    return ev.evaluate_predictions(
        data["cell_ids"],
        data["patient_ids"],
        data["y"],
        data["probs"],
        classes=DISEASE,
        task_kind="disease",
        **options,
    )


def _patients(labels: list[int], scores: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": [f"P{i}" for i in range(len(labels))],
            "label": labels,
            "n_cells": 10,
            "mean_p_positive": scores,
            "frac_pred_positive": 0.0,
        }
    )


# --------------------------------------------------------------------------------------------
# cell metrics


def test_cell_metrics_agree_with_sklearn_multiclass() -> None:
    y, probs = _cell_type_data()
    pred = probs.argmax(axis=1)
    result = ev.cell_metrics(y, probs, classes=CELL_TYPES)
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
    result = ev.cell_metrics(y, probs, classes=["a", "b", "c"])
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
    result = ev.cell_metrics(y, probs, classes=["a", "b", "c"])
    pred = probs.argmax(axis=1)
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert result["per_class"]["c"]["f1"] is None
    assert result["per_class"]["c"]["support"] == 0


def test_binary_auroc_uses_probability_of_classes_1() -> None:
    data = _disease_data(10, seed=3)
    result = ev.cell_metrics(data["y"], data["probs"], classes=DISEASE)
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
        ev.cell_metrics(np.array(y), np.array(probs), classes=DISEASE)


# --------------------------------------------------------------------------------------------
# patients


def test_aggregate_patients_means_sorted_and_fractions() -> None:
    patient_ids = ["P2", "P1", "P2", "P1", "P10"]
    y = [1, 0, 1, 0, 1]
    p = [0.9, 0.2, 0.4, 0.6, 0.7]
    frame = ev.aggregate_patients(patient_ids, y, p)
    assert list(frame.columns) == list(ev.PATIENT_COLUMNS)
    assert frame["patient_id"].tolist() == ["P1", "P10", "P2"]
    assert frame["label"].tolist() == [0, 1, 1]
    assert frame["n_cells"].tolist() == [2, 1, 2]
    assert frame["mean_p_positive"].tolist() == pytest.approx([0.4, 0.7, 0.65])
    assert frame["frac_pred_positive"].tolist() == pytest.approx([0.5, 1.0, 0.5])
    # Explicit predictions override the 0.5 rule.
    frame = ev.aggregate_patients(patient_ids, y, p, y_pred=[0, 0, 0, 0, 0])
    assert frame["frac_pred_positive"].tolist() == [0.0, 0.0, 0.0]


def test_aggregate_patients_refuses_mixed_labels() -> None:
    with pytest.raises(ValueError, match=r"patient 'P7' has cells with different labels"):
        ev.aggregate_patients(["P1", "P7", "P7"], [0, 0, 1], [0.1, 0.2, 0.3])


def test_patient_metrics_hand_example() -> None:
    # Pairs (positive, negative): (0.35,0.1) win, (0.35,0.4) loss, (0.8,0.1) and (0.8,0.4) win.
    patients = _patients([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    result = ev.patient_metrics(patients, threshold=0.5)
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
    assert ev.patient_metrics(patients, threshold=0.35)["accuracy"] == pytest.approx(0.75)
    assert ev.patient_metrics(patients, threshold=0.36)["accuracy"] == pytest.approx(0.5)
    assert ev.patient_metrics(patients, threshold=0.05)["accuracy"] == pytest.approx(0.5)


def test_single_class_auroc_is_null_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    patients = _patients([1, 1, 1], [0.2, 0.7, 0.9])
    with caplog.at_level(logging.WARNING, logger="rosmap_geneformer.analysis.evaluation"):
        result = ev.patient_metrics(patients)
    assert result["auroc"] is None
    assert result["auroc_defined"] is False
    assert "AUROC is undefined" in caplog.text
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["balanced_accuracy"] == pytest.approx(2 / 3)
    ci = ev.bootstrap_patient_ci(patients, n_boot=50, seed=0)
    assert ci["auroc"] == {"value": None, "ci_low": None, "ci_high": None, "n_boot": 50}
    assert ci["accuracy"]["ci_low"] <= 2 / 3 <= ci["accuracy"]["ci_high"]


# --------------------------------------------------------------------------------------------
# bootstrap


def test_patient_bootstrap_is_seeded_and_contains_the_estimate() -> None:
    data = _disease_data(30, seed=1)
    patients = ev.aggregate_patients(data["patient_ids"], data["y"], data["probs"][:, 1])
    first = ev.bootstrap_patient_ci(patients, n_boot=300, seed=7)
    assert first == ev.bootstrap_patient_ci(patients, n_boot=300, seed=7)
    assert first != ev.bootstrap_patient_ci(patients, n_boot=300, seed=8)
    point = ev.patient_metrics(patients)
    for name in ("auroc", "accuracy", "balanced_accuracy"):
        interval = first[name]
        assert interval["value"] == pytest.approx(point[name])
        assert interval["ci_low"] <= interval["value"] <= interval["ci_high"]
        assert interval["n_boot"] == 300
        assert 0.0 <= interval["ci_low"] <= interval["ci_high"] <= 1.0


def test_patient_bootstrap_narrows_with_more_patients() -> None:
    def width(n_patients: int) -> float:
        data = _disease_data(n_patients, cells=5, effect=0.1, seed=2)
        patients = ev.aggregate_patients(data["patient_ids"], data["y"], data["probs"][:, 1])
        ci = ev.bootstrap_patient_ci(patients, n_boot=400, seed=0)["auroc"]
        return ci["ci_high"] - ci["ci_low"]

    assert width(400) < width(16) / 2


def test_stratified_resamples_keep_both_classes_at_their_sizes() -> None:
    strata = np.array([0, 1, 0, 0, 1, 0, 0])
    counts = ev._stratified_counts(np.random.default_rng(0), strata, 500)
    assert counts.shape == (500, len(strata))
    assert (counts[:, strata == 0].sum(axis=1) == 5).all()
    assert (counts[:, strata == 1].sum(axis=1) == 2).all()
    # The resamples do vary: some patients are drawn twice, some not at all.
    assert (counts == 0).any() and (counts >= 2).any()
    # With one patient per class every resample still holds both: AUROC stays defined.
    tiny = ev.bootstrap_patient_ci(_patients([0, 1], [0.2, 0.8]), n_boot=100, seed=0)
    assert (tiny["auroc"]["ci_low"], tiny["auroc"]["ci_high"]) == (1.0, 1.0)


def test_cell_bootstrap_is_clustered_by_patient() -> None:
    y, probs = _cell_type_data(200, seed=4)
    pred = probs.argmax(axis=1)
    one_patient = ev.bootstrap_cell_ci(
        ["P1"] * len(y), y, pred, n_classes=len(CELL_TYPES), n_boot=100, seed=0
    )
    # Every resample is the one patient with all their cells: no spread at all. A bootstrap over
    # cells would pretend the 200 cells are independent and give a nonzero width here.
    for interval in one_patient.values():
        assert interval["ci_low"] == pytest.approx(interval["value"])
        assert interval["ci_high"] == pytest.approx(interval["value"])
    patients = np.repeat([f"P{i}" for i in range(10)], 20)
    ci = ev.bootstrap_cell_ci(patients, y, pred, n_classes=len(CELL_TYPES), n_boot=300, seed=0)
    assert ci == ev.bootstrap_cell_ci(
        patients, y, pred, n_classes=len(CELL_TYPES), n_boot=300, seed=0
    )
    point = ev.cell_metrics(y, probs, classes=CELL_TYPES)
    for name in ("accuracy", "macro_f1", "balanced_accuracy"):
        assert ci[name]["value"] == pytest.approx(point[name])
        assert ci[name]["ci_low"] < ci[name]["value"] < ci[name]["ci_high"]


def test_cell_bootstrap_stratified_needs_one_label_per_patient() -> None:
    with pytest.raises(ValueError, match="patient 'P1'"):
        ev.bootstrap_cell_ci(
            ["P1", "P1", "P2"], [0, 1, 1], [0, 1, 1], n_classes=2, n_boot=10, stratify_by_label=True
        )


@pytest.mark.parametrize(("n_boot", "confidence"), [(0, 0.95), (10, 1.5)])
def test_bootstrap_refuses_bad_options(n_boot: int, confidence: float) -> None:
    with pytest.raises(ValueError, match="n_boot|confidence"):
        ev.bootstrap_patient_ci(_patients([0, 1], [0.2, 0.8]), n_boot=n_boot, confidence=confidence)


# --------------------------------------------------------------------------------------------
# one-call evaluation and tables


def test_predictions_frame_layout() -> None:
    y, probs = _cell_type_data(5, seed=5)
    cell_ids = ["c3", "c1", "c4", "c0", "c2"]
    frame = ev.predictions_frame(cell_ids, ["P"] * 5, y, probs, classes=CELL_TYPES)
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
        ev.predictions_frame(["a", "a"], ["P", "P"], [0, 1], [[1, 0], [0, 1]], classes=DISEASE)


def _shallow_numbers(metrics: dict) -> None:
    for section in metrics.values():
        for key, value in section.items():
            assert value is None or isinstance(value, int | float), key


def test_evaluate_predictions_disease_layout() -> None:
    data = _disease_data(12, seed=6)
    result = _evaluate_disease(data, n_boot=200, seed=0)
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
    again = _evaluate_disease(data, n_boot=200, seed=0)
    assert again.metrics == result.metrics


def test_evaluate_predictions_cell_type_has_no_patient_section() -> None:
    y, probs = _cell_type_data(120, seed=7)
    patients = np.repeat(["P1", "P2", "P3", "P4"], 30)
    result = ev.evaluate_predictions(
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
    y, probs = _cell_type_data(10)
    args = (np.arange(10).astype(str), ["P"] * 10, y, probs)
    with pytest.raises(ValueError, match="task_kind"):
        ev.evaluate_predictions(*args, classes=CELL_TYPES, task_kind="celltype")
    with pytest.raises(ValueError, match="two classes"):
        ev.evaluate_predictions(*args, classes=CELL_TYPES, task_kind="disease")


# --------------------------------------------------------------------------------------------
# plots and files


def test_log_sklearn_plots_writes_dvclive_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dvclive import Live

    # Outside any git repository: dvclive writes the plot files all the same.
    monkeypatch.chdir(tmp_path)
    live = Live("live", dvcyaml=None, report=None, save_dvc_exp=False)
    truth = ["AD", "control", "AD", "control", "AD"]
    pred = ["AD", "AD", "control", "control", "AD"]
    score = [0.9, 0.6, 0.3, 0.2, 0.8]
    logged = ev.log_sklearn_plots(live, truth, pred, score, prefix="patient", positive_class="AD")
    assert logged == ["patient_confusion_matrix", "patient_roc", "patient_precision_recall"]
    sk = tmp_path / "live" / "plots" / "sklearn"
    assert sorted(p.name for p in sk.iterdir()) == [
        "patient_confusion_matrix.json",
        "patient_precision_recall.json",
        "patient_roc.json",
    ]
    cm = json.loads((sk / "patient_confusion_matrix.json").read_text())
    assert cm == [{"actual": t, "predicted": p} for t, p in zip(truth, pred, strict=True)]
    roc = json.loads((sk / "patient_roc.json").read_text())["roc"]
    fpr, tpr, _ = skm.roc_curve([t == "AD" for t in truth], score)
    assert [r["fpr"] for r in roc] == pytest.approx(fpr.tolist())
    assert [r["tpr"] for r in roc] == pytest.approx(tpr.tolist())
    pr = json.loads((sk / "patient_precision_recall.json").read_text())["precision_recall"]
    assert {"precision", "recall", "threshold"} <= set(pr[0])
    # The settings dvc.yaml must repeat (dvcyaml=None writes no dvc.yaml).
    assert live._plots["patient_roc"].plot_config["x"] == "fpr"
    assert live._plots["patient_confusion_matrix"].plot_config["template"] == "confusion"
    assert not (tmp_path / "dvc.yaml").exists()

    # Cell-level curves: scores are rounded (3 decimals by default) so files stay small.
    rng = np.random.default_rng(0)
    many = rng.uniform(size=5000)
    names = np.where(rng.uniform(size=5000) < many, "AD", "control")
    ev.log_sklearn_plots(live, names, names, many, prefix="cell", positive_class="AD")
    assert len(json.loads((sk / "cell_roc.json").read_text())["roc"]) <= 1002
    ev.log_sklearn_plots(
        live, names, names, many, prefix="raw", positive_class="AD", curve_decimals=None
    )
    assert len(json.loads((sk / "raw_roc.json").read_text())["roc"]) > 1002

    # A multiclass task gets the confusion matrix only; one class present skips the curves.
    assert ev.log_sklearn_plots(live, ["a", "b"], ["b", "b"], prefix="cell") == [
        "cell_confusion_matrix"
    ]
    assert ev.log_sklearn_plots(
        live, ["AD", "AD"], ["AD", "AD"], [0.6, 0.7], prefix="one", positive_class="AD"
    ) == ["one_confusion_matrix"]


def test_write_evaluation_files_and_determinism(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _disease_data(8, cells=10, seed=8)
    result = _evaluate_disease(data, n_boot=50)
    written = ev.write_evaluation(result, "out")
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
    ev.write_evaluation(result, "out")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after, "same evaluation, same bytes"
    with pytest.raises(ValueError, match="live_dir"):
        ev.write_evaluation(result, "out", live_dir="out")


def test_confusion_matrix_png_for_multiclass(tmp_path: Path) -> None:
    y, probs = _cell_type_data(60, seed=9)
    counts = ev.cell_metrics(y, probs, classes=CELL_TYPES)["confusion_matrix"]
    fig = ev.plot_confusion_matrix(counts, CELL_TYPES, title="test")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == len(CELL_TYPES) ** 2
    assert texts[0].startswith(f"{counts[0][0]}\n")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == CELL_TYPES
    from rosmap_geneformer import io

    io.save_figure(fig, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 1000
