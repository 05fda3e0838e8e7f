"""Level-independent pieces of the evaluation, shared by the cell and patient levels.

Input checks (class names, class ids, probabilities, lengths, bootstrap options), scores from
confusion matrices (vectorised over leading axes, for the bootstrap), ROC curves and AUROC, the
label of each patient, and the bootstrap's resampling and percentile intervals. The conventions
are those of :mod:`rosmap_geneformer.analysis.evaluation`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)

# Rows of softmax output sum to 1 up to float32/float16 rounding; logits do not.
_PROB_SUM_TOLERANCE = 1e-3
# Points of the interpolated cell-level ROC curve (Geneformer: 100).
ROC_GRID_POINTS = 100


# --------------------------------------------------------------------------------------------
# Input checks


def check_classes(classes: Sequence[str]) -> list[str]:
    names = [str(c) for c in classes]
    if len(names) < 2:
        msg = f"classes={names}: a classifier needs at least two classes (names in id order)."
        raise InputError(msg)
    if len(set(names)) != len(names):
        msg = f"classes={names}: class names must be unique (they name the id order)."
        raise InputError(msg)
    return names


def check_ids(y_true: Any, n_classes: int, *, what: str = "y_true") -> np.ndarray:
    values = np.asarray(y_true)
    if values.ndim != 1:
        msg = f"{what}: expected a 1-D array of class ids, got shape {values.shape}."
        raise InputError(msg)
    if values.size == 0:
        msg = f"{what}: no cells to evaluate."
        raise InputError(msg)
    integral = np.issubdtype(values.dtype, np.integer) or (
        np.issubdtype(values.dtype, np.number) and np.all(values == np.round(values))
    )
    if not integral:
        msg = (
            f"{what}: expected integer class ids (indices into classes), got dtype "
            f"{values.dtype}. Map label names to ids with classes.index(name)."
        )
        raise InputError(msg)
    ids = values.astype(np.int64)
    bad = (ids < 0) | (ids >= n_classes)
    if bad.any():
        msg = (
            f"{what}: class id {int(ids[bad][0])} is outside 0..{n_classes - 1}; "
            f"there are {n_classes} classes."
        )
        raise InputError(msg)
    return ids


def check_probabilities(probabilities: Any, *, n_cells: int, n_classes: int) -> np.ndarray:
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (n_cells, n_classes):
        msg = (
            f"probabilities: expected shape (n_cells, n_classes) = ({n_cells}, {n_classes}), "
            f"got {probs.shape}."
        )
        raise InputError(msg)
    if not np.all(np.isfinite(probs)):
        msg = "probabilities: contains NaN or infinite values."
        raise InputError(msg)
    sums = probs.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if probs.min() < -_PROB_SUM_TOLERANCE or abs(sums[worst] - 1.0) > _PROB_SUM_TOLERANCE:
        msg = (
            f"probabilities: row {worst} sums to {sums[worst]:.6g} (min value {probs.min():.6g}); "
            "pass class probabilities (softmax of the logits, predict_proba), not logits."
        )
        raise InputError(msg)
    return probs


def check_same_length(**arrays: Any) -> None:
    lengths = {name: len(values) for name, values in arrays.items()}
    if len(set(lengths.values())) > 1:
        msg = f"inputs differ in length: {lengths}; pass one value per cell, in the same order."
        raise InputError(msg)


def check_bootstrap_options(n_boot: int, confidence: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        msg = f"n_boot={n_boot}: the number of bootstrap resamples must be a positive integer."
        raise InputError(msg)
    if not 0.0 < confidence < 1.0:
        msg = f"confidence={confidence}: must be between 0 and 1 (e.g. 0.95)."
        raise InputError(msg)


def float_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def patient_labels(patient_ids: pd.Series, labels: np.ndarray) -> np.ndarray:
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
        raise InputError(msg)
    return grouped.first().to_numpy(dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Scores from confusion matrices (vectorised over leading axes, for the bootstrap)


def confusion_matrix(y_true: Any, y_pred: Any, *, n_classes: int) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class, in class-id order."""
    true = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(true * n_classes + pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
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
        "thresholds": [float_or_none(v) for v in thresholds],
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


def binary_auroc(
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
# Bootstrap resampling


def resample_counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """``(n_boot, n)`` multiplicities of ``n`` units drawn ``n`` times with replacement."""
    if n == 0:
        return np.zeros((n_boot, 0), dtype=np.int64)
    draws = rng.integers(0, n, size=(n_boot, n))
    offsets = (np.arange(n_boot, dtype=np.int64) * n)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_boot * n).reshape(n_boot, n)


def stratified_counts(rng: np.random.Generator, strata: np.ndarray, n_boot: int) -> np.ndarray:
    """Multiplicities of units resampled with replacement within each stratum (sorted order)."""
    counts = np.zeros((n_boot, len(strata)), dtype=np.int64)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        counts[:, members] = resample_counts(rng, len(members), n_boot)
    return counts


def interval(
    value: float | None, samples: np.ndarray | None, *, n_boot: int, confidence: float
) -> dict[str, Any]:
    if value is None or samples is None:
        return {"value": None, "ci_low": None, "ci_high": None, "n_boot": n_boot}
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return {"value": float(value), "ci_low": float(low), "ci_high": float(high), "n_boot": n_boot}
