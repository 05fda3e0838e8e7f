"""One model's test-set predictions, scored and written: :func:`evaluate_predictions` and
:func:`write_evaluation`.

Combines the cell level (:mod:`~rosmap_geneformer.analysis.evaluation.cell_level`) and, for the
disease task, the patient level (:mod:`~rosmap_geneformer.analysis.evaluation.patient_level`) into
one :class:`Evaluation`: the numbers for ``metrics.json``, the details, the per-cell predictions
and the per-patient table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer import io
from rosmap_geneformer.analysis.evaluation.cell_level import (
    bootstrap_cell_ci,
    cell_metrics,
    predict_ids,
)
from rosmap_geneformer.analysis.evaluation.common import (
    binary_auroc,
    check_classes,
    check_ids,
    check_probabilities,
    check_same_length,
    confusion_matrix,
)
from rosmap_geneformer.analysis.evaluation.patient_level import (
    aggregate_patients,
    bootstrap_patient_ci,
    patient_metrics,
)
from rosmap_geneformer.analysis.evaluation.plots import (
    log_sklearn_plots,
    plot_confusion_matrix,
    plot_patient_predictions,
)
from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)

TASK_KINDS = ("cell_type", "disease")


@dataclass(frozen=True)
class Evaluation:
    """Everything :func:`write_evaluation` writes for one model on one task.

    Attributes
    ----------
    task_kind
        ``"cell_type"`` or ``"disease"``.
    classes
        Class names in id order.
    metrics
        Flat numbers for ``metrics.json`` (``dvc metrics show``): ``{"cell": {...}}`` and, for the
        disease task, ``{"patient": {...}}``; intervals as ``<metric>_ci_low/_ci_high``.
    details
        Per-class report, confusion matrices, ROC points, the bootstrap settings and intervals.
    predictions
        :func:`predictions_frame` output.
    patients
        Per-patient table (disease task), else ``None``.
    """

    task_kind: str
    classes: tuple[str, ...]
    metrics: dict[str, Any]
    details: dict[str, Any]
    predictions: pd.DataFrame
    patients: pd.DataFrame | None


def predictions_frame(
    cell_ids: Any,
    patient_ids: Any,
    y_true: Any,
    probabilities: Any,
    *,
    classes: Sequence[str],
) -> pd.DataFrame:
    """The per-cell predictions table, sorted by cell id.

    Columns: ``cell_id``, ``patient_id``, ``true_label``, ``predicted_label`` (class names) and
    one ``p_<class>`` probability column per class, in ``classes`` order (float32 input stays
    float32).
    """
    names = check_classes(classes)
    check_same_length(cell_ids=cell_ids, patient_ids=patient_ids, y_true=y_true)
    ids = check_ids(y_true, len(names))
    probs = check_probabilities(probabilities, n_cells=len(ids), n_classes=len(names))
    cells = pd.Series(cell_ids).astype(str)
    if not cells.is_unique:
        dups = cells[cells.duplicated()].unique()
        msg = f"cell_ids: {len(dups)} duplicate cell id(s), e.g. {list(dups[:5])}."
        raise InputError(msg)
    lookup = np.asarray(names, dtype=object)
    frame = pd.DataFrame(
        {
            "cell_id": cells.to_numpy(),
            "patient_id": pd.Series(patient_ids).astype(str).to_numpy(),
            "true_label": lookup[ids],
            "predicted_label": lookup[predict_ids(probs)],
        }
    )
    # float32 model output stays float32: the TSV then carries its 8 significant digits, not
    # float64 noise digits.
    given = np.asarray(probabilities)
    out = given if given.dtype in (np.float32, np.float64) else probs
    for i, name in enumerate(names):
        frame[f"p_{name}"] = out[:, i]
    return frame.sort_values("cell_id", kind="stable").reset_index(drop=True)


def _flatten(prefix_values: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, interval in prefix_values.items():
        flat[name] = interval["value"]
        flat[f"{name}_ci_low"] = interval["ci_low"]
        flat[f"{name}_ci_high"] = interval["ci_high"]
    return flat


def evaluate_predictions(
    cell_ids: Any,
    patient_ids: Any,
    y_true: Any,
    probabilities: Any,
    *,
    classes: Sequence[str],
    task_kind: str,
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
    confidence: float = 0.95,
) -> Evaluation:
    """Score one model's test-set predictions: cell metrics and, for the disease task, patients.

    Parameters
    ----------
    cell_ids, patient_ids
        Cell and patient of each prediction.
    y_true
        True class id of each cell.
    probabilities
        Class probabilities, ``(n_cells, n_classes)``.
    classes
        Class names in id order; for the disease task two classes, positive (AD) = ``classes[1]``.
    task_kind
        ``"cell_type"`` (multiclass, cell metrics) or ``"disease"`` (binary, cell and patient
        metrics).
    n_boot, seed, confidence
        Bootstrap settings (see
        :func:`~rosmap_geneformer.analysis.evaluation.patient_level.bootstrap_patient_ci`,
        :func:`~rosmap_geneformer.analysis.evaluation.cell_level.bootstrap_cell_ci`).
    threshold
        Patient decision threshold on mean P(positive).

    Returns
    -------
    An :class:`Evaluation`; ``metrics`` looks like ``{"cell": {"n_cells", "accuracy",
    "accuracy_ci_low", "accuracy_ci_high", "macro_f1", ..., "balanced_accuracy", ...
    ["auroc"]}, "patient": {"n_patients", "n_patients_<class>", "auroc", "auroc_ci_low", ...}}``.
    """
    if task_kind not in TASK_KINDS:
        msg = f"task_kind={task_kind!r}: expected one of {list(TASK_KINDS)}."
        raise InputError(msg)
    names = check_classes(classes)
    if task_kind == "disease" and len(names) != 2:
        msg = f"task_kind='disease' needs two classes (negative, positive), got {names}."
        raise InputError(msg)
    check_same_length(
        cell_ids=cell_ids, patient_ids=patient_ids, y_true=y_true, probabilities=probabilities
    )
    predictions = predictions_frame(cell_ids, patient_ids, y_true, probabilities, classes=names)
    ids = check_ids(y_true, len(names))
    probs = check_probabilities(probabilities, n_cells=len(ids), n_classes=len(names))
    pred = predict_ids(probs)
    disease = task_kind == "disease"

    cells = cell_metrics(ids, probs, classes=names)
    cell_ci = bootstrap_cell_ci(
        patient_ids,
        ids,
        pred,
        n_classes=len(names),
        n_boot=n_boot,
        seed=seed,
        confidence=confidence,
        stratify_by_label=disease,
    )
    metrics: dict[str, Any] = {"cell": {"n_cells": cells["n_cells"], **_flatten(cell_ci)}}
    if "auroc" in cells:
        metrics["cell"]["auroc"] = cells["auroc"]
    details: dict[str, Any] = {
        "task_kind": task_kind,
        "classes": names,
        "cell": {
            "per_class": cells["per_class"],
            "confusion_matrix": {
                "rows": "true",
                "columns": "predicted",
                "labels": names,
                "counts": cells["confusion_matrix"],
            },
        },
        "bootstrap": {
            "method": "percentile",
            "n_boot": int(n_boot),
            "seed": seed,
            "confidence": confidence,
            "cell": "clustered: patients resampled with replacement, all their cells kept"
            + (", stratified by patient label" if disease else ""),
            "patient": "patients resampled with replacement within each class",
        },
        "cell_ci": cell_ci,
    }
    if len(names) == 2:
        details["positive_class"] = names[1]
        details["cell"]["roc_curve"] = cells["roc_curve"]
    logger.info(
        "cells: n=%d accuracy %.4f macro-F1 %.4f balanced accuracy %.4f",
        cells["n_cells"],
        cells["accuracy"],
        cells["macro_f1"],
        cells["balanced_accuracy"],
    )

    patients = None
    if disease:
        patients = aggregate_patients(patient_ids, ids, probs[:, 1], y_pred=pred)
        point = patient_metrics(patients, threshold=threshold)
        patient_ci = bootstrap_patient_ci(
            patients, n_boot=n_boot, seed=seed, threshold=threshold, confidence=confidence
        )
        metrics["patient"] = {
            "n_patients": point["n_patients"],
            f"n_patients_{names[0]}": point["n_patients_negative"],
            f"n_patients_{names[1]}": point["n_patients_positive"],
            **_flatten(patient_ci),
        }
        labels = patients["label"].to_numpy()
        called = (patients["mean_p_positive"].to_numpy() >= threshold).astype(np.int64)
        _, roc = binary_auroc(labels, patients["mean_p_positive"].to_numpy(), what="patient")
        details["patient"] = {
            "score": "mean P(positive) over the patient's cells",
            "threshold": threshold,
            "auroc_defined": point["auroc_defined"],
            "confusion_matrix": {
                "rows": "true",
                "columns": "predicted",
                "labels": names,
                "counts": confusion_matrix(labels, called, n_classes=2).tolist(),
            },
            "roc_curve": roc,
        }
        details["patient_ci"] = patient_ci
        lookup = np.asarray(names, dtype=object)
        patients.insert(2, "true_label", lookup[labels])
        patients.insert(3, "predicted_label", lookup[called])
        logger.info(
            "patients: n=%d AUROC %s accuracy %.4f",
            point["n_patients"],
            "n/a" if point["auroc"] is None else f"{point['auroc']:.4f}",
            point["accuracy"],
        )
    return Evaluation(
        task_kind=task_kind,
        classes=tuple(names),
        metrics=metrics,
        details=details,
        predictions=predictions,
        patients=patients,
    )


def write_evaluation(
    evaluation: Evaluation,
    out_dir: str | Path,
    *,
    live_dir: str | Path | None = None,
    predictions_path: str | Path | None = None,
) -> list[Path]:
    """Write an evaluation's files, atomically each.

    In ``out_dir``: ``metrics.json``, ``details.json``, ``predictions.tsv``,
    ``confusion_matrix.png`` and, for the disease task, ``patients.tsv`` and
    ``patient_predictions.png``. In ``live_dir`` (default ``out_dir/live``; it must not be
    ``out_dir``, since dvclive clears its own ``metrics.json``): dvclive's
    ``plots/sklearn/{cell,patient}_{confusion_matrix,roc,precision_recall}.json``.

    Returns
    -------
    The paths written (for the live directory, the directory itself).
    """
    from dvclive import Live

    out_dir = Path(out_dir)
    live_dir = out_dir / "live" if live_dir is None else Path(live_dir)
    if live_dir.resolve() == out_dir.resolve():
        msg = f"live_dir {live_dir} must differ from out_dir: dvclive would remove metrics.json."
        raise InputError(msg)
    written = []
    for name, obj in (("metrics.json", evaluation.metrics), ("details.json", evaluation.details)):
        io.write_json(obj, out_dir / name)
        written.append(out_dir / name)
    # Per-cell predictions can be large (one row per test cell): callers may put them in the
    # DVC cache rather than beside the git-tracked reports.
    predictions_path = (
        out_dir / "predictions.tsv" if predictions_path is None else Path(predictions_path)
    )
    io.write_tsv(evaluation.predictions, predictions_path)
    written.append(predictions_path)
    cm = evaluation.details["cell"]["confusion_matrix"]["counts"]
    fig = plot_confusion_matrix(
        cm, evaluation.classes, title=f"{evaluation.task_kind}: cell-level confusion matrix"
    )
    io.save_figure(fig, out_dir / "confusion_matrix.png")
    written.append(out_dir / "confusion_matrix.png")
    binary = len(evaluation.classes) == 2
    positive = evaluation.classes[1] if binary else None
    if evaluation.patients is not None:
        io.write_tsv(evaluation.patients, out_dir / "patients.tsv")
        fig = plot_patient_predictions(
            evaluation.patients,
            classes=evaluation.classes,
            threshold=evaluation.details["patient"]["threshold"],
        )
        io.save_figure(fig, out_dir / "patient_predictions.png")
        written += [out_dir / "patients.tsv", out_dir / "patient_predictions.png"]

    with io.atomic_output(live_dir) as tmp:
        live = Live(str(tmp), dvcyaml=None, report=None, save_dvc_exp=False)
        cells = evaluation.predictions
        log_sklearn_plots(
            live,
            cells["true_label"],
            cells["predicted_label"],
            cells[f"p_{positive}"] if binary else None,
            prefix="cell",
            positive_class=positive,
        )
        if evaluation.patients is not None:
            log_sklearn_plots(
                live,
                evaluation.patients["true_label"],
                evaluation.patients["predicted_label"],
                evaluation.patients["mean_p_positive"],
                prefix="patient",
                positive_class=positive,
            )
        # Live.end() is not called: it would only add an empty metrics.json.
    written.append(live_dir)
    logger.info("wrote evaluation to %s and %s", out_dir, live_dir)
    return written
