"""What the ranked gene tables show and draw: token -> Ensembl id and symbol
(:func:`token_annotation`, for the perturb and grn stages), the ranked table with its
significance (:func:`annotate_table`) and the top-genes bar chart (:func:`plot_top_genes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.analysis.perturbation.statistics import NET


def token_annotation(
    token_dictionary: Mapping[str, int], symbols: Mapping[str, str]
) -> pd.DataFrame:
    """Token -> Ensembl id and symbol (``""`` when unknown), special tokens excluded.

    Parameters
    ----------
    token_dictionary
        Ensembl id -> token.
    symbols
        Ensembl id -> gene symbol (e.g. ``var["gene_symbol"]`` of the sampled h5ad).
    """
    rows = [
        (int(token), gene, str(symbols.get(gene, "") or ""))
        for gene, token in token_dictionary.items()
        if not gene.startswith("<")
    ]
    frame = pd.DataFrame(rows, columns=["token", "ensembl_id", "symbol"])
    return frame.set_index("token").sort_index()


def annotate_table(
    table: pd.DataFrame, annotation: pd.DataFrame, *, fdr: float, fdr_column: str = "fdr"
) -> pd.DataFrame:
    """Add rank, Ensembl id, symbol and significance (``fdr_column`` below ``fdr``) to a
    :func:`~rosmap_geneformer.analysis.perturbation.statistics.perturbation_table`."""
    out = table.copy()
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    out.insert(1, "gene", annotation["ensembl_id"].reindex(out.index).fillna("").to_numpy())
    out.insert(2, "symbol", annotation["symbol"].reindex(out.index).fillna("").to_numpy())
    out["significant"] = out[fdr_column] < fdr
    out.index.name = "token"
    return out.reset_index()


def plot_top_genes(
    table: pd.DataFrame, *, top_n: int, goal_state: str, title: str, column: str = "mean_shift"
) -> Any:
    """Bar chart of the top genes of the table by ``column`` (the shift it is ranked by).

    Bars of genes significant at the FDR threshold are filled, others hatched.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = table.head(top_n).iloc[::-1]
    labels = [s or g for s, g in zip(top["symbol"], top["gene"], strict=True)]
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(top) + 1.4))
    colors = ["#1f77b4" if s else "#c7c7c7" for s in top["significant"]]
    ax.barh(labels, top[column], color=colors, edgecolor="#333333", linewidth=0.4)
    ax.axvline(0.0, color="#333333", linewidth=0.6)
    what = "net shift towards" if column.startswith(NET) else "shift towards"
    ax.set_xlabel(f"mean {what} {goal_state} (cosine to centroid, perturbed - original)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(facecolor="#1f77b4", label="significant (BH FDR)"),
            Patch(facecolor="#c7c7c7", label="not significant"),
        ],
        fontsize=7,
        loc="lower right",
    )
    fig.tight_layout()
    return fig
