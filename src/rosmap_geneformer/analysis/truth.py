"""Scoring pipeline outputs against the demo data's planted truth (``data/raw/demo/truth/``).

The pipeline never reads the truth; tests, benchmarks and the report do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from rosmap_geneformer.analysis.perturbation.engine import PERTURB_TYPES
from rosmap_geneformer.data.gene_map import map_symbols
from rosmap_geneformer.errors import InputError
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
        raise InputError(msg)
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
    mapped = map_symbols(truth_genes["var_name"], gene_map)
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


def perturbation_against_truth(
    table: pd.DataFrame,
    truth_ad: pd.DataFrame,
    *,
    perturb_type: str,
    cell_types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Where the planted AD genes rank in a ``perturb`` table, each in its expected direction.

    Deleting a gene that AD raises should move AD cells towards control (the top of a table
    ranked by the shift towards the goal); deleting one that AD lowers should move them further
    towards AD (the bottom). Overexpression expects the opposite. Each planted gene's percentile
    is taken from the end it is expected at, so 0 is the best place and random genes average 0.5.

    Parameters
    ----------
    table
        A ``reports/perturb/<type>.tsv`` table in its ranked order (column ``gene``: Ensembl id).
    truth_ad
        ``truth/ad_genes.tsv`` (``ensembl_id``, ``gene``, ``cell_types``, ``direction``).
    perturb_type
        ``"delete"`` or ``"overexpress"``.
    cell_types
        The cell types that were perturbed: planted genes acting only in other types are left
        out. ``None``: all.

    Returns
    -------
    ``planted_tested`` (planted genes in the table), ``genes`` (per gene: symbol, direction,
    rank, expected-end percentile), ``mean_percentile``, ``auroc`` (probability that a planted
    gene sits nearer its expected end than a random gene does to the top) and the one-sided
    Mann-Whitney ``p`` of that comparison.
    """
    if perturb_type not in PERTURB_TYPES:
        msg = f"perturb_type={perturb_type!r}: use one of {list(PERTURB_TYPES)}."
        raise InputError(msg)
    planted = truth_ad
    if cell_types is not None:
        acts = (
            planted["cell_types"]
            .str.split(",")
            .map(lambda types: bool(set(types) & set(cell_types)))
        )
        planted = planted[acts.to_numpy(bool)]
    n = len(table)
    percentile = (np.arange(n) + 0.5) / n
    position = {gene: i for i, gene in enumerate(table["gene"])}
    rows = []
    for gene in planted.itertuples():
        if gene.ensembl_id not in position:
            continue
        i = position[gene.ensembl_id]
        towards_top = (gene.direction == "up") == (perturb_type == "delete")
        rows.append(
            {
                "symbol": gene.gene,
                "direction": gene.direction,
                "rank": i + 1,
                "percentile": float(percentile[i] if towards_top else percentile[n - 1 - i]),
            }
        )
    rows.sort(key=lambda r: r["rank"])
    out: dict[str, Any] = {"genes_tested": n, "planted_tested": len(rows), "genes": rows}
    if not rows:
        return {**out, "mean_percentile": None, "auroc": None, "p": None}
    planted_pct = np.array([r["percentile"] for r in rows])
    others = np.delete(percentile, [r["rank"] - 1 for r in rows])
    test = stats.mannwhitneyu(planted_pct, others, alternative="less")
    return {
        **out,
        "mean_percentile": float(planted_pct.mean()),
        "auroc": float(1.0 - test.statistic / (planted_pct.size * others.size)),
        "p": float(test.pvalue),
    }


def read_truth(truth_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The truth tables as data frames, keyed by file stem."""
    truth_dir = Path(truth_dir)
    return {
        path.stem: read_table(path, required=[], what=f"truth table {path.name}")
        for path in sorted(truth_dir.glob("*.tsv"))
    }
