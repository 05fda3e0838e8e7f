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
        auroc = resampled_auroc(scores[pos], scores[neg], w_pos, w_neg)
    options = {"n_boot": int(n_boot), "confidence": confidence}
    return {
        "auroc": interval(point["auroc"], auroc, **options),
        "accuracy": interval(point["accuracy"], accuracy, **options),
        "balanced_accuracy": interval(point["balanced_accuracy"], balanced, **options),
    }


def resampled_auroc(
    positive_scores: np.ndarray, negative_scores: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray
) -> np.ndarray:
    """AUROC of each resample given the multiplicities ``w_pos`` / ``w_neg`` (resamples x units).

    The Mann-Whitney form: the sum over (positive, negative) pairs of their multiplicities times
    1 / 0.5 / 0 for a higher / tied / lower positive score, over the number of pairs.
    """
    sp, sn = positive_scores[:, None], negative_scores[None, :]
    wins = (sp > sn).astype(np.float64) + 0.5 * (sp == sn)
    return np.einsum("bp,pn,bn->b", w_pos, wins, w_neg) / (sp.size * sn.size)


def paired_auroc_difference(
    labels: Any,
    scores: Any,
    reference_scores: Any,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """AUROC(scores) - AUROC(reference_scores) on the same patients, with a paired bootstrap.

    Each resample draws patients with replacement within each class (as
    :func:`bootstrap_patient_ci`) and scores both methods on the same draw, so the interval of
    the difference keeps the correlation between two methods that see the same donors.

    Parameters
    ----------
    labels
        0/1 per patient.
    scores, reference_scores
        The two methods' scores of the same patients, in the same order.
    n_boot, seed, confidence
        As in :func:`bootstrap_patient_ci`.

    Returns
    -------
    ``difference``, ``ci_low``, ``ci_high``, ``p_value`` (two-sided: twice the smaller share of
    resamples on either side of 0, at least ``1 / n_boot``), ``n_boot``; all ``None`` when a
    class is missing.
    """
    check_bootstrap_options(n_boot, confidence)
    labels = check_ids(labels, 2, what="labels")
    check_same_length(labels=labels, scores=scores, reference_scores=reference_scores)
    a = np.asarray(scores, dtype=np.float64)
    b = np.asarray(reference_scores, dtype=np.float64)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    empty = {"difference": None, "ci_low": None, "ci_high": None, "p_value": None}
    if not len(pos) or not len(neg) or n_boot == 0:
        return {**empty, "n_boot": int(n_boot)}
    # Draw from each class in an order set by the scores, not by the rows, so the same patients
    # listed in another order give the same interval and p-value. The key is symmetric in the two
    # methods, so swapping them negates every resample.
    low, high = np.minimum(a, b), np.maximum(a, b)
    pos = pos[np.lexsort((high[pos], low[pos]))]
    neg = neg[np.lexsort((high[neg], low[neg]))]
    rng = np.random.default_rng(seed)
    w_neg = resample_counts(rng, len(neg), n_boot)
    w_pos = resample_counts(rng, len(pos), n_boot)
    ones_pos, ones_neg = np.ones((1, len(pos))), np.ones((1, len(neg)))
    point = (
        resampled_auroc(a[pos], a[neg], ones_pos, ones_neg)[0]
        - resampled_auroc(b[pos], b[neg], ones_pos, ones_neg)[0]
    )
    samples = resampled_auroc(a[pos], a[neg], w_pos, w_neg) - resampled_auroc(
        b[pos], b[neg], w_pos, w_neg
    )
    span = interval(float(point), samples, n_boot=int(n_boot), confidence=confidence)
    tail = min(np.mean(samples <= 0), np.mean(samples >= 0))
    return {
        "difference": span["value"],
        "ci_low": span["ci_low"],
        "ci_high": span["ci_high"],
        "p_value": float(min(1.0, max(2.0 * tail, 1.0 / n_boot))),
        "n_boot": int(n_boot),
    }
