"""Tokenizing cells into a Geneformer dataset: the public entry points, streamed and parallel.

:func:`tokenize_h5ad`, :func:`tokenize_cells` and :func:`tokenize_anndata` read the input in
chunks of cells, encode each chunk with Geneformer's rank-value encoding
(:mod:`rosmap_geneformer.geneformer.encoding`, token for token identical to Geneformer's
``TranscriptomeTokenizer``, except that exactly tied genes come in ascending token id), in this
process and in worker processes, and write the batches in input order into a ``datasets``
dataset directory (:mod:`rosmap_geneformer.geneformer.dataset_writer`), so memory does not grow
with the number of cells and the output bytes depend neither on the number of processes nor on
the CPU. Each returns a report of the cells, genes and counts covered.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.counts import (
    AnnDataRows,
    H5adRows,
    cell_rows,
    read_cell_table,
    read_var,
)
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.geneformer.dataset_writer import (
    DatasetWriter,
    arrow_schema,
    obs_label_arrays,
    record_batch,
)
from rosmap_geneformer.geneformer.dictionaries import GeneDictionaries
from rosmap_geneformer.geneformer.encoding import ChunkResult, Plan, encode_rows, make_plan
from rosmap_geneformer.io import atomic_output
from rosmap_geneformer.losses import check_loss
from rosmap_geneformer.params_schema import Losses

logger = logging.getLogger(__name__)

DEFAULT_COLUMNS = ("cell_id", "patient_id", "cell_type", "ad_status")


# --------------------------------------------------------------------------------------------
# Encoding chunks, in this process and in worker processes
# --------------------------------------------------------------------------------------------
# Worker processes get the plan and the reader once, through the pool initialiser.
_WORKER: dict[str, Any] = {}


def _init_worker(plan: Plan, rows: H5adRows | AnnDataRows) -> None:
    _keep_freed_memory()
    _WORKER["plan"], _WORKER["rows"] = plan, rows


def _keep_freed_memory() -> None:
    """Ask glibc to reuse freed memory instead of returning it to the OS after every chunk.

    Each chunk allocates arrays of ~10 MB; by default glibc unmaps them on free and page-faults
    them in again for the next chunk, which costs about a tenth of the run time. Harmless where
    glibc is absent.
    """
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: its maximum, 32 MiB
        libc.mallopt(-1, 256 * 2**20)  # M_TRIM_THRESHOLD


def _encode_task(bounds: tuple[int, int]) -> ChunkResult:
    return encode_rows(_WORKER["plan"], _WORKER["rows"], *bounds)


def _encoded_chunks(
    plan: Plan, rows: H5adRows | AnnDataRows, chunks: Sequence[tuple[int, int]], nproc: int
) -> Iterator[ChunkResult]:
    """Encoded chunks in input order, from this process and ``nproc - 1`` worker processes.

    This process encodes every ``nproc``-th chunk itself (it would otherwise sit idle between
    writes) and the workers the others, a bounded number of chunks ahead, so memory stays flat.
    """
    _keep_freed_memory()
    if nproc <= 1 or len(chunks) <= 1 or isinstance(rows, AnnDataRows):
        for start, end in chunks:
            yield encode_rows(plan, rows, start, end)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.get_context(method)
    # Fork before this process opens the file: each worker opens its own handle.
    rows.close()
    with context.Pool(nproc - 1, initializer=_init_worker, initargs=(plan, rows)) as pool:
        pending: dict[int, Any] = {}
        submitted = 0
        for index, (start, end) in enumerate(chunks):
            while submitted < min(len(chunks), index + 2 * nproc):
                if submitted % nproc:
                    pending[submitted] = pool.apply_async(_encode_task, (chunks[submitted],))
                submitted += 1
            if index % nproc:
                yield pending.pop(index).get()
            else:
                yield encode_rows(plan, rows, start, end)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
def tokenize_h5ad(
    input_path: str | Path,
    output_path: str | Path,
    *,
    dictionaries: GeneDictionaries,
    model_input_size: int = 2048,
    special_tokens: bool = False,
    columns: Sequence[str] = DEFAULT_COLUMNS,
    chunk_size: int = 512,
    nproc: int = 1,
    losses: Losses | None = None,
) -> dict[str, Any]:
    """Tokenize an h5ad into a Geneformer-compatible ``datasets`` dataset directory.

    The input is streamed in chunks of ``chunk_size`` cells (h5py), so memory does not grow with
    the number of cells; with ``nproc > 1`` chunks are encoded by a process pool and written in
    input order. The output is byte-identical for the same input and settings, whatever
    ``nproc``.

    Parameters
    ----------
    input_path
        h5ad with raw counts in ``X`` (CSR or dense), ``var["ensembl_id"]``,
        ``obs["n_counts"]`` and optionally ``obs["filter_pass"]``.
    output_path
        The ``.dataset`` directory to write (replaced atomically).
    dictionaries
        From :func:`rosmap_geneformer.geneformer.dictionaries.load_dictionaries` or
        :func:`rosmap_geneformer.geneformer.dictionaries.build_dictionaries`.
    model_input_size
        Maximum length of ``input_ids`` (V1 2048, V2 4096), special tokens included.
    special_tokens
        Wrap each cell in ``<cls>`` ... ``<eos>`` (V2); needs a V2-layout dictionary.
    columns
        obs columns copied to the dataset; ``cell_id`` is ``obs_names``.
    chunk_size
        Cells per chunk.
    nproc
        Processes encoding chunks.
    losses
        ``losses.genes_outside_vocabulary`` and ``losses.empty_cells`` (the schema's defaults
        when ``None``): the shares of genes outside the vocabulary and of cells left with none of
        its genes above which the drop is a WARNING and a refusal (nothing is written then).

    Returns
    -------
    The report: cells in, filtered, empty (dropped), written; gene and count coverage of the
    vocabulary; the length distribution.
    """
    rows = H5adRows(input_path)
    obs, var = read_cell_table(input_path)
    return _tokenize(
        rows,
        obs,
        var,
        output_path,
        dictionaries=dictionaries,
        model_input_size=model_input_size,
        special_tokens=special_tokens,
        columns=columns,
        chunk_size=chunk_size,
        nproc=nproc,
        losses=losses,
    )


def tokenize_cells(
    cells: pd.DataFrame,
    matrix_path: str | Path,
    output_path: str | Path,
    *,
    dictionaries: GeneDictionaries,
    model_input_size: int = 2048,
    special_tokens: bool = False,
    columns: Sequence[str] = DEFAULT_COLUMNS,
    chunk_size: int = 512,
    nproc: int = 1,
    losses: Losses | None = None,
) -> dict[str, Any]:
    """:func:`tokenize_h5ad` for the cells of a cell table, read from the one count matrix.

    ``cells`` stands for ``obs`` (index: cell ids, ``n_counts``, the label columns) and its
    ``matrix_row`` column says which row of ``matrix_path`` holds each cell's counts; the output
    keeps the table's order.
    """
    return _tokenize(
        cell_rows(cells, matrix_path),
        cells,
        read_var(matrix_path),
        output_path,
        dictionaries=dictionaries,
        model_input_size=model_input_size,
        special_tokens=special_tokens,
        columns=columns,
        chunk_size=chunk_size,
        nproc=nproc,
        losses=losses,
    )


def tokenize_anndata(
    adata: Any,
    output_path: str | Path,
    *,
    dictionaries: GeneDictionaries,
    model_input_size: int = 2048,
    special_tokens: bool = False,
    columns: Sequence[str] = DEFAULT_COLUMNS,
    chunk_size: int = 512,
    nproc: int = 1,
    losses: Losses | None = None,
) -> dict[str, Any]:
    """:func:`tokenize_h5ad` for an AnnData object.

    A backed AnnData is streamed from its file; an in-memory one is encoded in this process.
    The arithmetic follows the storage of ``adata.X`` (sparse or dense), as in Geneformer.
    """
    if getattr(adata, "isbacked", False):
        return tokenize_h5ad(
            adata.filename,
            output_path,
            dictionaries=dictionaries,
            model_input_size=model_input_size,
            special_tokens=special_tokens,
            columns=columns,
            chunk_size=chunk_size,
            nproc=nproc,
            losses=losses,
        )
    return _tokenize(
        AnnDataRows(adata),
        adata.obs,
        adata.var,
        output_path,
        dictionaries=dictionaries,
        model_input_size=model_input_size,
        special_tokens=special_tokens,
        columns=columns,
        chunk_size=chunk_size,
        nproc=1,
        losses=losses,
    )


def _tokenize(
    rows: H5adRows | AnnDataRows,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    output_path: str | Path,
    *,
    dictionaries: GeneDictionaries,
    model_input_size: int,
    special_tokens: bool,
    columns: Sequence[str],
    chunk_size: int,
    nproc: int,
    losses: Losses | None = None,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if chunk_size < 1 or nproc < 1:
        msg = f"chunk_size={chunk_size}, nproc={nproc}: both must be at least 1."
        raise InputError(msg)
    source = str(rows.path)
    if len(obs) != rows.n_obs or len(var) != rows.n_vars:
        msg = f"{source}: obs/var sizes do not match X {rows.n_obs} x {rows.n_vars}."
        raise InputError(msg)
    plan, gene_report = make_plan(
        rows,
        obs,
        var,
        dictionaries,
        model_input_size=model_input_size,
        special_tokens=special_tokens,
    )
    losses = losses or Losses()
    checked = {
        "genes_outside_vocabulary": check_loss(
            gene_report["genes_in_var"] - gene_report["genes_in_vocabulary"],
            gene_report["genes_in_var"],
            what="genes outside the token dictionary's vocabulary",
            key="genes_outside_vocabulary",
            limit=losses.genes_outside_vocabulary,
            source=source,
            hint="check that the dictionaries match the data (human Ensembl ids in var['ensembl_id'])",
        )
    }
    label_arrays = obs_label_arrays(obs, list(columns), source=source)
    schema = arrow_schema(label_arrays, plan.tokens.dtype)
    chunks = [(s, min(s + chunk_size, rows.n_obs)) for s in range(0, rows.n_obs, chunk_size)]
    totals: dict[str, float] = {}
    lengths = []
    with atomic_output(output_path) as tmp:
        writer = DatasetWriter(tmp, schema)
        progress = tqdm(total=rows.n_obs, unit="cells", desc="tokenize", disable=None)
        try:
            for (start, end), result in zip(
                chunks, _encoded_chunks(plan, rows, chunks, nproc), strict=True
            ):
                writer.write(record_batch(result, label_arrays, writer.schema))
                for key, value in result.stats.items():
                    totals[key] = totals.get(key, 0) + value
                lengths.append(result.lengths)
                progress.update(end - start)
        finally:
            progress.close()
            rows.close()
        writer.close()
        checked["empty_cells"] = check_loss(
            int(totals.get("cells_empty", 0)),
            int(plan.passing.sum()),
            what="cells with no gene of the vocabulary (dropped)",
            key="empty_cells",
            limit=losses.empty_cells,
            source=source,
            hint="check the dictionaries and the cells' counts",
        )
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    report = _report(obs, plan, gene_report, totals, all_lengths, model_input_size=model_input_size)
    report["losses"] = checked
    report["output"] = {
        "path": Path(output_path).as_posix(),
        "input_ids_dtype": np.dtype(plan.tokens.dtype).name,
        "special_tokens": special_tokens,
        "model_input_size": model_input_size,
        "columns": ["input_ids", *columns, "length"],
    }
    logger.info(
        "%s -> %s: %d cells tokenized, %d filtered out, %d empty (dropped); median length %s",
        source,
        output_path,
        report["cells"]["tokenized"],
        report["cells"]["filtered_out"],
        report["cells"]["dropped_empty"],
        report["length"].get("median"),
    )
    return report


def _report(
    obs: pd.DataFrame,
    plan: Plan,
    gene_report: dict[str, Any],
    totals: dict[str, float],
    lengths: np.ndarray,
    *,
    model_input_size: int,
) -> dict[str, Any]:
    passing = int(plan.passing.sum())
    empty = int(totals.get("cells_empty", 0))
    counts_total = totals.get("counts_total", 0.0)
    counts_vocab = totals.get("counts_in_vocabulary", 0.0)
    n_counts_total = float(plan.n_counts[plan.passing].sum(dtype=np.float64))
    cells = {
        "input": len(obs),
        "filtered_out": len(obs) - passing,
        "dropped_empty": empty,
        "tokenized": int(lengths.size),
        "truncated": int(totals.get("cells_truncated", 0)),
    }
    counts = {
        "in_x": counts_total,
        "in_vocabulary": counts_vocab,
        "fraction_in_vocabulary": round(counts_vocab / counts_total, 6) if counts_total else 0.0,
        "fraction_of_n_counts_in_vocabulary": round(counts_vocab / n_counts_total, 6)
        if n_counts_total
        else 0.0,
        "explicit_zeros_ranked": int(totals.get("explicit_zeros", 0)),
    }
    length: dict[str, Any] = {"tokens": int(lengths.sum())}
    if lengths.size:
        quantiles = np.quantile(lengths, [0.05, 0.25, 0.5, 0.75, 0.95])
        length.update(
            {
                "min": int(lengths.min()),
                "p05": float(quantiles[0]),
                "p25": float(quantiles[1]),
                "median": float(quantiles[2]),
                "p75": float(quantiles[3]),
                "p95": float(quantiles[4]),
                "max": int(lengths.max()),
                "mean": round(float(lengths.mean()), 3),
            }
        )
        edges = np.unique(np.linspace(0, model_input_size, 9).round().astype(np.int64))
        hist, _ = np.histogram(lengths, bins=np.append(edges[:-1], model_input_size + 1))
        length["histogram"] = {
            f"{lo}-{hi - 1}": int(c)
            for lo, hi, c in zip(
                edges[:-1], [*edges[1:-1], model_input_size + 1], hist, strict=True
            )
        }
    return {"cells": cells, "genes": gene_report, "counts": counts, "length": length}


def default_nproc() -> int:
    """The number of CPUs this process may use."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
