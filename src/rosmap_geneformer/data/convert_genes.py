"""Conversion of a raw-count matrix from gene symbols to Ensembl ids, with the gene map.

:func:`convert_genes` (in memory) and :func:`convert_genes_file` (streamed, file to file) rename
the genes of a raw-count AnnData from symbols to Ensembl ids with the map of
:mod:`rosmap_geneformer.data.gene_map`, sum the counts of symbols that land on the same id, and
report every gene they lose (:func:`write_conversion` writes ``mapping.json`` and the lost genes).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse
from tqdm.auto import tqdm

from rosmap_geneformer import io
from rosmap_geneformer.data.gene_map import ENSEMBL_ID, MATCH_KINDS, map_symbols
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.losses import check_loss
from rosmap_geneformer.params_schema import Losses

logger = logging.getLogger(__name__)

LOST_COLUMNS = ("symbol", "reason", "candidates", "total_counts")


@dataclass
class GeneConversion:
    """Result of :func:`convert_genes`.

    Attributes
    ----------
    adata
        Cells x Ensembl ids, raw counts (float32 CSR), ``var["ensembl_id"]``,
        ``var["gene_symbol"]``, ``obs["n_counts"]``; ``None`` when the result went to a file.
    report
        The numbers for ``mapping.json``.
    lost
        One row per input gene that was dropped: ``symbol``, ``reason``, ``candidates``,
        ``total_counts``.
    mapping
        One row per input gene: :func:`rosmap_geneformer.data.gene_map.map_symbols` plus
        ``total_counts``.
    """

    adata: ad.AnnData | None
    report: dict[str, Any]
    lost: pd.DataFrame
    mapping: pd.DataFrame


def _as_csr_float32(matrix: Any) -> sparse.csr_matrix:
    csr = sparse.csr_matrix(matrix)
    return csr.astype(np.float32) if csr.dtype != np.float32 else csr


def _n_counts(totals: np.ndarray) -> np.ndarray:
    # float32 holds integers exactly up to 2**24 UMIs per cell, far above any real nucleus.
    if totals.size and totals.max() >= 2**24:
        logger.warning("n_counts above 2**24: kept as float64 so that it stays exact")
        return totals
    return totals.astype(np.float32)


def _joined_symbols(kept: pd.DataFrame) -> pd.Series:
    """Per Ensembl id, its symbols joined by ``;``: unsuffixed first, then var order, no repeats."""
    ordered = kept.sort_values(["ensembl_id", "suffix_stripped", "position"], kind="stable")
    unique = ordered.drop_duplicates(["ensembl_id", "symbol"])
    # One vectorised pass: a per-group Python apply costs ~0.5 ms a gene (17 s for 33,538).
    return unique.groupby("ensembl_id", sort=True)["symbol"].agg(";".join)


@dataclass
class _Plan:
    """What the conversion does to every row: the gene-by-id indicator and the output var."""

    mapping: pd.DataFrame
    kept: pd.DataFrame
    indicator: sparse.csr_matrix
    var: pd.DataFrame


def _plan(
    var_names: pd.Index, gene_map: pd.DataFrame, *, source: str | Path, gene_map_source: str | Path
) -> _Plan:
    mapping = map_symbols(var_names, gene_map)
    mapping["position"] = np.arange(len(mapping))
    kept = mapping[mapping["ensembl_id"] != ""]
    if kept.empty:
        examples = list(var_names[:5])
        release = ", ".join(sorted(set(gene_map["release"].astype(str)))) or "?"
        msg = (
            f"{source}: none of the {len(var_names)} var_names (e.g. {examples}) maps to an Ensembl "
            f"id with the gene map {gene_map_source} (human, Ensembl release {release}). Check "
            "that the data are human and that var_names hold gene symbols (if the symbols sit in "
            "a var column, make it the index) or human Ensembl ids (ENSG...)."
        )
        pattern = describe_names(var_names)
        if pattern.startswith(f"{len(var_names):,} of"):
            msg = msg.replace(" Check that", f" All {pattern}. Check that", 1)
        raise InputError(msg)
    ids = np.array(sorted(set(kept["ensembl_id"])), dtype=object)
    column = pd.Series(np.arange(len(ids)), index=ids)
    indicator = sparse.csr_matrix(
        (
            np.ones(len(kept), dtype=np.float32),
            (kept["position"].to_numpy(), column[kept["ensembl_id"]].to_numpy()),
        ),
        shape=(len(var_names), len(ids)),
    )
    symbols = _joined_symbols(kept)
    var = pd.DataFrame(
        {"ensembl_id": ids.astype(str), "gene_symbol": symbols.loc[ids].to_numpy().astype(str)},
        index=pd.Index(ids.astype(str)),
    )
    return _Plan(mapping=mapping, kept=kept, indicator=indicator, var=var)


def _converted_chunks(
    rows: Any, plan: _Plan, *, chunk_size: int, source: str | Path, totals: dict[str, Any]
) -> Iterator[sparse.csr_matrix]:
    """Each row chunk with its genes summed into Ensembl ids; fills ``totals`` on the way."""
    if chunk_size < 1:
        msg = f"chunk_size={chunk_size}: must be at least 1 (params.yaml: compute.chunk_size)."
        raise InputError(msg)
    gene_totals = np.zeros(rows.n_vars, dtype=np.float64)
    cell_totals = np.zeros(rows.n_obs, dtype=np.float64)
    starts = range(0, rows.n_obs, chunk_size)
    for start in tqdm(starts, desc="convert_genes", unit="chunk", disable=len(starts) < 2):
        end = min(start + chunk_size, rows.n_obs)
        x = _as_csr_float32(rows.read(start, end))
        io.check_raw_values(x, source=source)
        cell_totals[start:end] = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
        gene_totals += np.asarray(x.sum(axis=0, dtype=np.float64)).ravel()
        summed = sparse.csr_matrix(x @ plan.indicator)
        summed.eliminate_zeros()
        summed.sort_indices()
        yield summed
    totals["genes"], totals["cells"] = gene_totals, cell_totals


def convert_genes(
    adata: ad.AnnData,
    gene_map: pd.DataFrame,
    *,
    batch_key: str = "batch",
    source: str | Path = "counts",
    gene_map_source: str | Path = "gene map",
    losses: Losses | None = None,
) -> GeneConversion:
    """Rename genes from symbols to Ensembl ids, summing symbols that share an id (in memory).

    Input checks: ``X`` holds raw integer counts, cell names are unique and ``obs`` has
    ``batch_key``. ``obs["n_counts"]`` is set to each cell's total count over *all* input genes,
    before any gene is dropped (Geneformer normalises by it).

    Each var name is looked up with :func:`rosmap_geneformer.data.gene_map.map_symbols`. Genes
    that map to the same Ensembl id (``TBCE`` and ``TBCE-1``, or a symbol and its former name)
    have their counts **summed** into one column, as Geneformer's tokenizer does when it collapses
    duplicate ids; the sum is a sparse product ``X @ S`` with an indicator matrix ``S`` (genes x
    ids). Genes that do not map are dropped and listed in :attr:`GeneConversion.lost` with their
    total counts.
    :func:`convert_genes_file` does the same, streamed from file to file.

    Parameters
    ----------
    adata
        Raw counts, cells x genes, var names = gene symbols (or Ensembl ids).
    gene_map
        From :func:`rosmap_geneformer.data.gene_map.read_gene_map` /
        :func:`rosmap_geneformer.data.gene_map.build_gene_map`.
    batch_key
        The ``obs`` column with the library id (``data.columns.batch``).
    source
        The counts file, for messages.
    gene_map_source
        The gene map file, for messages.
    losses
        ``losses.unmapped_genes`` and ``losses.unmapped_counts``: the shares of genes and of
        counts that may fail to map before a WARNING and before a refusal (the schema's defaults
        when ``None``); both are counted in the report under ``losses``.

    Returns
    -------
    The converted AnnData (var names = sorted Ensembl ids, ``var["ensembl_id"]``,
    ``var["gene_symbol"]``: the symbols merged into the id joined by ``;``, unsuffixed symbols
    first, then var order), the report, the lost genes and the per-gene mapping.

    Raises
    ------
    ValueError
        On non-count ``X``, duplicate cell names, a missing batch column, or when too few genes
        or counts map.
    """
    from rosmap_geneformer.counts import AnnDataRows

    io.check_unique_obs_names(adata, source=source)
    io.check_obs_columns(adata, [batch_key], source=source)
    losses = losses or Losses()
    plan = _plan(adata.var_names, gene_map, source=source, gene_map_source=gene_map_source)
    checked = {"unmapped_genes": _check_genes(plan, losses=losses, source=source)}
    totals: dict[str, Any] = {}
    rows = AnnDataRows(adata, source=str(source))
    pieces = list(
        _converted_chunks(rows, plan, chunk_size=max(adata.n_obs, 1), source=source, totals=totals)
    )
    checked["unmapped_counts"] = _check_counts(plan, totals["genes"], losses=losses, source=source)
    summed = (
        sparse.vstack(pieces, format="csr")
        if pieces
        else sparse.csr_matrix((0, len(plan.var)), dtype=np.float32)
    )
    obs = _converted_obs(adata.obs, totals["cells"], source=source, n_genes=adata.n_vars)
    out = ad.AnnData(X=summed, obs=obs, var=plan.var, uns=dict(adata.uns))
    for key, value in adata.obsm.items():
        out.obsm[key] = value
    result = _conversion_result(
        plan, totals["genes"], n_cells=adata.n_obs, gene_map=gene_map, source=source
    )
    result.report["losses"] = checked
    result.adata = out
    return result


def convert_genes_file(
    counts_path: str | Path,
    output_path: str | Path,
    gene_map: pd.DataFrame,
    *,
    batch_key: str = "batch",
    chunk_size: int = 10_000,
    gene_map_source: str | Path = "gene map",
    losses: Losses | None = None,
) -> GeneConversion:
    """:func:`convert_genes` streamed: read ``chunk_size`` rows at a time, append them converted.

    Memory is set by ``chunk_size`` (and the per-cell totals), never by the number of cells;
    the output is the same bytes whatever ``chunk_size``. ``GeneConversion.adata`` is ``None``:
    the result is the file at ``output_path`` (written atomically, and not at all when too many
    genes or counts fail to map: the genes are checked before any row is read).
    """
    from rosmap_geneformer.counts import H5adRows, read_cell_table, streamed_h5ad

    counts_path = Path(counts_path)
    rows = H5adRows(counts_path)
    try:
        obs, var = read_cell_table(counts_path)
    except (OSError, KeyError) as err:
        msg = f"{counts_path}: not a readable h5ad (obs/var could not be read: {err}). Check the file (a truncated copy, or a Git LFS pointer?)."
        raise InputError(msg) from err
    io.check_unique_obs_names(pd.Index(obs.index), source=counts_path)
    if batch_key not in obs.columns:
        msg = (
            f"{counts_path}: obs lacks column(s) {[batch_key]}; it has {list(obs.columns)}. "
            "Add the column, or set its name under data.columns in params.yaml."
        )
        raise InputError(msg)
    losses = losses or Losses()
    plan = _plan(pd.Index(var.index), gene_map, source=counts_path, gene_map_source=gene_map_source)
    checked = {"unmapped_genes": _check_genes(plan, losses=losses, source=counts_path)}
    totals: dict[str, Any] = {}
    try:
        with streamed_h5ad(output_path, n_vars=len(plan.var)) as out:
            for chunk in _converted_chunks(
                rows, plan, chunk_size=chunk_size, source=counts_path, totals=totals
            ):
                out.append(chunk)
            checked["unmapped_counts"] = _check_counts(
                plan, totals["genes"], losses=losses, source=counts_path
            )
            out.obs = _converted_obs(obs, totals["cells"], source=counts_path, n_genes=len(var))
            out.var = plan.var
            out.uns = _read_uns(counts_path)
    finally:
        rows.close()
    logger.info("wrote %s (%d cells x %d genes)", output_path, len(obs), len(plan.var))
    result = _conversion_result(
        plan, totals["genes"], n_cells=len(obs), gene_map=gene_map, source=counts_path
    )
    result.report["losses"] = checked
    return result


_GENOME_PREFIX_RE = re.compile(r"^(GRCh\d+|hg\d+|GRCm\d+|mm\d+)[_.-]", re.IGNORECASE)
_MOUSE_CASE_RE = re.compile(r"^[A-Z][a-z][a-z0-9]*$")
_VERSIONED_ID_RE = re.compile(r"^ENS[A-Z]*G\d+\.\d+$")


def describe_names(names: Iterable[str]) -> str:
    """What a set of gene names that failed to map looks like, and what to do about it.

    Recognises mouse-case symbols (``Gapdh``), a genome prefix (``GRCh38_``, ``hg19-``, ``mm10_``),
    Ensembl ids with a version (``ENSG....5``; human ones map) and mouse Ensembl ids
    (``ENSMUSG``). Returns ``""`` when no pattern covers at least a fifth of the names.
    """
    names = [str(n) for n in names]
    if not names:
        return ""
    share = {
        "mouse-case symbols (Gapdh); this map is human: use human data or upper-case orthologs": sum(
            bool(_MOUSE_CASE_RE.match(n)) for n in names
        ),
        "a genome prefix (GRCh38_ ...); strip it from var_names": sum(
            bool(_GENOME_PREFIX_RE.match(n)) for n in names
        ),
        "mouse Ensembl ids (ENSMUSG...); this map is human": sum(
            n.upper().startswith("ENSMUSG") for n in names
        ),
        "Ensembl ids with a version that are not human genes of this release": sum(
            bool(_VERSIONED_ID_RE.match(n)) for n in names
        ),
    }
    kind, count = max(share.items(), key=lambda item: item[1])
    if count < 0.2 * len(names):
        return f"unmapped names look like {names[:3]}"
    return f"{count:,} of the {len(names):,} unmapped names look like {kind} (e.g. {names[:3]})"


def _check_genes(plan: _Plan, *, losses: Losses, source: str | Path) -> dict[str, Any]:
    lost = plan.mapping.loc[plan.mapping["ensembl_id"] == "", "name"]
    return check_loss(
        len(lost),
        len(plan.mapping),
        what="genes that map to no Ensembl id",
        key="unmapped_genes",
        limit=losses.unmapped_genes,
        source=str(source),
        hint=describe_names(lost),
    )


def _check_counts(
    plan: _Plan, gene_totals: np.ndarray, *, losses: Losses, source: str | Path
) -> dict[str, Any]:
    unmapped = (plan.mapping["ensembl_id"] == "").to_numpy()
    lost = plan.mapping.loc[unmapped, "name"]
    return check_loss(
        int(np.rint(gene_totals[unmapped].sum())),
        int(np.rint(gene_totals.sum())),
        what="counts on genes that map to no Ensembl id",
        key="unmapped_counts",
        limit=losses.unmapped_counts,
        source=str(source),
        hint=describe_names(lost),
    )


def _read_uns(path: Path) -> dict[str, Any]:
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as handle:
        return dict(read_elem(handle["uns"])) if "uns" in handle else {}


def _converted_obs(
    obs: pd.DataFrame, cell_totals: np.ndarray, *, source: str | Path, n_genes: int
) -> pd.DataFrame:
    obs = obs.copy()
    if "n_counts" in obs.columns:
        logger.info("%s: obs['n_counts'] replaced by the total over all %d genes", source, n_genes)
    obs["n_counts"] = _n_counts(cell_totals)
    return obs


def _conversion_result(
    plan: _Plan,
    gene_totals: np.ndarray,
    *,
    n_cells: int,
    gene_map: pd.DataFrame,
    source: str | Path,
) -> GeneConversion:
    mapping = plan.mapping
    mapping["total_counts"] = np.rint(gene_totals).astype(np.int64)
    kept = mapping[mapping["ensembl_id"] != ""]
    lost_rows = mapping[mapping["ensembl_id"] == ""]
    lost = pd.DataFrame(
        {
            "symbol": lost_rows["name"].to_numpy(),
            "reason": lost_rows["reason"].to_numpy(),
            "candidates": lost_rows["candidates"].to_numpy(),
            "total_counts": lost_rows["total_counts"].to_numpy(),
        },
        columns=list(LOST_COLUMNS),
    )
    lost = lost.sort_values(
        ["total_counts", "symbol"], ascending=[False, True], kind="stable"
    ).reset_index(drop=True)

    report = _report(
        mapping, kept, lost, n_out=len(plan.var), gene_totals=gene_totals, n_cells=n_cells
    )
    report["gene_map_release"] = ", ".join(sorted(set(gene_map["release"].astype(str))))
    logger.info(
        "%s: %d of %d genes mapped (%.2f%% of counts) -> %d Ensembl ids; %d summed, %d lost",
        source,
        report["genes_mapped"],
        report["genes_total"],
        100 * report["fraction_counts_mapped"],
        report["genes_output"],
        report["genes_summed"],
        report["genes_lost"],
    )
    return GeneConversion(
        adata=None, report=report, lost=lost, mapping=mapping.drop(columns="position")
    )


def _report(
    mapping: pd.DataFrame,
    kept: pd.DataFrame,
    lost: pd.DataFrame,
    *,
    n_out: int,
    gene_totals: np.ndarray,
    n_cells: int,
) -> dict[str, Any]:
    counts_total = int(np.rint(gene_totals.sum()))
    counts_mapped = int(kept["total_counts"].sum())
    kinds = kept["match_kind"].value_counts()
    reasons = lost["reason"].value_counts()
    return {
        "cells": int(n_cells),
        "genes_total": len(mapping),
        "genes_mapped": len(kept),
        "genes_lost": len(lost),
        "genes_lost_not_found": int(reasons.get("not_found", 0)),
        "genes_lost_ambiguous": int(reasons.get("ambiguous", 0)),
        "genes_summed": len(kept) - n_out,
        "genes_suffix_stripped": int(kept["suffix_stripped"].sum()),
        "genes_output": n_out,
        "fraction_genes_mapped": round(len(kept) / max(len(mapping), 1), 6),
        "counts_total": counts_total,
        "counts_mapped": counts_mapped,
        "counts_lost": counts_total - counts_mapped,
        "fraction_counts_mapped": round(counts_mapped / counts_total, 6) if counts_total else 0.0,
        "match_kind": {k: int(kinds.get(k, 0)) for k in (*MATCH_KINDS, ENSEMBL_ID)},
    }


def write_conversion(
    result: GeneConversion,
    *,
    h5ad: str | Path | None,
    report: str | Path,
    lost: str | Path,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``mapping.json`` (with ``extra`` entries), the lost genes and, when the result is in
    memory and ``h5ad`` is given, the converted AnnData."""
    if result.adata is not None and h5ad is not None:
        io.write_h5ad(result.adata, h5ad)
    io.write_json({**result.report, **(extra or {})}, report)
    io.write_tsv(result.lost, lost)
