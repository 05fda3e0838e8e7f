"""What the donor-level methods read: donors, pseudobulk, cell-type proportions, model outputs.

- **Donors** come from the annotated cell tables of every split (all cells that passed QC, not the
  sampled ones): one row per donor with its split and AD label.
- **Pseudobulk**: the raw counts of every annotated cell summed per donor x cell type, streamed
  from the one count matrix ``compute.chunk_size`` cells at a time (memory: groups x genes
  float64, never cells x genes). Per donor sums are the sums over cell types. Features are
  ``log1p`` CPM; a donor x cell type pseudobulk of fewer than ``min_cells`` cells is missing
  (``NaN``, imputed inside each fold's pipeline) rather than read from a handful of cells.
- **Proportions**: each donor's share of each cell type among its annotated cells.
- **Cells for the model-based methods**: the tokenized cells (train and val as sampled, test
  whole), their embeddings from a model (Geneformer's mean over genes) and the fine-tuned
  classifier's P(AD).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from tqdm.auto import tqdm

from rosmap_geneformer import counts
from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)

DONOR = "patient_id"
CELL_TYPE = "cell_type"
LABEL = "ad_status"
# Cell tables' columns the donor stage reads.
CELL_COLUMNS = (DONOR, CELL_TYPE, LABEL, counts.MATRIX_ROW)
BLOCK_SEPARATOR = "|"  # per cell type feature names: "<cell type>|<gene>"


def read_annotated(paths: Mapping[str, str | Path]) -> pd.DataFrame:
    """The annotated cell tables of every split, one frame with a ``split`` column.

    Raises
    ------
    InputError
        When a table lacks a column the donor stage reads, or a donor appears in two splits.
    """
    frames = []
    for split, path in paths.items():
        table = counts.read_cells(path, what=f"annotated cell table ({split})")
        missing = [c for c in CELL_COLUMNS if c not in table.columns]
        if missing:
            msg = f"{path}: lacks column(s) {missing}; rerun annotate (`dvc repro annotate`)."
            raise InputError(msg)
        frame = table[list(CELL_COLUMNS)].copy()
        frame["split"] = split
        frames.append(frame)
    cells = pd.concat(frames)
    cells[DONOR] = cells[DONOR].astype(str)
    splits_per_donor = cells.groupby(DONOR, sort=True)["split"].nunique()
    shared = splits_per_donor.index[splits_per_donor > 1].tolist()
    if shared:
        msg = (
            f"donor(s) {shared[:5]} appear in more than one split of {list(paths)}: the split is "
            "by donor; rerun split and the stages after it (`dvc repro`)."
        )
        raise InputError(msg)
    return cells


def donor_table(cells: pd.DataFrame, *, positive_class: str) -> pd.DataFrame:
    """One row per donor (sorted by id): ``split``, ``ad_status``, ``label`` (1 = positive),
    ``n_cells``.

    Raises
    ------
    InputError
        When a donor's cells carry two labels, or the positive class is absent.
    """
    grouped = cells.groupby(DONOR, sort=True)
    n_labels = grouped[LABEL].nunique()
    mixed = n_labels.index[n_labels > 1].tolist()
    if mixed:
        msg = (
            f"donor(s) {mixed[:5]} have cells with different {LABEL} values; AD status is a "
            "donor property: check the annotate stage's labels."
        )
        raise InputError(msg)
    donors = pd.DataFrame(
        {
            "split": grouped["split"].first(),
            LABEL: grouped[LABEL].first().astype(str),
            "n_cells": grouped.size().astype(np.int64),
        }
    )
    present = sorted(donors[LABEL].unique())
    if positive_class not in present:
        msg = (
            f"tasks.<task>.positive_class={positive_class!r} is not an {LABEL} of any donor; "
            f"present: {present}. Fix positive_class in params.yaml."
        )
        raise InputError(msg)
    donors["label"] = (donors[LABEL] == positive_class).astype(np.int64)
    donors.index.name = DONOR
    return donors


@dataclass
class Pseudobulk:
    """Summed raw counts per donor x cell type.

    Attributes
    ----------
    sums
        Groups x genes, float64 (exact for integer counts below 2**53).
    groups
        One row per group: ``patient_id``, ``cell_type``, ``n_cells``.
    genes
        Gene ids (the matrix's ``var_names``).
    """

    sums: np.ndarray
    groups: pd.DataFrame
    genes: pd.Index

    def per_donor(self, donors: Sequence[str]) -> np.ndarray:
        """Donors x genes: the sums over every cell type, rows in ``donors`` order."""
        codes = pd.Categorical(self.groups[DONOR], categories=list(donors)).codes
        kept = np.flatnonzero(codes >= 0)
        indicator = sparse.csr_matrix(
            (np.ones(kept.size), (codes[kept], kept)), shape=(len(donors), len(codes))
        )
        return np.asarray(indicator @ self.sums)


def pseudobulk(cells: pd.DataFrame, matrix: str | Path, *, chunk_size: int = 10_000) -> Pseudobulk:
    """Sum the raw counts of ``cells`` per donor x cell type, streaming the matrix.

    Parameters
    ----------
    cells
        Cell table with ``patient_id``, ``cell_type`` and ``matrix_row``.
    matrix
        The count matrix the rows point into (``paths.ensembl``).
    chunk_size
        Cells read at a time.
    """
    keys = cells[DONOR].astype(str) + "\t" + cells[CELL_TYPE].astype(str)
    codes, uniques = pd.factorize(keys, sort=True)
    groups = pd.DataFrame(
        [key.split("\t") for key in uniques], columns=[DONOR, CELL_TYPE], dtype=object
    )
    groups["n_cells"] = np.bincount(codes, minlength=len(uniques)).astype(np.int64)
    # Reading in matrix order keeps the file reads sequential.
    order = np.argsort(cells[counts.MATRIX_ROW].to_numpy(), kind="stable")
    reader = counts.SelectedRows(matrix, cells[counts.MATRIX_ROW].to_numpy()[order])
    genes = pd.Index(counts.read_var(matrix).index.astype(str))
    sums = np.zeros((len(uniques), reader.n_vars), dtype=np.float64)
    try:
        for start, end in tqdm(
            list(reader.chunks(chunk_size)), desc="pseudobulk", unit="chunk", disable=None
        ):
            block = reader.read(start, end)
            counts.check_count_values(
                block.data if sparse.issparse(block) else np.asarray(block), source=matrix
            )
            group_of = codes[order[start:end]]
            indicator = sparse.csr_matrix(
                (np.ones(end - start), (group_of, np.arange(end - start))),
                shape=(len(uniques), end - start),
            )
            sums += np.asarray((indicator @ sparse.csr_matrix(block)).todense())
    finally:
        reader.close()
    logger.info(
        "pseudobulk: %d cells summed into %d donor x cell type groups x %d genes",
        len(cells),
        len(groups),
        len(genes),
    )
    return Pseudobulk(sums=sums, groups=groups, genes=genes)


def log_cpm(sums: np.ndarray) -> np.ndarray:
    """``log1p`` of counts per million of each row (a row of zeros stays zeros)."""
    totals = sums.sum(axis=1, keepdims=True)
    return np.log1p(np.divide(sums * 1e6, totals, out=np.zeros_like(sums), where=totals > 0))


def expressed_genes(pb: Pseudobulk, donors: Sequence[str], *, min_cpm: float) -> np.ndarray:
    """Genes whose mean CPM over ``donors``' pseudobulks is at least ``min_cpm`` (label-free)."""
    per_donor = pb.per_donor(donors)
    totals = per_donor.sum(axis=1, keepdims=True)
    cpm = np.divide(per_donor * 1e6, totals, out=np.zeros_like(per_donor), where=totals > 0)
    return np.flatnonzero(cpm.mean(axis=0) >= min_cpm)


def pseudobulk_features(
    pb: Pseudobulk,
    donors: Sequence[str],
    *,
    genes: np.ndarray,
    cell_types: Sequence[str] | None = None,
    min_cells: int = 1,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Donors x features of ``log1p`` CPM: per donor, or per donor x cell type side by side.

    Parameters
    ----------
    pb
        From :func:`pseudobulk`.
    donors
        Row order.
    genes
        Column positions of the genes kept (:func:`expressed_genes`).
    cell_types
        ``None``: one pseudobulk per donor (all its cells). Otherwise one block of genes per cell
        type, named ``<cell type>|<gene>`` (:data:`BLOCK_SEPARATOR`); a block is ``NaN`` for a donor with fewer than
        ``min_cells`` cells of that type.
    min_cells
        See ``cell_types``.

    Returns
    -------
    The features and a report: how many donor x cell type pseudobulks were too small.
    """
    gene_ids = pb.genes[genes]
    if cell_types is None:
        values = log_cpm(pb.per_donor(donors))[:, genes]
        return pd.DataFrame(values, index=pd.Index(donors, name=DONOR), columns=gene_ids), {
            "features": len(gene_ids)
        }
    blocks, report = [], {"features": 0, "missing": {}}
    lookup = {
        (d, t): i
        for i, (d, t) in enumerate(zip(pb.groups[DONOR], pb.groups[CELL_TYPE], strict=True))
    }
    for cell_type in cell_types:
        block = np.full((len(donors), len(genes)), np.nan)
        too_small = 0
        for row, donor in enumerate(donors):
            group = lookup.get((donor, cell_type))
            if group is None or pb.groups.at[group, "n_cells"] < min_cells:
                too_small += 1
                continue
            block[row] = log_cpm(pb.sums[group : group + 1])[0, genes]
        report["missing"][cell_type] = too_small
        blocks.append(
            pd.DataFrame(
                block,
                index=pd.Index(donors, name=DONOR),
                columns=[f"{cell_type}{BLOCK_SEPARATOR}{g}" for g in gene_ids],
            )
        )
    features = pd.concat(blocks, axis=1)
    # A cell type no training donor has enough cells of says nothing: drop its block.
    empty = features.columns[features.isna().all(axis=0)]
    features = features.drop(columns=empty)
    report["features"] = features.shape[1]
    if any(report["missing"].values()):
        logger.info(
            "pseudobulk per cell type: donor x cell type pseudobulks of fewer than %d cells, "
            "imputed in each fold: %s",
            min_cells,
            report["missing"],
        )
    return features, report


def proportions(cells: pd.DataFrame, donors: Sequence[str]) -> pd.DataFrame:
    """Donors x cell types: each donor's share of each cell type (rows sum to 1)."""
    table = pd.crosstab(cells[DONOR].astype(str), cells[CELL_TYPE].astype(str))
    table = table.reindex(index=list(donors), fill_value=0).sort_index(axis=1)
    shares = table.div(table.sum(axis=1).replace(0, np.nan), axis=0).fillna(0.0)
    shares.index.name = DONOR
    return shares.astype(np.float64)
