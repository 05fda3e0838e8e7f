"""Cell- and patient-level metrics, bootstrap intervals and plots for a classifier's predictions.

Model-agnostic: everything here works on class probabilities, true class ids and patient ids, so the
fine-tuned Geneformer (``evaluate``) and the baselines (``baseline``) are scored by the same code.

Conventions
-----------
- ``classes`` lists the class names in id order: class id ``i`` is ``classes[i]``.
- A cell's predicted class is the argmax of its probabilities (ties go to the lower id), as in
  Geneformer's ``get_metrics``.
- Binary tasks: the positive class is ``classes[1]`` (for the disease task the label ids must put
  ``"AD"`` at 1). ROC AUC uses P(positive) = ``probabilities[:, 1]``.
- Patient level (disease task): a patient's score is the mean P(positive) over their cells (the
  Geneformer-style aggregation); the patient is called positive when that mean is
  ``>= threshold`` (the same ``>=`` rule as :func:`sklearn.metrics.roc_curve`).
- Macro-F1 averages over the classes present in the truth or the predictions (scikit-learn's
  default and Geneformer's); balanced accuracy is the mean recall over the classes present in the
  truth (scikit-learn's). Per-class values that are undefined (no support, no predictions) are
  ``None``, never a silent 0.

Bootstrap
---------
Percentile intervals. Patients, not cells, are the independent units, so:

- patient metrics resample patients with replacement *within each class* (stratified). Every
  resample then holds both classes, so AUROC is always defined, and the class balance of the test
  set is kept fixed, as in a case-control design (pROC's ``ci.auc(stratified=TRUE)`` default).
- cell metrics use a *clustered* bootstrap: resample patients with replacement and take all their
  cells. Cells of one donor share genotype, pathology, dissection and library, so resampling cells
  as if independent would give intervals that are far too narrow. For the disease task (a donor
  has one label) the patient resampling is stratified by label as well.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer import io

logger = logging.getLogger(__name__)

TASK_KINDS = ("cell_type", "disease")
PATIENT_COLUMNS = ("patient_id", "label", "n_cells", "mean_p_positive", "frac_pred_positive")
# Rows of softmax output sum to 1 up to float32/float16 rounding; logits do not.
_PROB_SUM_TOLERANCE = 1e-3
# Seeds the horizontal jitter of the strip plot (cosmetic, fixed so PNGs are reproducible).
_JITTER_SEED = 0
# Points of the interpolated cell-level ROC curve (Geneformer: 100).
ROC_GRID_POINTS = 100


# --------------------------------------------------------------------------------------------
# Input checks


def _check_classes(classes: Sequence[str]) -> list[str]:
    names = [str(c) for c in classes]
    if len(names) < 2:
        msg = f"classes={names}: a classifier needs at least two classes (names in id order)."
        raise ValueError(msg)
    if len(set(names)) != len(names):
        msg = f"classes={names}: class names must be unique (they name the id order)."
        raise ValueError(msg)
    return names


def _check_ids(y_true: Any, n_classes: int, *, what: str = "y_true") -> np.ndarray:
    values = np.asarray(y_true)
    if values.ndim != 1:
        msg = f"{what}: expected a 1-D array of class ids, got shape {values.shape}."
        raise ValueError(msg)
    if values.size == 0:
        msg = f"{what}: no cells to evaluate."
        raise ValueError(msg)
    integral = np.issubdtype(values.dtype, np.integer) or (
        np.issubdtype(values.dtype, np.number) and np.all(values == np.round(values))
    )
    if not integral:
        msg = (
            f"{what}: expected integer class ids (indices into classes), got dtype "
            f"{values.dtype}. Map label names to ids with classes.index(name)."
        )
        raise ValueError(msg)
    ids = values.astype(np.int64)
    bad = (ids < 0) | (ids >= n_classes)
    if bad.any():
        msg = (
            f"{what}: class id {int(ids[bad][0])} is outside 0..{n_classes - 1}; "
            f"there are {n_classes} classes."
        )
        raise ValueError(msg)
    return ids


def _check_probabilities(probabilities: Any, *, n_cells: int, n_classes: int) -> np.ndarray:
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (n_cells, n_classes):
        msg = (
            f"probabilities: expected shape (n_cells, n_classes) = ({n_cells}, {n_classes}), "
            f"got {probs.shape}."
        )
        raise ValueError(msg)
    if not np.all(np.isfinite(probs)):
        msg = "probabilities: contains NaN or infinite values."
        raise ValueError(msg)
    sums = probs.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if probs.min() < -_PROB_SUM_TOLERANCE or abs(sums[worst] - 1.0) > _PROB_SUM_TOLERANCE:
        msg = (
            f"probabilities: row {worst} sums to {sums[worst]:.6g} (min value {probs.min():.6g}); "
            "pass class probabilities (softmax of the logits, predict_proba), not logits."
        )
        raise ValueError(msg)
    return probs


def _check_same_length(**arrays: Any) -> None:
    lengths = {name: len(values) for name, values in arrays.items()}
    if len(set(lengths.values())) > 1:
        msg = f"inputs differ in length: {lengths}; pass one value per cell, in the same order."
        raise ValueError(msg)


def _check_bootstrap_options(n_boot: int, confidence: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        msg = f"n_boot={n_boot}: the number of bootstrap resamples must be a positive integer."
        raise ValueError(msg)
    if not 0.0 < confidence < 1.0:
        msg = f"confidence={confidence}: must be between 0 and 1 (e.g. 0.95)."
        raise ValueError(msg)


def _float_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# --------------------------------------------------------------------------------------------
# Scores from confusion matrices (vectorised over leading axes, for the bootstrap)


def confusion_matrix(y_true: Any, y_pred: Any, *, n_classes: int) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class, in class-id order."""
    true = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(true * n_classes + pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def _scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and balanced accuracy of one or many ``(..., k, k)`` matrices."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    true = cm.sum(axis=-1)
    pred = cm.sum(axis=-2)
    total = true.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (n_true + n_pred); a class absent from both the
        # truth and the predictions is left out of the macro average (scikit-learn's rule).
        f1 = np.where(true + pred > 0, 2 * tp / (true + pred), np.nan)
        recall = np.where(true > 0, tp / true, np.nan)
        present_f1 = np.isfinite(f1)
        present_recall = np.isfinite(recall)
        return {
            "accuracy": tp.sum(axis=-1) / total,
            "macro_f1": np.where(present_f1, f1, 0).sum(axis=-1) / present_f1.sum(axis=-1),
            "balanced_accuracy": np.where(present_recall, recall, 0).sum(axis=-1)
            / present_recall.sum(axis=-1),
        }


def _roc_points(y_binary: np.ndarray, scores: np.ndarray) -> dict[str, list[float | None]]:
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(y_binary, scores)
    # The first threshold is +inf (nothing called positive); JSON has no infinity, so it is null.
    return {
        "fpr": [float(v) for v in fpr],
        "tpr": [float(v) for v in tpr],
        "thresholds": [_float_or_none(v) for v in thresholds],
    }


def _roc_interpolated(y_binary: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """TPR at 100 evenly spaced FPRs, as in Geneformer (``interp_tpr[0] = 0``).

    A fixed grid keeps the curve of 10^5 cells small and lets curves be averaged across runs.
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y_binary, scores)
    grid = np.linspace(0.0, 1.0, ROC_GRID_POINTS)
    interp = np.interp(grid, fpr, tpr)
    interp[0] = 0.0
    return {"fpr": grid.tolist(), "tpr": interp.tolist()}


# --------------------------------------------------------------------------------------------
# Cell level


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
    names = _check_classes(classes)
    k = len(names)
    ids = _check_ids(y_true, k)
    probs = _check_probabilities(probabilities, n_cells=len(ids), n_classes=k)
    pred = predict_ids(probs)
    cm = confusion_matrix(ids, pred, n_classes=k)
    scores = _scores_from_confusion(cm)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    n_pred = cm.sum(axis=0)
    per_class = {}
    for i, name in enumerate(names):
        precision = tp[i] / n_pred[i] if n_pred[i] else None
        recall = tp[i] / support[i] if support[i] else None
        denom = support[i] + n_pred[i]
        per_class[name] = {
            "precision": _float_or_none(precision),
            "recall": _float_or_none(recall),
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
        result["auroc"], result["roc_curve"] = _binary_auroc(
            ids, probs[:, 1], what="cell", interpolate=True
        )
    return result


def _binary_auroc(
    labels: np.ndarray, scores: np.ndarray, *, what: str, interpolate: bool = False
) -> tuple[float | None, dict[str, list[Any]] | None]:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        logger.warning(
            "%s AUROC is undefined: the truth holds only class id %d; reporting null",
            what,
            int(labels[0]),
        )
        return None, None
    curve = (_roc_interpolated if interpolate else _roc_points)(labels, scores)
    return float(roc_auc_score(labels, scores)), curve


# --------------------------------------------------------------------------------------------
# Patient level


def aggregate_patients(
    patient_ids: Any, y_true: Any, prob_positive: Any, *, y_pred: Any = None
) -> pd.DataFrame:
    """One row per patient from binary cell predictions, sorted by patient id.

    Parameters
    ----------
    patient_ids
        Patient of each cell.
    y_true
        True class id (0 or 1) of each cell; must be the same for all cells of a patient.
    prob_positive
        P(positive class) of each cell.
    y_pred
        Predicted class id of each cell. By default a cell counts as predicted positive when
        ``prob_positive > 0.5``, which is the argmax rule for two classes.

    Returns
    -------
    Columns ``patient_id``, ``label`` (0/1), ``n_cells``, ``mean_p_positive`` (the patient's
    score: the mean of its cells' P(positive)) and ``frac_pred_positive``.

    Raises
    ------
    ValueError
        When a patient's cells carry different labels (naming the patient).
    """
    _check_same_length(patient_ids=patient_ids, y_true=y_true, prob_positive=prob_positive)
    labels = _check_ids(y_true, 2)
    probs = np.asarray(prob_positive, dtype=np.float64)
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        msg = "prob_positive: values must be probabilities in [0, 1] (no NaN)."
        raise ValueError(msg)
    if y_pred is None:
        called = probs > 0.5
    else:
        _check_same_length(patient_ids=patient_ids, y_pred=y_pred)
        called = _check_ids(y_pred, 2, what="y_pred") == 1
    cells = pd.DataFrame(
        {
            "patient_id": pd.Series(patient_ids).astype(str).to_numpy(),
            "label": labels,
            "p": probs,
            "called": called.astype(np.float64),
        }
    )
    grouped = cells.groupby("patient_id", sort=True)
    frame = pd.DataFrame(
        {
            "patient_id": grouped.size().index.to_numpy(),
            "label": _patient_labels(cells["patient_id"], labels),
            "n_cells": grouped.size().to_numpy(dtype=np.int64),
            "mean_p_positive": grouped["p"].mean().to_numpy(),
            "frac_pred_positive": grouped["called"].mean().to_numpy(),
        }
    )
    return frame


def _patient_labels(patient_ids: pd.Series, labels: np.ndarray) -> np.ndarray:
    """The label of each patient, in sorted patient order; raises when a patient has two."""
    frame = pd.DataFrame({"patient_id": patient_ids.to_numpy(), "label": labels})
    grouped = frame.groupby("patient_id", sort=True)["label"]
    n_labels = grouped.nunique()
    mixed = n_labels.index[n_labels > 1]
    if len(mixed):
        counts = frame.loc[frame["patient_id"] == mixed[0], "label"].value_counts().sort_index()
        msg = (
            f"patient {mixed[0]!r} has cells with different labels (class id: cells) "
            f"{counts.to_dict()}, and {len(mixed)} patient(s) in all; a disease label is a donor "
            "property, so every cell of a patient must carry the same label. Check the label "
            "derivation (metadata) and the patient_id column."
        )
        raise ValueError(msg)
    return grouped.first().to_numpy(dtype=np.int64)


def _check_patients_frame(patients: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    missing = [c for c in ("label", "mean_p_positive") if c not in patients.columns]
    if missing:
        msg = (
            f"patients frame lacks column(s) {missing}; build it with aggregate_patients "
            f"(columns {list(PATIENT_COLUMNS)})."
        )
        raise ValueError(msg)
    if len(patients) == 0:
        msg = "patients frame is empty: no patients to evaluate."
        raise ValueError(msg)
    labels = _check_ids(patients["label"].to_numpy(), 2, what="patients['label']")
    return labels, patients["mean_p_positive"].to_numpy(dtype=np.float64)


def patient_metrics(patients: pd.DataFrame, *, threshold: float = 0.5) -> dict[str, Any]:
    """Patient-level metrics of a binary task from :func:`aggregate_patients` output.

    Parameters
    ----------
    patients
        One row per patient with ``label`` (0/1) and ``mean_p_positive``.
    threshold
        A patient is called positive when ``mean_p_positive >= threshold``.

    Returns
    -------
    ``n_patients``, ``n_patients_negative``, ``n_patients_positive``, ``auroc`` (``None``, with a
    logged warning and ``auroc_defined`` False, when only one class is present), ``accuracy`` and
    ``balanced_accuracy`` at the threshold.
    """
    labels, scores = _check_patients_frame(patients)
    called = (scores >= threshold).astype(np.int64)
    cm = confusion_matrix(labels, called, n_classes=2)
    scores_cm = _scores_from_confusion(cm)
    auroc, _ = _binary_auroc(labels, scores, what="patient")
    return {
        "n_patients": len(labels),
        "n_patients_negative": int((labels == 0).sum()),
        "n_patients_positive": int((labels == 1).sum()),
        "auroc": auroc,
        "auroc_defined": auroc is not None,
        "accuracy": float(scores_cm["accuracy"]),
        "balanced_accuracy": float(scores_cm["balanced_accuracy"]),
    }


# --------------------------------------------------------------------------------------------
# Bootstrap


def _resample_counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """``(n_boot, n)`` multiplicities of ``n`` units drawn ``n`` times with replacement."""
    if n == 0:
        return np.zeros((n_boot, 0), dtype=np.int64)
    draws = rng.integers(0, n, size=(n_boot, n))
    offsets = (np.arange(n_boot, dtype=np.int64) * n)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_boot * n).reshape(n_boot, n)


def _stratified_counts(rng: np.random.Generator, strata: np.ndarray, n_boot: int) -> np.ndarray:
    """Multiplicities of units resampled with replacement within each stratum (sorted order)."""
    counts = np.zeros((n_boot, len(strata)), dtype=np.int64)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        counts[:, members] = _resample_counts(rng, len(members), n_boot)
    return counts


def _interval(
    value: float | None, samples: np.ndarray | None, *, n_boot: int, confidence: float
) -> dict[str, Any]:
    if value is None or samples is None:
        return {"value": None, "ci_low": None, "ci_high": None, "n_boot": n_boot}
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return {"value": float(value), "ci_low": float(low), "ci_high": float(high), "n_boot": n_boot}


def bootstrap_patient_ci(
    patients: pd.DataFrame,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Percentile bootstrap intervals of the patient metrics, resampling patients within class.

    Each resample draws, with replacement, as many positive patients as there are from the
    positives and as many negatives from the negatives, so every resample holds both classes and
    AUROC is always defined (see the module docstring).

    Parameters
    ----------
    patients
        :func:`aggregate_patients` output.
    n_boot
        Number of resamples.
    seed
        Seeds ``np.random.default_rng``; the same seed gives the same intervals.
    threshold
        Decision threshold on ``mean_p_positive`` for accuracy and balanced accuracy.
    confidence
        Coverage of the interval (0.95: the 2.5th and 97.5th percentiles).

    Returns
    -------
    ``{"auroc" | "accuracy" | "balanced_accuracy": {"value", "ci_low", "ci_high", "n_boot"}}``;
    ``value`` is the estimate on all patients. AUROC entries are ``None`` with one class.
    """
    _check_bootstrap_options(n_boot, confidence)
    labels, scores = _check_patients_frame(patients)
    point = patient_metrics(patients, threshold=threshold)
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(labels == 1)
    neg = np.flatnonzero(labels == 0)
    # Negatives are drawn first, then positives: a fixed order keeps the seed meaningful.
    w_neg = _resample_counts(rng, len(neg), n_boot)
    w_pos = _resample_counts(rng, len(pos), n_boot)
    correct = ((scores >= threshold).astype(np.int64) == labels).astype(np.float64)
    hits_neg = w_neg @ correct[neg]
    hits_pos = w_pos @ correct[pos]
    accuracy = (hits_neg + hits_pos) / len(labels)
    recalls = [hits / len(idx) for hits, idx in ((hits_neg, neg), (hits_pos, pos)) if len(idx)]
    balanced = np.mean(recalls, axis=0)
    auroc = None
    if len(pos) and len(neg):
        # AUROC of a resample = sum over (positive, negative) pairs of their multiplicities times
        # 1 / 0.5 / 0 for a higher / tied / lower positive score (the Mann-Whitney form).
        sp, sn = scores[pos][:, None], scores[neg][None, :]
        wins = (sp > sn).astype(np.float64) + 0.5 * (sp == sn)
        auroc = np.einsum("bp,pn,bn->b", w_pos, wins, w_neg) / (len(pos) * len(neg))
    options = {"n_boot": int(n_boot), "confidence": confidence}
    return {
        "auroc": _interval(point["auroc"], auroc, **options),
        "accuracy": _interval(point["accuracy"], accuracy, **options),
        "balanced_accuracy": _interval(point["balanced_accuracy"], balanced, **options),
    }


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
    _check_bootstrap_options(n_boot, confidence)
    _check_same_length(patient_ids=patient_ids, y_true=y_true, y_pred=y_pred)
    true = _check_ids(y_true, n_classes)
    pred = _check_ids(y_pred, n_classes, what="y_pred")
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
        patient_labels = _patient_labels(patient_series, true)
        weights = _stratified_counts(rng, patient_labels, n_boot)
    else:
        weights = _resample_counts(rng, n_patients, n_boot)
    boot = _scores_from_confusion((weights @ per_patient).reshape(n_boot, n_classes, n_classes))
    point = _scores_from_confusion(per_patient.sum(axis=0).reshape(n_classes, n_classes))
    options = {"n_boot": int(n_boot), "confidence": confidence}
    return {
        name: _interval(float(point[name]), boot[name], **options)
        for name in ("accuracy", "macro_f1", "balanced_accuracy")
    }


# --------------------------------------------------------------------------------------------
# One-call evaluation


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
    names = _check_classes(classes)
    _check_same_length(cell_ids=cell_ids, patient_ids=patient_ids, y_true=y_true)
    ids = _check_ids(y_true, len(names))
    probs = _check_probabilities(probabilities, n_cells=len(ids), n_classes=len(names))
    cells = pd.Series(cell_ids).astype(str)
    if not cells.is_unique:
        dups = cells[cells.duplicated()].unique()
        msg = f"cell_ids: {len(dups)} duplicate cell id(s), e.g. {list(dups[:5])}."
        raise ValueError(msg)
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
        Bootstrap settings (see :func:`bootstrap_patient_ci`, :func:`bootstrap_cell_ci`).
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
        raise ValueError(msg)
    names = _check_classes(classes)
    if task_kind == "disease" and len(names) != 2:
        msg = f"task_kind='disease' needs two classes (negative, positive), got {names}."
        raise ValueError(msg)
    _check_same_length(
        cell_ids=cell_ids, patient_ids=patient_ids, y_true=y_true, probabilities=probabilities
    )
    predictions = predictions_frame(cell_ids, patient_ids, y_true, probabilities, classes=names)
    ids = _check_ids(y_true, len(names))
    probs = _check_probabilities(probabilities, n_cells=len(ids), n_classes=len(names))
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
        _, roc = _binary_auroc(labels, patients["mean_p_positive"].to_numpy(), what="patient")
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


# --------------------------------------------------------------------------------------------
# Plots


def log_sklearn_plots(
    live: Any,
    y_true_names: Any,
    y_pred_names: Any,
    prob_positive: Any = None,
    *,
    prefix: str,
    positive_class: str | None = None,
    curve_decimals: int | None = 3,
) -> list[str]:
    """Log dvclive scikit-learn plots that ``dvc plots show/diff`` render.

    Writes ``<live.dir>/plots/sklearn/<prefix>_confusion_matrix.json`` (records of ``actual`` and
    ``predicted`` label names) and, when ``prob_positive`` is given and both classes are present,
    ``<prefix>_roc.json`` (``fpr``, ``tpr``) and ``<prefix>_precision_recall.json``
    (``recall``, ``precision``). dvclive writes these files directly; no git repository is needed
    (create ``live`` with ``save_dvc_exp=False`` outside one).

    Parameters
    ----------
    live
        A ``dvclive.Live``.
    y_true_names, y_pred_names
        True and predicted label names (one per cell, or per patient).
    prob_positive
        P(positive class) per item, for the binary curves.
    prefix
        Name prefix of the plot files, e.g. ``"cell"`` or ``"patient"``.
    positive_class
        Name of the positive class; required with ``prob_positive``.
    curve_decimals
        Round ``prob_positive`` to this many decimals for the ROC and precision-recall files
        (``None``: no rounding). dvclive writes one point per distinct score, so 10^5 cells
        would give files of tens of MB; at 3 decimals a curve has at most ~1,000 points and
        moves by less than the rounding. The AUROC in the metrics is computed unrounded.

    Returns
    -------
    The names of the logged plots.
    """
    true = [str(v) for v in y_true_names]
    pred = [str(v) for v in y_pred_names]
    if len(true) != len(pred):
        msg = f"y_true_names ({len(true)}) and y_pred_names ({len(pred)}) differ in length."
        raise ValueError(msg)
    logged = [f"{prefix}_confusion_matrix"]
    live.log_sklearn_plot(
        "confusion_matrix",
        true,
        pred,
        name=logged[0],
        title=f"{prefix} confusion matrix",
        x_label="true label",
        y_label="predicted label",
    )
    if prob_positive is None:
        return logged
    if positive_class is None:
        msg = "log_sklearn_plots: pass positive_class with prob_positive."
        raise ValueError(msg)
    scores = np.asarray(prob_positive, dtype=np.float64)
    if curve_decimals is not None:
        scores = np.round(scores, curve_decimals)
    binary = (np.asarray(true, dtype=object) == positive_class).astype(np.int64)
    if len(scores) != len(binary):
        msg = f"prob_positive ({len(scores)}) and y_true_names ({len(binary)}) differ in length."
        raise ValueError(msg)
    if len(np.unique(binary)) < 2:
        logger.warning("%s: one class only, ROC and precision-recall plots skipped", prefix)
        return logged
    for kind, title in (("roc", "ROC"), ("precision_recall", "precision-recall")):
        name = f"{prefix}_{kind}"
        live.log_sklearn_plot(kind, binary, scores, name=name, title=f"{prefix} {title}")
        logged.append(name)
    return logged


def plot_confusion_matrix(counts: Any, classes: Sequence[str], *, title: str) -> Any:
    """Confusion matrix coloured by row fraction (recall), with counts and fractions annotated.

    Parameters
    ----------
    counts
        ``(k, k)`` counts, rows = true class, columns = predicted class.
    classes
        Class names in row/column order.
    title
        Figure title.
    """
    from matplotlib.figure import Figure

    cm = np.asarray(counts, dtype=np.float64)
    names = list(classes)
    k = len(names)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = max(4.0, 0.75 * k + 2.5)
    # A bare Figure, not pyplot: no global backend or figure registry is touched.
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{int(cm[i, j]):,}\n{frac[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if frac[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k), labels=names, rotation=45, ha="right")
    ax.set_yticks(
        range(k), labels=[f"{n} ({int(r):,})" for n, r in zip(names, rows[:, 0], strict=True)]
    )
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label (cells)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    fig.tight_layout()
    return fig


def plot_patient_predictions(
    patients: pd.DataFrame, *, classes: Sequence[str], threshold: float = 0.5
) -> Any:
    """Patient-level ROC (left) and each patient's mean P(positive) by true class (right).

    Parameters
    ----------
    patients
        :func:`aggregate_patients` output.
    classes
        ``[negative, positive]`` class names.
    threshold
        The decision threshold, drawn as a line on the strip plot.
    """
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    labels, scores = _check_patients_frame(patients)
    names = _check_classes(classes)
    fig = Figure(figsize=(10, 4.5))
    ax_roc, ax_strip = fig.subplots(1, 2)
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        auc = roc_auc_score(labels, scores)
        ax_roc.plot(fpr, tpr, color="tab:red", drawstyle="default", label=f"AUROC = {auc:.3f}")
        ax_roc.legend(loc="lower right")
    else:
        ax_roc.text(0.5, 0.5, "one class only:\nAUROC undefined", ha="center", va="center")
    ax_roc.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
    ax_roc.set_xlim(-0.02, 1.02)
    ax_roc.set_ylim(-0.02, 1.02)
    ax_roc.set_aspect("equal")
    ax_roc.set_xlabel("false positive rate")
    ax_roc.set_ylabel("true positive rate")
    ax_roc.set_title(f"patient ROC ({len(labels)} patients)")

    rng = np.random.default_rng(_JITTER_SEED)
    for label, colour in ((0, "tab:blue"), (1, "tab:red")):
        values = scores[labels == label]
        jitter = rng.uniform(-0.15, 0.15, size=len(values))
        ax_strip.scatter(
            label + jitter, values, s=30, color=colour, alpha=0.8, edgecolor="black", linewidth=0.4
        )
        if len(values):
            ax_strip.hlines(np.mean(values), label - 0.25, label + 0.25, color=colour)
    ax_strip.axhline(
        threshold, color="0.4", linestyle="--", linewidth=1, label=f"threshold {threshold:g}"
    )
    counts = [int((labels == i).sum()) for i in (0, 1)]
    ax_strip.set_xticks(
        [0, 1], labels=[f"{n}\n({c} patients)" for n, c in zip(names, counts, strict=True)]
    )
    ax_strip.set_xlim(-0.6, 1.6)
    ax_strip.set_ylim(-0.02, 1.02)
    ax_strip.set_xlabel("true class")
    ax_strip.set_ylabel(f"mean P({names[1]}) over the patient's cells")
    ax_strip.set_title("per-patient score")
    ax_strip.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


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
        raise ValueError(msg)
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
