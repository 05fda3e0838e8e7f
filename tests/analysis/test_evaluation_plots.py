from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from evaluation_data import CELL_TYPES, cell_type_data
from sklearn import metrics as skm

from rosmap_geneformer.analysis.evaluation.cell_level import cell_metrics
from rosmap_geneformer.analysis.evaluation.plots import log_sklearn_plots, plot_confusion_matrix


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
    logged = log_sklearn_plots(live, truth, pred, score, prefix="patient", positive_class="AD")
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
    log_sklearn_plots(live, names, names, many, prefix="cell", positive_class="AD")
    assert len(json.loads((sk / "cell_roc.json").read_text())["roc"]) <= 1002
    log_sklearn_plots(
        live, names, names, many, prefix="raw", positive_class="AD", curve_decimals=None
    )
    assert len(json.loads((sk / "raw_roc.json").read_text())["roc"]) > 1002

    # A multiclass task gets the confusion matrix only; one class present skips the curves.
    assert log_sklearn_plots(live, ["a", "b"], ["b", "b"], prefix="cell") == [
        "cell_confusion_matrix"
    ]
    assert log_sklearn_plots(
        live, ["AD", "AD"], ["AD", "AD"], [0.6, 0.7], prefix="one", positive_class="AD"
    ) == ["one_confusion_matrix"]


def test_confusion_matrix_png_for_multiclass(tmp_path: Path) -> None:
    y, probs = cell_type_data(60, seed=9)
    counts = cell_metrics(y, probs, classes=CELL_TYPES)["confusion_matrix"]
    fig = plot_confusion_matrix(counts, CELL_TYPES, title="test")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == len(CELL_TYPES) ** 2
    assert texts[0].startswith(f"{counts[0][0]}\n")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == CELL_TYPES
    from rosmap_geneformer import io

    io.save_figure(fig, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 1000
