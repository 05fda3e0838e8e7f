"""Patient (donor) level of a binary task: one row per patient, its metrics and bootstrap intervals.

A patient's score is the mean P(positive) over their cells; the patient is called positive when
that mean is ``>= threshold``. Everything after :func:`aggregate_patients` works on the
one-row-per-patient frame only, so a model that scores donors directly fits in there. Intervals
resample patients within each class (see :mod:`rosmap_geneformer.analysis.evaluation`,
"Bootstrap").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.analysis.evaluation.common import (
    binary_auroc,
    check_bootstrap_options,
    check_ids,
    check_same_length,
    confusion_matrix,
    interval,
    patient_labels,
    resample_counts,
    scores_from_confusion,
)
from rosmap_geneformer.errors import InputError

PATIENT_COLUMNS = ("patient_id", "label", "n_cells", "mean_p_positive", "frac_pred_positive")


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
    check_same_length(patient_ids=patient_ids, y_true=y_true, prob_positive=prob_positive)
    labels = check_ids(y_true, 2)
    probs = np.asarray(prob_positive, dtype=np.float64)
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        msg = "prob_positive: values must be probabilities in [0, 1] (no NaN)."
        raise InputError(msg)
    if y_pred is None:
        called = probs > 0.5
    else:
        check_same_length(patient_ids=patient_ids, y_pred=y_pred)
        called = check_ids(y_pred, 2, what="y_pred") == 1
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
            "label": patient_labels(cells["patient_id"], labels),
            "n_cells": grouped.size().to_numpy(dtype=np.int64),
            "mean_p_positive": grouped["p"].mean().to_numpy(),
            "frac_pred_positive": grouped["called"].mean().to_numpy(),
        }
    )
    return frame


def check_patients_frame(patients: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    missing = [c for c in ("label", "mean_p_positive") if c not in patients.columns]
    if missing:
        msg = (
            f"patients frame lacks column(s) {missing}; build it with aggregate_patients "
            f"(columns {list(PATIENT_COLUMNS)})."
        )
        raise InputError(msg)
    if len(patients) == 0:
        msg = "patients frame is empty: no patients to evaluate."
        raise InputError(msg)
    labels = check_ids(patients["label"].to_numpy(), 2, what="patients['label']")
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
    labels, scores = check_patients_frame(patients)
    called = (scores >= threshold).astype(np.int64)
    cm = confusion_matrix(labels, called, n_classes=2)
    scores_cm = scores_from_confusion(cm)
    auroc, _ = binary_auroc(labels, scores, what="patient")
    return {
        "n_patients": len(labels),
        "n_patients_negative": int((labels == 0).sum()),
        "n_patients_positive": int((labels == 1).sum()),
        "auroc": auroc,
        "auroc_defined": auroc is not None,
        "accuracy": float(scores_cm["accuracy"]),
        "balanced_accuracy": float(scores_cm["balanced_accuracy"]),
    }


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
    AUROC is always defined (see :mod:`rosmap_geneformer.analysis.evaluation`).

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
    check_bootstrap_options(n_boot, confidence)
    labels, scores = check_patients_frame(patients)
    point = patient_metrics(patients, threshold=threshold)
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(labels == 1)
    neg = np.flatnonzero(labels == 0)
    # Negatives are drawn first, then positives: a fixed order keeps the seed meaningful.
    w_neg = resample_counts(rng, len(neg), n_boot)
    w_pos = resample_counts(rng, len(pos), n_boot)
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
        "auroc": interval(point["auroc"], auroc, **options),
        "accuracy": interval(point["accuracy"], accuracy, **options),
        "balanced_accuracy": interval(point["balanced_accuracy"], balanced, **options),
    }
