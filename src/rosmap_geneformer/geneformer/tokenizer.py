"""Geneformer rank-value encoding, token for token identical to Geneformer's tokenizer, streamed.

What Geneformer's ``TranscriptomeTokenizer`` (h5ad path, no gene-mapping file) does, and what this
module reproduces (``geneformer-spec.md`` sections 2.2-2.7):

1. **Genes**: the columns whose ``upper(var["ensembl_id"])`` is a key of the token dictionary, in
   var order. Duplicate ids are not summed: each copy is ranked and gets the same token.
2. **Cells**: those with ``obs["filter_pass"] == 1`` (all cells without that column), in obs order.
3. **Normalisation**, with the arithmetic Geneformer's code gets from its input storage:

   - sparse ``X`` (scipy divides a sparse matrix by multiplying with reciprocals):
     ``v = ((x * (1 / n)) * 10_000) * (1 / m)``, where ``1 / n`` has the dtype of ``n_counts``
     (float32 in our files), the first two products the dtype of ``x * (1 / n)`` and the last
     one float64. Explicitly stored zeros stay as 0.0, so they are ranked (last), as in
     Geneformer; a cell is empty only when it stores no vocabulary gene at all.
   - dense ``X``: true division ``v = ((x / n) * 10_000) / m``; zeros are not ranked.

   The two differ in the last bit for some values, and that flips near-tie orderings, so the
   path follows the storage of ``X`` (``H5adRows.kind`` / ``scipy.sparse.issparse``).
4. **Ranking**: per cell, ``numpy.argsort(-v)`` with numpy's default (unstable) kind on the
   float64 values of the stored genes in var order, exactly the array Geneformer sorts, so exact
   ties come out in the same order. Everything else is vectorised over a chunk of cells.
5. **Truncation**: the first ``model_input_size`` tokens, or with special tokens
   ``<cls>`` + the first ``model_input_size - 2`` + ``<eos>``. Empty cells are dropped (counted).

The output is written straight into the ``save_to_disk`` layout of a Hugging Face ``datasets``
dataset (Arrow IPC stream shards, ``dataset_info.json``, ``state.json``), batch by batch, so
memory does not grow with the number of cells. Columns, in Geneformer's order: ``input_ids``
(``List(int16)`` when the dictionary's gene tokens are ``numpy.int16`` as in gc30M, otherwise
``List(int32)``), the requested label columns, ``length`` (int64).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from rosmap_geneformer.counts import (
    AnnDataRows,
    H5adRows,
    cell_rows,
    check_count_values,
    read_cell_table,
    read_var,
)
from rosmap_geneformer.geneformer.dictionaries import (
    CLS,
    EOS,
    SPECIAL_TOKENS,
    TARGET_SUM,
    GeneDictionaries,
)
from rosmap_geneformer.io import atomic_output

logger = logging.getLogger(__name__)

CELL_ID = "cell_id"
DEFAULT_COLUMNS = ("cell_id", "patient_id", "cell_type", "ad_status")
# datasets' default shard size for save_to_disk.
MAX_SHARD_BYTES = 500 * 10**6


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
        raise ValueError(msg)
    column = obs["n_counts"]
    if not isinstance(column.dtype, np.dtype) or column.dtype.kind not in "iuf":
        msg = (
            f"{source}: obs['n_counts'] has dtype {column.dtype}; it must be a plain numeric "
            "column (float32 or integer) without missing values."
        )
        raise ValueError(msg)
    n_counts = column.to_numpy()
    bad = ~(n_counts > 0) & passing
    if bad.any():
        examples = list(obs.index[bad][:5])
        msg = (
            f"{source}: obs['n_counts'] is zero, negative or missing for {int(bad.sum())} cell(s) "
            f"(e.g. {examples}). n_counts must be each cell's total raw count; recompute it, or "
            "remove these cells (or set obs['filter_pass'] to 0 for them)."
        )
        raise ValueError(msg)
    return n_counts


def ensembl_ids(var: pd.DataFrame, *, source: str | Path) -> pd.Series:
    """``var["ensembl_id"]`` as an object Series with a positional index."""
    if "ensembl_id" not in var.columns:
        msg = (
            f"{source}: var lacks column 'ensembl_id' (Geneformer's input contract); it has "
            f"{list(var.columns)}. Run convert_genes, or copy the Ensembl ids into "
            "var['ensembl_id']."
        )
        raise ValueError(msg)
    return var["ensembl_id"].astype(object).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# The plan: everything fixed for one input and one dictionary pair
# --------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    col_to_kept: np.ndarray  # input column -> position among kept genes, or -1
    kept_cols: np.ndarray  # input columns of kept genes, var order
    tokens: np.ndarray  # token per kept gene, output dtype
    medians: np.ndarray  # median per kept gene, dtype as Geneformer builds it
    neg_recip_medians: np.ndarray  # -np.divide(1, medians); scipy computes np.divide(1, medians)
    all_kept: bool  # every input column is kept, in order
    n_counts: np.ndarray  # per input cell, own dtype
    passing: np.ndarray  # per input cell
    cell_names: np.ndarray  # per input cell, for messages
    max_genes: int  # gene tokens kept per cell
    special: bool
    cls: int
    eos: int
    sparse_arithmetic: bool
    source: str


@dataclass
class _ChunkResult:
    cells: np.ndarray  # input positions of the output cells
    lengths: np.ndarray  # int64 per output cell
    values: np.ndarray  # flat input_ids
    stats: dict[str, float] = field(default_factory=dict)


def _make_plan(
    rows: H5adRows | AnnDataRows,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    dictionaries: GeneDictionaries,
    *,
    model_input_size: int,
    special_tokens: bool,
) -> tuple[_Plan, dict[str, Any]]:
    source = str(rows.path)
    token_dict = dictionaries.token_dictionary
    if special_tokens and not dictionaries.has_special_tokens:
        msg = (
            f"{dictionaries.source}: special tokens were asked for (--special-tokens / "
            "tokenize.special_tokens) but the token dictionary has no <cls>/<eos> (V1 layout). "
            "Use a V2 dictionary (or build one with special tokens), or turn special tokens off."
        )
        raise ValueError(msg)
    if not special_tokens and dictionaries.has_special_tokens:
        logger.warning(
            "%s: the dictionary has <cls>/<eos> but special tokens are off; V2 models expect them",
            dictionaries.source,
        )
    minimum = 3 if special_tokens else 1
    if model_input_size < minimum:
        msg = f"model_input_size={model_input_size}: must be at least {minimum}."
        raise ValueError(msg)

    ids = ensembl_ids(var, source=source)
    # Geneformer maps upper(id) through the identity map of the token dictionary.
    upper = ids.map(lambda g: g.upper() if isinstance(g, str) else None)
    kept_mask = upper.map(lambda g: g is not None and g in token_dict and g not in SPECIAL_TOKENS)
    kept_mask = kept_mask.to_numpy(dtype=bool)
    kept_cols = np.flatnonzero(kept_mask)
    n_vars = len(ids)
    if kept_cols.size == 0:
        examples = [str(g) for g in ids.head(5)]
        msg = (
            f"{source}: none of the {n_vars} genes in var['ensembl_id'] is in the token "
            f"dictionary ({dictionaries.source}); overlap 0 of {n_vars}. Data ids look like "
            f"{examples}; the dictionary's like {dictionaries.gene_ids[:3]}. Use Ensembl gene "
            "ids without version suffixes (ENSG00000123456, not ENSG00000123456.7) and the "
            "dictionary of the model you use."
        )
        raise ValueError(msg)
    kept_ids = upper.iloc[kept_cols].tolist()
    original = ids.iloc[kept_cols].tolist()
    case_only = sum(1 for a, b in zip(original, kept_ids, strict=True) if a != b)
    if case_only:
        logger.warning(
            "%s: %d gene id(s) match the token dictionary only after upper-casing (as Geneformer "
            "does); they are tokenized",
            source,
            case_only,
        )
    duplicated = pd.Series(kept_ids).duplicated(keep=False)
    n_dup = int(duplicated.sum())
    if n_dup:
        logger.warning(
            "%s: %d var columns share an Ensembl id with another column (e.g. %s); as in "
            "Geneformer they are not summed and each gets the same token",
            source,
            n_dup,
            sorted(set(pd.Series(kept_ids)[duplicated]))[:3],
        )
    medians_missing = [g for g in kept_ids if g not in dictionaries.gene_median_dictionary]
    if medians_missing:
        msg = (
            f"{dictionaries.source}: {len(medians_missing)} gene(s) of the data are in the token "
            f"dictionary but not in the gene median dictionary (e.g. {medians_missing[:5]}). Use "
            "the median dictionary that belongs to the token dictionary."
        )
        raise ValueError(msg)
    # Built like Geneformer's arrays, so dtypes (and hence arithmetic and output) match.
    tokens = np.array([token_dict[g] for g in kept_ids])
    medians = np.array([dictionaries.gene_median_dictionary[g] for g in kept_ids])
    out_dtype = np.int16 if tokens.dtype == np.int16 else np.int32
    cls = int(token_dict.get(CLS, -1))
    eos = int(token_dict.get(EOS, -1))
    top = max(int(tokens.max()), cls, eos)
    if top > np.iinfo(out_dtype).max:
        msg = f"{dictionaries.source}: token id {top} does not fit {np.dtype(out_dtype).name}."
        raise ValueError(msg)
    col_to_kept = np.full(n_vars, -1, dtype=np.intp)
    col_to_kept[kept_cols] = np.arange(kept_cols.size)

    passing = filter_pass_mask(obs)
    n_counts = checked_n_counts(obs, passing, source=source)
    plan = _Plan(
        col_to_kept=col_to_kept,
        kept_cols=kept_cols,
        tokens=tokens.astype(out_dtype),
        medians=medians,
        neg_recip_medians=-np.divide(1, medians),
        all_kept=bool(kept_cols.size == n_vars),
        n_counts=n_counts,
        passing=passing,
        cell_names=np.asarray(obs.index, dtype=object),
        max_genes=model_input_size - 2 if special_tokens else model_input_size,
        special=special_tokens,
        cls=cls,
        eos=eos,
        sparse_arithmetic=rows.kind == "sparse",
        source=source,
    )
    gene_report = {
        "genes_in_var": n_vars,
        "genes_in_vocabulary": int(kept_cols.size),
        "fraction_genes_in_vocabulary": round(kept_cols.size / n_vars, 6),
        "vocabulary_size": len(token_dict),
        "fraction_vocabulary_in_data": round(len(set(kept_ids)) / len(dictionaries.gene_ids), 6),
        "duplicate_id_columns": n_dup,
        "ids_matched_after_upper_casing": case_only,
    }
    logger.info(
        "%s: %d of %d genes in the vocabulary (%.1f%%); %s arithmetic",
        source,
        kept_cols.size,
        n_vars,
        100 * kept_cols.size / n_vars,
        "sparse (reciprocal)" if plan.sparse_arithmetic else "dense (true division)",
    )
    if kept_cols.size < 0.5 * n_vars:
        logger.warning("%s: fewer than half of the genes are in the vocabulary", source)
    return plan, gene_report


# --------------------------------------------------------------------------------------------
# The encoder: one chunk of input rows -> ranked, truncated token lists
# --------------------------------------------------------------------------------------------
def _encode_rows(plan: _Plan, rows: H5adRows | AnnDataRows, start: int, end: int) -> _ChunkResult:
    """Encode input rows ``start:end``: normalise, rank, truncate (see the module docstring)."""
    passing = plan.passing[start:end]
    if plan.sparse_arithmetic:
        value, kept, counts, stats = _normalise_sparse(plan, rows, start, end, passing)
    else:
        value, kept, counts, stats = _normalise_dense(plan, rows, start, end, passing)
    stats["cells_passing"] = int(passing.sum())

    # Rank: one numpy default argsort per cell, on the cell's negated values in var order, i.e.
    # exactly Geneformer's argsort(-gene_vector). Truncation is folded in.
    use = passing & (counts > 0)
    n_genes = np.minimum(counts, plan.max_genes)
    extra = 2 if plan.special else 0
    lengths = (n_genes + extra)[use]
    out_end = np.cumsum(lengths)
    out_start = out_end - lengths
    selected = np.empty(int(out_end[-1]) if out_end.size else 0, dtype=np.int64)
    bounds = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=bounds[1:])
    position = extra // 2
    for lo, hi, m in zip(
        bounds[:-1][use].tolist(), bounds[1:][use].tolist(), n_genes[use].tolist(), strict=True
    ):
        order = value[lo:hi].argsort()
        order += lo
        selected[position : position + m] = order[:m]
        position += m + extra
    entry_tokens = np.take(plan.tokens, kept)
    if plan.special:
        # Two extra entries past the genes hold <cls> and <eos>.
        specials = np.array([plan.cls, plan.eos], dtype=entry_tokens.dtype)
        entry_tokens = np.concatenate([entry_tokens, specials])
        selected[out_start] = entry_tokens.size - 2
        selected[out_end - 1] = entry_tokens.size - 1
    values = np.take(entry_tokens, selected)
    stats["cells_empty"] = int((passing & (counts == 0)).sum())
    stats["cells_truncated"] = int((passing & (counts > plan.max_genes)).sum())
    stats["genes_ranked"] = int(counts[passing].sum())
    cells = np.arange(start, end)[use]
    return _ChunkResult(cells, lengths.astype(np.int64), values, stats)


def _normalise_sparse(
    plan: _Plan, rows: H5adRows | AnnDataRows, start: int, end: int, passing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Negated values (float64), kept-gene positions and per-row counts, as scipy computes them.

    All rows of the chunk are computed (cheaper than copying out the few non-passing ones);
    non-passing rows are checked only where that matters and are skipped when ranking.
    """
    data, indices, indptr = rows.read_csr(start, end)
    everything = bool(passing.all())
    try:
        minimum = check_count_values(data, source=plan.source)
    except ValueError:
        if everything:
            raise
        minimum = check_count_values(_passing_rows(data, indptr, passing), source=plan.source)
    row_sum = _row_sums(data, indptr)
    n = plan.n_counts[start:end]
    if not everything:
        n = n.copy()
        n[~passing] = 1  # never used for output; avoids dividing by a filtered cell's 0
    _check_n_counts_cover(plan, np.arange(start, end)[passing], n[passing], row_sum[passing])
    stats: dict[str, float] = {"counts_total": float(row_sum[passing].sum())}
    canonical = _is_canonical(indices, indptr)
    # Gathers are much faster with native (intp) indices.
    indices = indices.astype(np.intp, copy=False)
    if plan.all_kept:
        kept = indices
        stats["counts_in_vocabulary"] = stats["counts_total"]
    else:
        kept = np.take(plan.col_to_kept, indices)
        in_vocab = kept >= 0
        data, kept = data[in_vocab], kept[in_vocab]
        cumulative = np.zeros(in_vocab.size + 1, dtype=np.int64)
        np.cumsum(in_vocab, out=cumulative[1:])
        indptr = cumulative[indptr]
        stats["counts_in_vocabulary"] = float(_row_sums(data, indptr)[passing].sum())
    counts = np.diff(indptr)
    stats["explicit_zeros"] = 0
    if minimum == 0:
        zeros = _row_sums((data == 0).astype(np.int64), indptr)
        stats["explicit_zeros"] = int(zeros[passing].sum())
    # scipy computes sparse / dense as sparse.multiply(1 / dense); the same ufunc calls, in the
    # same dtypes, on the same elements. The last factor is negated: b * (-r) == -(b * r)
    # bit for bit (rounding is symmetric), so this is Geneformer's -gene_vector directly.
    value = np.multiply(data, np.repeat(np.divide(1, n), counts))
    np.multiply(value, TARGET_SUM, out=value)
    value = np.multiply(value, np.take(plan.neg_recip_medians, kept))
    if not canonical:
        value, kept, counts = _canonical(value, kept, counts, plan.tokens.size)
    return value, kept, counts, stats


def _row_sums(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Per-row sums of CSR values (float64 result; native-dtype accumulation)."""
    sums = np.zeros(indptr.size - 1)
    nonempty = indptr[1:] > indptr[:-1]
    if values.size and nonempty.any():
        # Exact for integer counts below 2**24 per cell in float32; this is only a check/report.
        sums[nonempty] = np.add.reduceat(values, indptr[:-1][nonempty])
    return sums


def _normalise_dense(
    plan: _Plan, rows: H5adRows | AnnDataRows, start: int, end: int, passing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """The same for a dense X, with numpy's true division (Geneformer on dense arrays)."""
    block = np.asarray(rows.read(start, end))[passing]
    cells = np.arange(start, end)[passing]
    n = plan.n_counts[cells]
    check_count_values(block.ravel(), source=plan.source)
    row_sum = block.sum(axis=1, dtype=np.float64)
    _check_n_counts_cover(plan, cells, n, row_sum)
    sub = block[:, plan.kept_cols]
    stats: dict[str, float] = {
        "counts_total": float(row_sum.sum()),
        "counts_in_vocabulary": float(sub.sum(dtype=np.float64)),
        "explicit_zeros": 0,
    }
    row_of, kept = np.nonzero(sub)  # row-major: var order within each cell
    x = sub[row_of, kept]
    value = np.true_divide(np.true_divide(x, n[row_of]) * TARGET_SUM, plan.medians[kept])
    # csr_matrix(dense) keeps the non-zero results only.
    nonzero = value != 0
    value, kept, row_of = -value[nonzero], kept[nonzero], row_of[nonzero]
    counts = np.zeros(end - start, dtype=np.int64)
    counts[passing] = np.bincount(row_of, minlength=cells.size)
    return value, kept, counts, stats


def _passing_rows(data: np.ndarray, indptr: np.ndarray, passing: np.ndarray) -> np.ndarray:
    """The values of the passing rows only."""
    keep = np.repeat(passing, np.diff(indptr))
    return data[keep]


def _is_canonical(indices: np.ndarray, indptr: np.ndarray) -> bool:
    """Whether column indices strictly increase within every row (anndata's usual CSR)."""
    if indices.size < 2:
        return True
    increasing = indices[1:] > indices[:-1]
    boundary = indptr[1:-1]
    boundary = boundary[(boundary > 0) & (boundary < indices.size)]
    increasing[boundary - 1] = True
    return bool(increasing.all())


def _canonical(
    value: np.ndarray, kept: np.ndarray, counts: np.ndarray, n_genes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort each cell's entries by gene and sum duplicates, as Geneformer's ``csr_matrix(coo)``."""
    indptr = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    matrix = sparse.csr_matrix((value, kept, indptr), shape=(counts.size, n_genes))
    matrix.sum_duplicates()
    return matrix.data, matrix.indices.astype(np.int64), np.diff(matrix.indptr)


def _check_n_counts_cover(
    plan: _Plan, cells: np.ndarray, n: np.ndarray, row_sum: np.ndarray
) -> None:
    """n_counts is a total over all genes, so it cannot be below the sum of the stored counts."""
    short = n.astype(np.float64) < row_sum * (1 - 1e-4) - 0.5
    if short.any():
        i = int(np.argmax(short))
        msg = (
            f"{plan.source}: obs['n_counts'] is smaller than the sum of X for {int(short.sum())} "
            f"cell(s) in rows {int(cells[0])}-{int(cells[-1])} (e.g. {plan.cell_names[cells[i]]}: "
            f"n_counts={n[i]:g}, sum of X={row_sum[i]:g}). n_counts must be each cell's total raw "
            "count over all genes; recompute it from the raw counts."
        )
        raise ValueError(msg)


# Worker processes get the plan and the reader once, through the pool initialiser.
_WORKER: dict[str, Any] = {}


def _init_worker(plan: _Plan, rows: H5adRows | AnnDataRows) -> None:
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


def _encode_task(bounds: tuple[int, int]) -> _ChunkResult:
    return _encode_rows(_WORKER["plan"], _WORKER["rows"], *bounds)


def _encoded_chunks(
    plan: _Plan, rows: H5adRows | AnnDataRows, chunks: Sequence[tuple[int, int]], nproc: int
) -> Iterator[_ChunkResult]:
    """Encoded chunks in input order, from this process and ``nproc - 1`` worker processes.

    This process encodes every ``nproc``-th chunk itself (it would otherwise sit idle between
    writes) and the workers the others, a bounded number of chunks ahead, so memory stays flat.
    """
    _keep_freed_memory()
    if nproc <= 1 or len(chunks) <= 1 or isinstance(rows, AnnDataRows):
        for start, end in chunks:
            yield _encode_rows(plan, rows, start, end)
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
                yield _encode_rows(plan, rows, start, end)


# --------------------------------------------------------------------------------------------
# Output: the save_to_disk layout, written batch by batch
# --------------------------------------------------------------------------------------------
class _HashingFile:
    """A write-only file that hashes what passes through (the dataset fingerprint)."""

    def __init__(self, path: Path) -> None:
        import xxhash

        self._fh = path.open("wb")
        self._hash = xxhash.xxh64()
        self.closed = False
        self.bytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self.bytes += view.nbytes
        return self._fh.write(view)

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
        self.closed = True

    def digest(self) -> bytes:
        return self._hash.digest()


class DatasetWriter:
    """Write record batches into the ``save_to_disk`` layout of a ``datasets.Dataset``.

    Shards are Arrow IPC streams named ``data-{i:05d}-of-{n:05d}.arrow`` (a new one starts after
    ``max_shard_bytes``), with ``dataset_info.json`` and ``state.json`` as ``save_to_disk``
    writes them. The fingerprint is a hash of the shard bytes, so equal content gives equal
    files. ``datasets.load_from_disk`` reads the result.

    Parameters
    ----------
    directory
        The (new, empty) dataset directory.
    schema
        The Arrow schema, with ``datasets``' ``huggingface`` metadata holding the features.
    max_shard_bytes
        Shard size limit (default :data:`MAX_SHARD_BYTES`, datasets' 500 MB).
    """

    def __init__(self, directory: Path, schema: Any, *, max_shard_bytes: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        self.max_shard_bytes = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
        self._shards: list[Path] = []
        self._digests: list[bytes] = []
        self._file: _HashingFile | None = None
        self._writer: Any = None
        self.n_rows = 0

    def _open_shard(self) -> None:
        import pyarrow as pa

        path = self.directory / f".shard-{len(self._shards):05d}.arrow"
        self._shards.append(path)
        self._file = _HashingFile(path)
        self._writer = pa.ipc.new_stream(self._file, self.schema)

    def _close_shard(self) -> None:
        if self._writer is not None and self._file is not None:
            self._writer.close()
            self._file.close()
            self._digests.append(self._file.digest())
            self._writer = self._file = None

    def write(self, batch: Any) -> None:
        """Append one ``pyarrow.RecordBatch`` with the writer's schema."""
        if self._file is not None and self._file.bytes >= self.max_shard_bytes:
            self._close_shard()
        if self._writer is None:
            self._open_shard()
        self._writer.write_batch(batch)
        self.n_rows += batch.num_rows

    def close(self) -> list[Path]:
        """Finish the shards and write ``state.json`` and ``dataset_info.json``."""
        import xxhash

        if self._writer is None and not self._shards:
            self._open_shard()  # an empty dataset still has one shard with the schema
        self._close_shard()
        n = len(self._shards)
        final = []
        for i, path in enumerate(self._shards):
            target = self.directory / f"data-{i:05d}-of-{n:05d}.arrow"
            path.rename(target)
            final.append(target)
        state = {
            "_data_files": [{"filename": p.name} for p in final],
            "_fingerprint": xxhash.xxh64(b"".join(self._digests)).hexdigest(),
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        with (self.directory / "state.json").open("w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2, sort_keys=True)
        # What save_to_disk writes for a Dataset built in memory (empty descriptive fields).
        info = {
            "citation": "",
            "description": "",
            "features": self.features,
            "homepage": "",
            "license": "",
        }
        with (self.directory / "dataset_info.json").open("w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
        return final


def _label_arrays(obs: pd.DataFrame, columns: Sequence[str], *, source: str) -> dict[str, Any]:
    """Whole-column Arrow arrays of the label columns, typed as ``Dataset.from_dict`` would.

    ``cell_id`` comes from ``obs_names`` unless obs has such a column. Values are taken as
    Python objects (``Series.tolist()``, as Geneformer does), so strings become ``string`` and
    integers ``int64``; other types are written as strings. Missing values become nulls.
    """
    import pyarrow as pa

    missing = [c for c in columns if c not in obs.columns and c != CELL_ID]
    if missing:
        msg = (
            f"{source}: obs lacks column(s) {missing} asked for as dataset columns; it has "
            f"{list(obs.columns)}. Fix tokenize.columns in params.yaml or --columns."
        )
        raise ValueError(msg)
    reserved = {"input_ids", "length"} & set(columns)
    if reserved:
        msg = f"columns {sorted(reserved)} are written by the tokenizer; do not ask for them."
        raise ValueError(msg)
    if len(set(columns)) != len(columns):
        msg = f"columns {list(columns)} name a column twice."
        raise ValueError(msg)
    arrays = {}
    for column in columns:
        if column == CELL_ID and column not in obs.columns:
            values = [str(v) for v in obs.index]
        else:
            values = [None if _is_missing(v) else v for v in obs[column].tolist()]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            array = None
        if array is None or str(array.type) not in _VALUE_DTYPES:
            array = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        arrays[column] = array
    return arrays


# Arrow type -> datasets Value dtype, for the label column types we write.
_VALUE_DTYPES = {"string": "string", "int64": "int64", "double": "float64", "bool": "bool"}


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _features(label_arrays: dict[str, Any], token_dtype: np.dtype) -> dict[str, Any]:
    """The ``datasets`` features dict (``Features.to_dict()`` form) of the output columns."""
    features: dict[str, Any] = {
        "input_ids": {
            "feature": {"dtype": np.dtype(token_dtype).name, "_type": "Value"},
            "_type": "List",
        }
    }
    for name, array in label_arrays.items():
        features[name] = {"dtype": _VALUE_DTYPES[str(array.type)], "_type": "Value"}
    features["length"] = {"dtype": "int64", "_type": "Value"}
    return features


def _arrow_schema(label_arrays: dict[str, Any], token_dtype: np.dtype) -> Any:
    """The Arrow schema with the ``huggingface`` metadata that ``datasets`` writes."""
    import pyarrow as pa

    fields = [pa.field("input_ids", pa.list_(pa.from_numpy_dtype(np.dtype(token_dtype))))]
    fields += [pa.field(name, array.type) for name, array in label_arrays.items()]
    fields.append(pa.field("length", pa.int64()))
    metadata = {"info": {"features": _features(label_arrays, token_dtype)}}
    return pa.schema(fields, metadata={"huggingface": json.dumps(metadata)})


def _record_batch(result: _ChunkResult, label_arrays: dict[str, Any], schema: Any) -> Any:
    import pyarrow as pa

    offsets = np.zeros(result.lengths.size + 1, dtype=np.int32)
    np.cumsum(result.lengths, out=offsets[1:])
    input_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(result.values))
    take = pa.array(result.cells)
    columns = [input_ids]
    for name, array in label_arrays.items():
        column = array.take(take)
        target = schema.field(name).type
        columns.append(column if column.type == target else column.cast(target))
    columns.append(pa.array(result.lengths))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


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
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if chunk_size < 1 or nproc < 1:
        msg = f"chunk_size={chunk_size}, nproc={nproc}: both must be at least 1."
        raise ValueError(msg)
    source = str(rows.path)
    if len(obs) != rows.n_obs or len(var) != rows.n_vars:
        msg = f"{source}: obs/var sizes do not match X {rows.n_obs} x {rows.n_vars}."
        raise ValueError(msg)
    plan, gene_report = _make_plan(
        rows,
        obs,
        var,
        dictionaries,
        model_input_size=model_input_size,
        special_tokens=special_tokens,
    )
    label_arrays = _label_arrays(obs, list(columns), source=source)
    schema = _arrow_schema(label_arrays, plan.tokens.dtype)
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
                writer.write(_record_batch(result, label_arrays, writer.schema))
                for key, value in result.stats.items():
                    totals[key] = totals.get(key, 0) + value
                lengths.append(result.lengths)
                progress.update(end - start)
        finally:
            progress.close()
            rows.close()
        writer.close()
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    report = _report(obs, plan, gene_report, totals, all_lengths, model_input_size=model_input_size)
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
    if report["cells"]["dropped_empty"]:
        logger.warning(
            "%s: %d cell(s) have no gene of the vocabulary and were dropped",
            source,
            report["cells"]["dropped_empty"],
        )
    return report


def _report(
    obs: pd.DataFrame,
    plan: _Plan,
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
