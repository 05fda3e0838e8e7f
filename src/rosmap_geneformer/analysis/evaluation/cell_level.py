"""Cell level: predicted classes, cell metrics and their clustered bootstrap intervals.

Cells of one donor are not independent, so :func:`bootstrap_cell_ci` resamples patients and keeps
all their cells (see :mod:`rosmap_geneformer.analysis.evaluation`, "Bootstrap").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.analysis.evaluation.common import (
    binary_auroc,
    check_bootstrap_options,
    check_classes,
    check_ids,
    check_probabilities,
    check_same_length,
    confusion_matrix,
    float_or_none,
    interval,
    patient_labels,
    resample_counts,
    scores_from_confusion,
    stratified_counts,
)


def predict_ids(probabilities: Any) -> np.ndarray:
    """Predicted class ids: the argmax of each row (ties go to the lower class id)."""
    return np.asarray(probabilities).argmax(axis=1).astype(np.int64)


def cell_metrics(y_true: Any, probabilities: Any, *, classes: Sequence[str]) -> dict[str, Any]:
    """Cell-level classification metrics.

    Parameters
    ----------
    y_true
        True class id of each cell (index into ``classes``).
    probabilities
        Class probabilities, shape ``(n_cells, n_classes)``, columns in ``classes`` order.
    classes
        Class names in id order. For two classes the positive class is ``classes[1]``.

    Returns
    -------
    ``n_cells``, ``accuracy``, ``macro_f1``, ``balanced_accuracy``; ``per_class``
    (``{name: {precision, recall, f1, support, n_predicted}}``, ``None`` where undefined);
    ``confusion_matrix`` (list of rows; rows = true, columns = predicted, both in ``classes``
    order); and for binary tasks ``positive_class``, ``auroc`` (from P(``classes[1]``); ``None``
    when the truth holds one class) and ``roc_curve`` (``fpr``: 100 evenly spaced false
    positive rates, ``tpr``: the interpolated true positive rates, Geneformer's convention).
    """
    names = check_classes(classes)
    k = len(names)
    ids = check_ids(y_true, k)
    probs = check_probabilities(probabilities, n_cells=len(ids), n_classes=k)
    pred = predict_ids(probs)
    cm = confusion_matrix(ids, pred, n_classes=k)
    scores = scores_from_confusion(cm)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    n_pred = cm.sum(axis=0)
    per_class = {}
    for i, name in enumerate(names):
        precision = tp[i] / n_pred[i] if n_pred[i] else None
        recall = tp[i] / support[i] if support[i] else None
        denom = support[i] + n_pred[i]
        per_class[name] = {
            "precision": float_or_none(precision),
            "recall": float_or_none(recall),
            "f1": float(2 * tp[i] / denom) if denom else None,
            "support": int(support[i]),
            "n_predicted": int(n_pred[i]),
        }
    result: dict[str, Any] = {
        "n_cells": len(ids),
        "accuracy": float(scores["accuracy"]),
        "macro_f1": float(scores["macro_f1"]),
        "balanced_accuracy": float(scores["balanced_accuracy"]),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }
    if k == 2:
        result["positive_class"] = names[1]
        result["auroc"], result["roc_curve"] = binary_auroc(
            ids, probs[:, 1], what="cell", interpolate=True
        )
    return result


def bootstrap_cell_ci(
    patient_ids: Any,
    y_true: Any,
    y_pred: Any,
    *,
    n_classes: int,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    stratify_by_label: bool = False,
) -> dict[str, dict[str, Any]]:
    """Clustered percentile bootstrap of the cell metrics: resample patients, keep all their cells.

    Parameters
    ----------
    patient_ids
        Patient of each cell.
    y_true, y_pred
        True and predicted class id of each cell.
    n_classes
        Number of classes.
    n_boot
        Number of resamples.
    seed
        Seeds ``np.random.default_rng``.
    confidence
        Coverage of the interval.
    stratify_by_label
        Resample patients within their label (disease task, where a patient has one label), so
        that every resample holds both classes. Raises when a patient's cells differ in label.

    Returns
    -------
    ``{"accuracy" | "macro_f1" | "balanced_accuracy": {"value", "ci_low", "ci_high", "n_boot"}}``
    with ``value`` the estimate on all cells.
    """
    check_bootstrap_options(n_boot, confidence)
    check_same_length(patient_ids=patient_ids, y_true=y_true, y_pred=y_pred)
    true = check_ids(y_true, n_classes)
    pred = check_ids(y_pred, n_classes, what="y_pred")
    patient_series = pd.Series(patient_ids).astype(str)
    codes, patients = pd.factorize(patient_series, sort=True)
    n_patients = len(patients)
    k2 = n_classes * n_classes
    # One confusion matrix per patient; a resample's matrix is their weighted sum.
    per_patient = np.bincount(
        codes * k2 + true * n_classes + pred, minlength=n_patients * k2
    ).reshape(n_patients, k2)
    rng = np.random.default_rng(seed)
    if stratify_by_label:
        # factorize(sort=True) and groupby(sort=True) give the same patient order.
        strata = patient_labels(patient_series, true)
        weights = stratified_counts(rng, strata, n_boot)
    else:
        weights = resample_counts(rng, n_patients, n_boot)
    boot = scores_from_confusion((weights @ per_patient).reshape(n_boot, n_classes, n_classes))
    point = scores_from_confusion(per_patient.sum(axis=0).reshape(n_classes, n_classes))
    options = {"n_boot": int(n_boot), "confidence": confidence}
    return {
        name: interval(float(point[name]), boot[name], **options)
        for name in ("accuracy", "macro_f1", "balanced_accuracy")
    }
