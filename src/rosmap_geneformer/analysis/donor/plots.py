"""Figures of the donor stage: ROC curves of every method, donor scores by class, attention."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd


def _roc(ax: Any, frame: pd.DataFrame, label: str) -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    frame = frame.dropna(subset=["score"])
    if frame["label"].nunique() < 2:
        return
    fpr, tpr, _ = roc_curve(frame["label"], frame["score"])
    auroc = roc_auc_score(frame["label"], frame["score"])
    ax.plot(fpr, tpr, drawstyle="steps-post", label=f"{label} ({auroc:.2f})")


def roc_figure(pooled: Mapping[str, pd.DataFrame], test: Mapping[str, pd.DataFrame]) -> Any:
    """Two panels: pooled out-of-fold scores of the cross-validated methods, and test donors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    for ax, frames, title in (
        (axes[0], pooled, "cross-validation (out-of-fold, train + val donors)"),
        (axes[1], test, "held-out test donors"),
    ):
        for name, frame in frames.items():
            _roc(ax, frame, name)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("false positive rate")
        ax.legend(fontsize=7, loc="lower right", title="method (AUROC)", title_fontsize=7)
    axes[0].set_ylabel("true positive rate")
    fig.tight_layout()
    return fig


def donor_scores_figure(
    pooled: Mapping[str, pd.DataFrame],
    test: Mapping[str, pd.DataFrame],
    thresholds: Mapping[str, float | None],
    *,
    classes: Sequence[str],
) -> Any:
    """One row per method: each donor's score by class (hollow: out-of-fold, filled: test), and
    the method's threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(test)
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(names) + 1.5))
    rng = np.random.default_rng(0)
    colours = {0: "tab:blue", 1: "tab:red"}
    labelled: set[str] = set()
    for row, name in enumerate(names):
        for frame, filled in ((pooled.get(name), False), (test[name], True)):
            if frame is None or frame.empty:
                continue
            for label in (0, 1):
                part = frame[frame["label"] == label]
                y = row + (0.15 if label else -0.15) + rng.uniform(-0.07, 0.07, len(part))
                legend = f"{classes[label]} ({'test' if filled else 'out-of-fold'})"
                ax.scatter(
                    part["score"],
                    y,
                    s=14,
                    facecolors=colours[label] if filled else "none",
                    edgecolors=colours[label],
                    linewidths=0.8,
                    label=None if legend in labelled else legend,
                )
                labelled.add(legend)
        cut = thresholds.get(name)
        if cut is not None:
            ax.plot([cut, cut], [row - 0.35, row + 0.35], color="black", linewidth=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("donor score (higher: more AD); bar: threshold chosen on training donors")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4)
    fig.tight_layout()
    return fig


def attention_figure(attention: pd.DataFrame) -> Any:
    """Attention share over cell share per cell type, one panel per MIL method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(attention["method"].unique())
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.5 * max(1, len(names)), 3.5))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names, strict=False):
        part = attention[attention["method"] == name].sort_values("cell_type")
        ax.bar(part["cell_type"], part["enrichment"], color="tab:purple")
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{name}: attention / cell share (test donors)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.tight_layout()
    return fig
