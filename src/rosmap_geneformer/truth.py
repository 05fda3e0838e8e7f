"""Scoring pipeline outputs against the demo data's planted truth (``data/raw/demo/truth/``).

The pipeline never reads the truth; tests, benchmarks and the report do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from rosmap_geneformer import genes
from rosmap_geneformer.io import read_table


def qc_against_truth(cells: pd.DataFrame, truth_cells: pd.DataFrame) -> dict[str, Any]:
    """How well QC removed the injected low-quality cells and doublets.

    Parameters
    ----------
    cells
        The per-cell QC tables of all splits (index = cell name; columns ``kept``,
        ``predicted_doublet``, ``doublet_score``).
    truth_cells
        ``truth/cells.tsv`` (columns ``cell``, ``is_doublet``, ``is_low_quality``).
    """
    truth = truth_cells.set_index("cell").reindex(cells.index)
    if truth["is_doublet"].isna().any():
        msg = "QC tables name cells that truth/cells.tsv does not know; are they from this demo?"
        raise ValueError(msg)
    is_doublet = truth["is_doublet"].astype(bool)
    low_quality = truth["is_low_quality"].astype(bool)
    kept = cells["kept"].astype(bool)
    called = cells["predicted_doublet"].astype(bool)
    scored = cells["doublet_score"].notna()
    true_calls = int((called & is_doublet).sum())
    return {
        "low_quality_injected": int(low_quality.sum()),
        "low_quality_removed_fraction": float((~kept[low_quality]).mean()),
        "normal_cells_removed_by_filters": int(
            (~kept & ~called & ~low_quality & ~is_doublet).sum()
        ),
        "doublets_injected": int(is_doublet.sum()),
        "doublets_scored": int((is_doublet & scored).sum()),
        "doublets_called": int(called.sum()),
        "scrublet_recall": true_calls / max(int(is_doublet.sum()), 1),
        "scrublet_recall_scored_libraries": true_calls / max(int((is_doublet & scored).sum()), 1),
        "scrublet_precision": true_calls / max(int(called.sum()), 1),
        "doublets_removed_fraction": float((~kept[is_doublet]).mean()),
    }


def mapping_against_truth(truth_genes: pd.DataFrame, gene_map: pd.DataFrame) -> dict[str, Any]:
    """Fraction of the generator's mappable genes that map to their true Ensembl id.

    Parameters
    ----------
    truth_genes
        ``truth/genes.tsv`` (``var_name``, ``ensembl_id``, ``kind``).
    gene_map
        The ``gene_map`` stage's table.
    """
    mapped = genes.map_symbols(truth_genes["var_name"], gene_map)
    expected = truth_genes["ensembl_id"].fillna("").astype(str).to_numpy()
    got = mapped["ensembl_id"].fillna("").astype(str).to_numpy()
    mappable = expected != ""
    by_kind = {}
    for kind in sorted(truth_genes["kind"].unique()):
        rows = (truth_genes["kind"] == kind).to_numpy()
        by_kind[kind] = float((got[rows] == expected[rows]).mean())
    return {
        "mappable_genes": int(mappable.sum()),
        "mappable_recovered_fraction": float((got[mappable] == expected[mappable]).mean()),
        "unmappable_wrongly_mapped": int(((got != "") & ~mappable).sum()),
        "agreement_by_kind": by_kind,
    }


def read_truth(truth_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The truth tables as data frames, keyed by file stem."""
    truth_dir = Path(truth_dir)
    return {
        path.stem: read_table(path, required=[], what=f"truth table {path.name}")
        for path in sorted(truth_dir.glob("*.tsv"))
    }
