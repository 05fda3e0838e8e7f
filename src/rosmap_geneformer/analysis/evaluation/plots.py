"""Figures of an evaluation and the dvclive plots that ``dvc plots show/diff`` render.

Figures are bare matplotlib ``Figure`` objects (no pyplot state); the caller saves them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.analysis.evaluation.common import check_classes
from rosmap_geneformer.analysis.evaluation.patient_level import check_patients_frame
from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)

# Seeds the horizontal jitter of the strip plot (cosmetic, fixed so PNGs are reproducible).
_JITTER_SEED = 0


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
        raise InputError(msg)
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
        raise InputError(msg)
    scores = np.asarray(prob_positive, dtype=np.float64)
    if curve_decimals is not None:
        scores = np.round(scores, curve_decimals)
    binary = (np.asarray(true, dtype=object) == positive_class).astype(np.int64)
    if len(scores) != len(binary):
        msg = f"prob_positive ({len(scores)}) and y_true_names ({len(binary)}) differ in length."
        raise InputError(msg)
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
        :func:`~rosmap_geneformer.analysis.evaluation.patient_level.aggregate_patients` output.
    classes
        ``[negative, positive]`` class names.
    threshold
        The decision threshold, drawn as a line on the strip plot.
    """
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    labels, scores = check_patients_frame(patients)
    names = check_classes(classes)
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
