"""Cell quality control: per-cell metrics, threshold filters and Scrublet doublets, per library.

ROSMAP's released processing filtered cells on mitochondrial fraction and counts and ran Scrublet
per library (expected doublet rate 0.045, 20 principal components), removing predicted doublets.
:func:`run_qc` does the same, one library at a time, so that memory follows the largest library
rather than the whole split:

1. the split's cell table says which rows of the one count matrix are its cells; each library
   (the ``batch`` column) is read alone, in sorted library order, on ``workers`` processes;
2. per cell: ``n_genes`` (genes with a count > 0), ``total_counts`` (over the genes in the matrix)
   and ``pct_counts_mt`` (genes whose ``var["gene_symbol"]`` starts with ``MT-``); ``n_counts``
   (the total over all genes before convert_genes dropped any) is kept as it is;
3. cells with ``n_genes < min_genes``, ``total_counts < min_counts`` or
   ``pct_counts_mt > max_pct_mito`` are removed; the report counts each filter's failures
   (a cell can fail several) and the sequential removals;
4. Scrublet (:mod:`rosmap_geneformer.data.doublets`) scores a copy of the remaining raw counts
   of the library; predicted doublets are removed;
5. the output is the split's cell table (libraries sorted, cells in their original order
   within a library) with every cell's metrics and fate; no counts are copied.

The report (a JSON-ready dict) is built here with the result; the plots and the files are
written by :mod:`rosmap_geneformer.data.qc_report`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse
from threadpoolctl import threadpool_limits

from rosmap_geneformer import io
from rosmap_geneformer.counts import MATRIX_ROW, SelectedRows, read_var
from rosmap_geneformer.data.doublets import SCORE_BINS, run_scrublet, scrublet_parts
from rosmap_geneformer.data.qc_settings import QCSettings
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.losses import check_loss
from rosmap_geneformer.parallel import ordered_map
from rosmap_geneformer.params_schema import Losses

logger = logging.getLogger(__name__)

#: Columns this module adds to ``obs``.
QC_COLUMNS = ("n_genes", "total_counts", "pct_counts_mt", "doublet_score", "predicted_doublet")
#: The cell filters, in the order the sequential counts apply them.
FILTERS = ("min_genes", "min_counts", "max_pct_mito")
#: Columns of the QC cell table that record each cell's fate (dropped once QC is applied).
QC_FATE_COLUMNS = (*(f"fail_{name}" for name in FILTERS), "kept")


# --------------------------------------------------------------------------------------------
# Per-cell metrics and filters


def mito_genes(
    var: pd.DataFrame, *, symbol_column: str = "gene_symbol", prefix: str = "MT-"
) -> np.ndarray:
    """Boolean mask of mitochondrial genes: ``var[symbol_column]`` starts with ``prefix``."""
    symbols = var[symbol_column].astype(str)
    return symbols.str.startswith(prefix).to_numpy(dtype=bool)


def compute_qc_metrics(
    x: Any, mito: np.ndarray, *, index: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per-cell ``n_genes``, ``total_counts`` and ``pct_counts_mt`` of a cells x genes count matrix.

    Parameters
    ----------
    x
        Raw counts (sparse or dense).
    mito
        Boolean mask over the genes; all ``False`` gives ``pct_counts_mt = 0``.
    index
        Cell names for the returned frame.

    Returns
    -------
    One row per cell; ``pct_counts_mt`` is 0 for a cell without counts.
    """
    x = sparse.csr_matrix(x)
    n_genes = np.asarray((x > 0).sum(axis=1)).ravel().astype(np.int64)
    total = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    if mito.any():
        mt = np.asarray(x[:, np.flatnonzero(mito)].sum(axis=1, dtype=np.float64)).ravel()
    else:
        mt = np.zeros_like(total)
    pct = np.divide(100.0 * mt, total, out=np.zeros_like(total), where=total > 0)
    return pd.DataFrame(
        {"n_genes": n_genes, "total_counts": total, "pct_counts_mt": pct},
        index=pd.Index(index) if index is not None else None,
    )


def cell_filter_failures(metrics: pd.DataFrame, settings: QCSettings) -> pd.DataFrame:
    """Which cells fail which filter (a cell may fail several), one boolean column per filter."""
    return pd.DataFrame(
        {
            "min_genes": metrics["n_genes"].to_numpy() < settings.min_genes,
            "min_counts": metrics["total_counts"].to_numpy() < settings.min_counts,
            "max_pct_mito": metrics["pct_counts_mt"].to_numpy() > settings.max_pct_mito,
        },
        index=metrics.index,
    )


def sequential_removals(failures: pd.DataFrame) -> dict[str, int]:
    """Cells each filter removes when applied in :data:`FILTERS` order after the previous ones."""
    remaining = np.ones(len(failures), dtype=bool)
    removed: dict[str, int] = {}
    for name in FILTERS:
        hit = remaining & failures[name].to_numpy()
        removed[name] = int(hit.sum())
        remaining &= ~hit
    return removed


# --------------------------------------------------------------------------------------------
# One library


@dataclass(kw_only=True)
class LibraryQC:
    """QC of one library: a per-cell table of all its cells and a summary row."""

    cells: pd.DataFrame
    record: dict[str, Any]
    sim_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_BINS) - 1, np.int64))


def qc_library(
    adata: ad.AnnData, *, library: str, mito: np.ndarray, settings: QCSettings
) -> LibraryQC:
    """Metrics, filters and Scrublet for the cells of one library (in memory).

    Parameters
    ----------
    adata
        The library's cells with raw counts in ``X``; not modified.
    library
        The library id.
    mito
        Boolean mask of mitochondrial genes.
    settings
        Thresholds and Scrublet options.

    Returns
    -------
    A per-cell table of every input cell (metrics, filter failures, doublet calls, ``kept``) and
    the library's report row.
    """
    metrics = compute_qc_metrics(adata.X, mito, index=adata.obs_names)
    failures = cell_filter_failures(metrics, settings)
    passed = ~failures.any(axis=1).to_numpy()
    n_passed = int(passed.sum())

    scores = np.full(adata.n_obs, np.nan)
    doublet = np.zeros(adata.n_obs, dtype=bool)
    sim_hist = np.zeros(len(SCORE_BINS) - 1, dtype=np.int64)
    threshold: float | None = None
    rule = "disabled"
    n_runs = 0
    if settings.scrublet:
        min_cells = max(settings.min_cells_per_library, settings.n_prin_comps + 1)
        if n_passed < min_cells:
            rule = "skipped_small_library"
            logger.info(
                "library %s: %d cells after filters < %d, Scrublet skipped",
                library,
                n_passed,
                min_cells,
            )
        else:
            parts = scrublet_parts(
                np.flatnonzero(passed),
                settings.max_cells_per_run,
                seed=settings.seed,
                library=library,
            )
            thresholds, rules = [], []
            n_runs = len(parts)
            for part in parts:
                result = run_scrublet(
                    adata.X[part],
                    expected_doublet_rate=settings.expected_doublet_rate,
                    n_prin_comps=settings.n_prin_comps,
                    random_state=settings.seed,
                    threshold=settings.threshold,
                    max_doublet_fraction=settings.doublet_fraction_cap,
                    library=library,
                )
                scores[part] = result.scores
                doublet[part] = result.predicted
                thresholds.append(result.threshold)
                rules.append(result.rule)
                sim_hist += np.histogram(np.clip(result.sim_scores, 0.0, 1.0), bins=SCORE_BINS)[0]
            # With several runs: the highest threshold, and each run's rule.
            threshold, rule = max(thresholds), ";".join(rules)

    kept = passed & ~doublet
    cells = metrics.copy()
    cells.insert(0, "library", library)
    for name in FILTERS:
        cells[f"fail_{name}"] = failures[name].to_numpy()
    cells["doublet_score"] = scores
    cells["predicted_doublet"] = doublet
    cells["kept"] = kept

    record: dict[str, Any] = {
        "library": library,
        "cells_in": int(adata.n_obs),
        "scrublet_runs": n_runs,
        "fail_min_genes": int(failures["min_genes"].sum()),
        "fail_min_counts": int(failures["min_counts"].sum()),
        "fail_max_pct_mito": int(failures["max_pct_mito"].sum()),
        "removed_by_filters": int(adata.n_obs - n_passed),
        "scrublet": rule,
        "doublet_threshold": threshold,
        "doublets_predicted": int(doublet.sum()),
        "cells_out": int(kept.sum()),
    }
    return LibraryQC(cells=cells, record=record, sim_hist=sim_hist)


# --------------------------------------------------------------------------------------------
# A whole split


@dataclass(kw_only=True)
class QCResult:
    """What :func:`run_qc` found: the report, the per-cell table and the libraries' rows.

    ``cells`` is the split's cell table in library order (sorted library ids, cells in their
    input order within a library) with :data:`QC_COLUMNS`, ``fail_<filter>`` and ``kept``
    added: every input cell and its fate.
    """

    report: dict[str, Any]
    cells: pd.DataFrame
    libraries: pd.DataFrame
    sim_hist: np.ndarray
    settings: QCSettings


def _library_ids(column: pd.Series, *, source: Path, batch_key: str) -> list[str]:
    if column.isna().any():
        msg = (
            f"{source}: {int(column.isna().sum())} cell(s) have no library id in obs[{batch_key!r}]. "
            "Every cell needs its library (data.columns.batch) for per-library QC; fill the column."
        )
        raise InputError(msg)
    return sorted(pd.unique(column.astype(str)))


def _median(values: pd.Series) -> float | None:
    values = values.dropna()
    return float(values.median()) if len(values) else None


@dataclass(frozen=True)
class _LibraryTask:
    """One library's work, picklable for worker processes."""

    matrix: Path
    library: str
    positions: np.ndarray
    names: pd.Index
    mito: np.ndarray
    settings: QCSettings


def _qc_task(task: _LibraryTask) -> LibraryQC:
    # One BLAS thread: Scrublet's PCA gives other scores with other thread counts (up to 0.02
    # apart on the demo), and the result must not depend on compute.workers.
    with threadpool_limits(limits=1):
        return _qc_library_rows(task)


def _qc_library_rows(task: _LibraryTask) -> LibraryQC:
    reader = SelectedRows(task.matrix, task.positions)
    try:
        x = reader.read(0, reader.n_obs)
    finally:
        reader.close()
    io.check_raw_values(x, source=task.matrix)
    library = ad.AnnData(X=x, obs=pd.DataFrame(index=task.names))
    return qc_library(library, library=task.library, mito=task.mito, settings=task.settings)


def run_qc(
    cells: pd.DataFrame,
    matrix: str | Path,
    *,
    batch_key: str,
    settings: QCSettings,
    split: str = "",
    source: str | Path | None = None,
    workers: int = 1,
    scheduler: str | None = None,
    losses: Losses | None = None,
) -> QCResult:
    """Run QC on the cells of one split, one library at a time, reading their rows of ``matrix``.

    Parameters
    ----------
    cells
        The split's cell table (index: cell names; ``batch_key`` and ``matrix_row``).
    matrix
        The count matrix (raw counts, ``var["gene_symbol"]``).
    batch_key
        The column with the library id (``data.columns.batch``).
    settings
        Thresholds and Scrublet options.
    split
        Split name, for messages.
    source
        The cell table's file, for messages.
    workers, scheduler
        Libraries run on ``workers`` processes, or on the Dask cluster at ``scheduler``
        (:func:`rosmap_geneformer.parallel.ordered_map`); the result does not depend on either.
    losses
        ``losses.qc_removed_cells``: the share of cells QC may remove before a WARNING and before
        a refusal (the schema's default when ``None``).

    Returns
    -------
    The report, the per-cell table and what the plots need.

    Raises
    ------
    ValueError
        When the table lacks ``batch_key``, ``var`` lacks the symbol column, ``X`` is not raw
        counts or no cell passes.
    """
    matrix = Path(matrix)
    source = Path(source) if source is not None else matrix
    if batch_key not in cells.columns:
        msg = (
            f"{source}: the cell table lacks the library column {batch_key!r} (params.yaml: "
            f"data.columns.batch); it has {list(cells.columns)}. Set data.columns.batch "
            "to the obs column holding each cell's library id."
        )
        raise InputError(msg)
    var = read_var(matrix)
    if settings.symbol_column not in var.columns:
        msg = (
            f"{matrix}: var lacks column {settings.symbol_column!r} needed to find the "
            f"mitochondrial genes; var has {list(var.columns)}. Run the convert_genes "
            "stage, which writes var['gene_symbol']."
        )
        raise InputError(msg)
    names = pd.Index(cells.index)
    io.check_unique_obs_names(names, source=source)
    mito = mito_genes(var, symbol_column=settings.symbol_column, prefix=settings.mito_prefix)
    mito_warning = None
    if not mito.any():
        mito_warning = (
            f"no genes with a symbol starting with {settings.mito_prefix!r} in "
            f"var[{settings.symbol_column!r}]; pct_counts_mt is 0 for every cell and the "
            "max_pct_mito filter removes nothing"
        )
        logger.warning("%s: %s", matrix, mito_warning)
    libraries = _library_ids(cells[batch_key], source=source, batch_key=batch_key)
    batch_values = cells[batch_key].astype(str).to_numpy()
    rows = cells[MATRIX_ROW].to_numpy(dtype=np.int64)
    members = [np.flatnonzero(batch_values == library) for library in libraries]
    tasks = [
        _LibraryTask(
            matrix=matrix,
            library=library,
            positions=rows[member],
            names=names[member],
            mito=mito,
            settings=settings,
        )
        for library, member in zip(libraries, members, strict=True)
    ]
    tables: list[pd.DataFrame] = []
    records: list[dict[str, Any]] = []
    sim_hist = np.zeros(len(SCORE_BINS) - 1, dtype=np.int64)
    results = ordered_map(
        _qc_task,
        tasks,
        workers=workers,
        scheduler=scheduler,
        desc=f"qc {split}".strip(),
        unit="library",
    )
    for lib in results:
        tables.append(lib.cells.drop(columns="library"))
        records.append(lib.record)
        sim_hist += lib.sim_hist
    order = np.concatenate(members) if members else np.zeros(0, dtype=np.int64)
    fate = pd.concat(tables) if tables else pd.DataFrame()
    table = cells.iloc[order].copy()
    for column in fate.columns:
        table[column] = fate[column].to_numpy()
    n_out = int(table["kept"].sum()) if len(table) else 0
    if n_out == 0:
        msg = (
            f"{source}: QC of split {split or source.stem!r} kept no cell of "
            f"{len(cells)}: min_genes={settings.min_genes}, min_counts="
            f"{settings.min_counts}, max_pct_mito={settings.max_pct_mito} "
            f"(params.yaml: qc). Check the thresholds against the report's medians or "
            "the input's counts."
        )
        raise InputError(msg)
    removed = check_loss(
        len(table) - n_out,
        len(table),
        what="cells removed by the QC filters or as doublets",
        key="qc_removed_cells",
        limit=(losses or Losses()).qc_removed_cells,
        source=f"qc {split}".strip(),
        hint="compare the thresholds under qc with the medians in the QC report",
    )

    libraries_table = pd.DataFrame.from_records(records)
    report = _report(
        table,
        libraries_table,
        records,
        settings=settings,
        split=split,
        n_mito=int(mito.sum()),
        mito_warning=mito_warning,
    )
    logger.info(
        "qc %s: %d -> %d cells (%d failed filters, %d doublets) in %d libraries",
        split,
        report["cells_in"],
        report["cells_out"],
        report["removed_by_filters"],
        report["doublets_predicted"],
        report["libraries"],
    )
    report["losses"] = {"qc_removed_cells": removed}
    return QCResult(
        report=report, cells=table, libraries=libraries_table, sim_hist=sim_hist, settings=settings
    )


def _report(
    cells: pd.DataFrame,
    libraries: pd.DataFrame,
    records: list[dict[str, Any]],
    *,
    settings: QCSettings,
    split: str,
    n_mito: int,
    mito_warning: str | None,
) -> dict[str, Any]:
    kept = cells["kept"].to_numpy()
    failures = pd.DataFrame({n: cells[f"fail_{n}"].to_numpy() for n in FILTERS})
    after_filters = libraries["cells_in"] - libraries["removed_by_filters"]
    skipped = (libraries["scrublet"] == "skipped_small_library").to_numpy()
    scored = libraries["doublet_threshold"].notna().to_numpy()
    scrubbed_cells = int(after_filters[scored].sum())
    n_doublets = int(cells["predicted_doublet"].sum())
    report: dict[str, Any] = {
        "split": split,
        "cells_in": len(cells),
        "cells_out": int(kept.sum()),
        "fraction_kept": round(float(kept.mean()), 6) if len(cells) else 0.0,
        "fail_min_genes": int(failures["min_genes"].sum()),
        "fail_min_counts": int(failures["min_counts"].sum()),
        "fail_max_pct_mito": int(failures["max_pct_mito"].sum()),
        "removed_by_filters": int(failures.any(axis=1).sum()),
        "removed_sequential": sequential_removals(failures),
        "cells_scrubbed": scrubbed_cells,
        "doublets_predicted": n_doublets,
        "doublet_rate": round(n_doublets / scrubbed_cells, 6) if scrubbed_cells else 0.0,
        "libraries": len(libraries),
        "libraries_scrubbed": int(scored.sum()),
        "libraries_scrublet_skipped": int(skipped.sum()),
        "cells_scrublet_skipped": int(after_filters[skipped].sum()),
        "libraries_threshold_capped": int(
            libraries["scrublet"].str.contains("+capped", regex=False).sum()
        ),
        "libraries_threshold_otsu": int(libraries["scrublet"].str.contains("otsu").sum()),
        "libraries_scrublet_split": int((libraries["scrublet_runs"] > 1).sum()),
        "libraries_empty": int((libraries["cells_out"] == 0).sum()),
        "mito_genes": n_mito,
        "mito_warning": mito_warning,
    }
    for metric in ("n_genes", "total_counts", "pct_counts_mt"):
        report[f"median_{metric}_before"] = _median(cells[metric])
        report[f"median_{metric}_after"] = _median(cells.loc[kept, metric])
    report["settings"] = settings.thresholds()
    # From the records, not the frame: None thresholds must stay null, not NaN.
    report["per_library"] = records
    return report
