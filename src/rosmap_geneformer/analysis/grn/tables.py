"""The ``grn`` stage's tables from a :func:`~rosmap_geneformer.analysis.grn.stage.grn_dataset`
summary: the headline for ``dvc metrics`` and the method x metric table with intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

METRIC_KEYS = ("auprc", "auprc_ratio", "epr", "auroc")


def metrics_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures of a :func:`grn_dataset` summary, for ``dvc metrics``.

    Per method: AUPRC and EPR on all edges and, when a TF list restricts the regulators, EPR on
    TF regulators (the field's headline), each with its bootstrap interval (``<metric>_low``,
    ``<metric>_high``). AUROC, AUPRC over random, precision at k, the per-regulator scores and
    the planted cases stay in ``summary.json`` and ``methods.tsv``, so ``dvc exp show`` keeps a
    readable width.
    """
    out: dict[str, Any] = {"candidate_edges": summary["edges"]["candidates"]}
    evaluation = summary.get("evaluation")
    if not evaluation:
        return out
    scopes = evaluation["scopes"]
    first = next(iter(scopes["all"].values()))
    out["positive_edges"] = first["n_positive"]
    out["prevalence"] = first["prevalence"]
    out["all"] = {
        name: _with_interval(scores, ("auprc", "epr")) for name, scores in scopes["all"].items()
    }
    if "tf" in scopes:
        out["tf"] = {
            name: _with_interval(scores, ("epr",)) for name, scores in scopes["tf"].items()
        }
    return out


def _with_interval(scores: Mapping[str, Any], keys: Sequence[str]) -> dict[str, float]:
    row: dict[str, float] = {}
    for key in keys:
        low, high = scores["interval"][key]
        row[key], row[f"{key}_low"], row[f"{key}_high"] = scores[key], low, high
    return row


def methods_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    """One row per scope and method: the metrics with their intervals, for the report."""
    rows = []
    for scope, methods in summary.get("evaluation", {}).get("scopes", {}).items():
        for name, scores in methods.items():
            row: dict[str, Any] = {"scope": scope, "method": name}
            row["positive_edges"] = scores["n_positive"]
            row["edges"] = scores["n_edges"]
            row.update(_with_interval(scores, METRIC_KEYS))
            row.update({f"precision_at_{k}": v for k, v in scores["precision_at_k"].items()})
            rows.append(row)
    return pd.DataFrame(rows)
