"""Which cells and genes Geneformer reads from an AnnData's tables, checked.

Geneformer's input contract (``geneformer-spec.md`` section 2.3): the genes are the columns of
``var["ensembl_id"]``; the cells are those with ``obs["filter_pass"] == 1`` (all cells without
that column), each normalised by ``obs["n_counts"]``, its total raw count over all genes. The
tokenizer and the median dictionary builder read the tables through these helpers, so both
select and refuse the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rosmap_geneformer.errors import InputError


def filter_pass_mask(obs: pd.DataFrame) -> np.ndarray:
    """Geneformer keeps a cell iff ``filter_pass == 1`` (``True`` counts as 1); all without it."""
    if "filter_pass" not in obs.columns:
        return np.ones(len(obs), dtype=bool)
    return np.fromiter((v == 1 for v in obs["filter_pass"]), dtype=bool, count=len(obs))


def checked_n_counts(obs: pd.DataFrame, passing: np.ndarray, *, source: str | Path) -> np.ndarray:
    """``obs["n_counts"]`` as a numpy array in its own dtype, refusing bad values of kept cells."""
    if "n_counts" not in obs.columns:
        msg = (
            f"{source}: obs lacks column 'n_counts' (Geneformer's input contract: each cell's "
            "total raw count over all genes). Compute it from the raw counts before any gene is "
            "dropped (the convert_genes stage does)."
        )
        raise InputError(msg)
    column = obs["n_counts"]
    if not isinstance(column.dtype, np.dtype) or column.dtype.kind not in "iuf":
        msg = (
            f"{source}: obs['n_counts'] has dtype {column.dtype}; it must be a plain numeric "
            "column (float32 or integer) without missing values."
        )
        raise InputError(msg)
    n_counts = column.to_numpy()
    bad = ~(n_counts > 0) & passing
    if bad.any():
        examples = list(obs.index[bad][:5])
        msg = (
            f"{source}: obs['n_counts'] is zero, negative or missing for {int(bad.sum())} cell(s) "
            f"(e.g. {examples}). n_counts must be each cell's total raw count; recompute it, or "
            "remove these cells (or set obs['filter_pass'] to 0 for them)."
        )
        raise InputError(msg)
    return n_counts


def ensembl_ids(var: pd.DataFrame, *, source: str | Path) -> pd.Series:
    """``var["ensembl_id"]`` as an object Series with a positional index."""
    if "ensembl_id" not in var.columns:
        msg = (
            f"{source}: var lacks column 'ensembl_id' (Geneformer's input contract); it has "
            f"{list(var.columns)}. Run convert_genes, or copy the Ensembl ids into "
            "var['ensembl_id']."
        )
        raise InputError(msg)
    return var["ensembl_id"].astype(object).reset_index(drop=True)
