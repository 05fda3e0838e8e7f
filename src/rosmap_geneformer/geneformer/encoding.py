"""Geneformer's rank-value encoding of count rows, token for token, vectorised over chunks.

What Geneformer's ``TranscriptomeTokenizer`` (h5ad path, no gene-mapping file) does, and what this
module reproduces (``geneformer-spec.md`` sections 2.2-2.7), with one deliberate difference: the
order of exactly tied genes (item 4).

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
4. **Ranking**: per cell, by the float64 value ``v`` descending, on exactly the values Geneformer
   sorts, so genes of different value come in Geneformer's order. Genes with exactly equal ``v``
   (in practice the same count and the same median) come in ascending token id, i.e. in the
   token dictionary's order, whatever the column order of the input; where a tie group is cut by
   truncation, its lowest token ids are kept. Geneformer instead calls ``numpy.argsort(-v)``
   with numpy's default, unstable kind, whose order of ties depends on the sort kernel numpy
   picks for the CPU (scalar introsort, AVX2 or AVX-512), so its output for a cell with ties
   changes from machine to machine; ours does not. Our output therefore equals Geneformer's on
   any CPU for every cell without an exact tie among its output genes, and for the others has
   the same values rank by rank and the same genes within every tie group. Done as one numpy
   default argsort per cell (the fastest kind; its tie order does not matter) and one pass over
   the chunk that reorders the tied ranks by token id (:func:`_rank`). Everything else is
   vectorised over a chunk of cells.
5. **Truncation**: the first ``model_input_size`` tokens, or with special tokens
   ``<cls>`` + the first ``model_input_size - 2`` + ``<eos>``. Empty cells are dropped (counted).

:func:`make_plan` fixes everything that depends only on the input's tables and the dictionaries
(a :class:`Plan`); :func:`encode_rows` turns one chunk of rows into token lists (a
:class:`ChunkResult`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from rosmap_geneformer.counts import AnnDataRows, H5adRows, check_count_values
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.geneformer.cells import checked_n_counts, ensembl_ids, filter_pass_mask
from rosmap_geneformer.geneformer.dictionaries import (
    CLS,
    EOS,
    SPECIAL_TOKENS,
    TARGET_SUM,
    GeneDictionaries,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The plan: everything fixed for one input and one dictionary pair
# --------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What :func:`encode_rows` needs of one input and one dictionary pair (:func:`make_plan`)."""

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
class ChunkResult:
    """The token lists of one chunk of input rows (:func:`encode_rows`)."""

    cells: np.ndarray  # input positions of the output cells
    lengths: np.ndarray  # int64 per output cell
    values: np.ndarray  # flat input_ids
    stats: dict[str, float] = field(default_factory=dict)


def make_plan(
    rows: H5adRows | AnnDataRows,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    dictionaries: GeneDictionaries,
    *,
    model_input_size: int,
    special_tokens: bool,
) -> tuple[Plan, dict[str, Any]]:
    """The genes kept, their tokens and medians, and the cells, checked; and the gene report."""
    source = str(rows.path)
    token_dict = dictionaries.token_dictionary
    if special_tokens and not dictionaries.has_special_tokens:
        msg = (
            f"{dictionaries.source}: special tokens were asked for (--special-tokens / "
            "tokenize.special_tokens) but the token dictionary has no <cls>/<eos> (V1 layout). "
            "Use a V2 dictionary (or build one with special tokens), or turn special tokens off."
        )
        raise InputError(msg)
    if not special_tokens and dictionaries.has_special_tokens:
        logger.warning(
            "%s: the dictionary has <cls>/<eos> but special tokens are off; V2 models expect them",
            dictionaries.source,
        )
    minimum = 3 if special_tokens else 1
    if model_input_size < minimum:
        msg = f"model_input_size={model_input_size}: must be at least {minimum}."
        raise InputError(msg)

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
        raise InputError(msg)
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
        raise InputError(msg)
    # Built like Geneformer's arrays, so dtypes (and hence arithmetic and output) match.
    tokens = np.array([token_dict[g] for g in kept_ids])
    medians = np.array([dictionaries.gene_median_dictionary[g] for g in kept_ids])
    out_dtype = np.int16 if tokens.dtype == np.int16 else np.int32
    cls = int(token_dict.get(CLS, -1))
    eos = int(token_dict.get(EOS, -1))
    top = max(int(tokens.max()), cls, eos)
    if top > np.iinfo(out_dtype).max:
        msg = f"{dictionaries.source}: token id {top} does not fit {np.dtype(out_dtype).name}."
        raise InputError(msg)
    col_to_kept = np.full(n_vars, -1, dtype=np.intp)
    col_to_kept[kept_cols] = np.arange(kept_cols.size)

    passing = filter_pass_mask(obs)
    n_counts = checked_n_counts(obs, passing, source=source)
    plan = Plan(
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
    return plan, gene_report


# --------------------------------------------------------------------------------------------
# The encoder: one chunk of input rows -> ranked, truncated token lists
# --------------------------------------------------------------------------------------------
def encode_rows(plan: Plan, rows: H5adRows | AnnDataRows, start: int, end: int) -> ChunkResult:
    """Encode input rows ``start:end``: normalise, rank, truncate (see the module docstring)."""
    passing = plan.passing[start:end]
    if plan.sparse_arithmetic:
        value, kept, counts, stats = _normalise_sparse(plan, rows, start, end, passing)
    else:
        value, kept, counts, stats = _normalise_dense(plan, rows, start, end, passing)
    stats["cells_passing"] = int(passing.sum())

    # Rank: numpy's default (fastest) argsort per cell on the negated values, then every group of
    # exactly equal values put in ascending token id, then truncation.
    use = passing & (counts > 0)
    n_genes = np.minimum(counts, plan.max_genes)
    extra = 2 if plan.special else 0
    lengths = (n_genes + extra)[use]
    out_end = np.cumsum(lengths)
    out_start = out_end - lengths
    bounds = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=bounds[1:])
    entry_tokens = np.take(plan.tokens, kept)
    order = _rank(value, entry_tokens, bounds, use)
    selected = np.empty(int(out_end[-1]) if out_end.size else 0, dtype=np.intp)
    position = extra // 2
    for lo, m in zip(bounds[:-1][use].tolist(), n_genes[use].tolist(), strict=True):
        selected[position : position + m] = order[lo : lo + m]
        position += m + extra
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
    return ChunkResult(cells, lengths.astype(np.int64), values, stats)


def _rank(
    value: np.ndarray, entry_tokens: np.ndarray, bounds: np.ndarray, use: np.ndarray
) -> np.ndarray:
    """The entries of each cell in rank order: negated value ascending, exact ties by token id.

    One numpy default argsort per cell (the fastest kind; the SIMD kernel numpy picks for the CPU
    orders ties its own way), then :func:`_order_ties_by_token` over the whole chunk, so the
    result is the same on every CPU and for every column order of the input. Cells not in
    ``use`` keep their stored order.
    """
    entries_used = bool(use[bounds[1:] > bounds[:-1]].all())
    order = np.empty(value.size, dtype=np.intp) if entries_used else np.arange(value.size)
    for lo, hi in zip(bounds[:-1][use].tolist(), bounds[1:][use].tolist(), strict=True):
        part = value[lo:hi].argsort()
        part += lo
        order[lo:hi] = part
    if value.size < 2:
        return order
    ranked = np.take(value, order)
    tied = ranked[1:] == ranked[:-1]  # rank i and i + 1 hold equal values
    boundary = bounds[1:-1]
    tied[boundary[(boundary > 0) & (boundary < value.size)] - 1] = False  # not across cells
    if tied.any():
        _order_ties_by_token(order, tied, entry_tokens)
    return order


def _order_ties_by_token(order: np.ndarray, tied: np.ndarray, entry_tokens: np.ndarray) -> None:
    """Reorder, in place, the entries of every run of tied ranks by ascending token id.

    Only the tied ranks are touched: each run keeps its place, and one sort on (run, token)
    orders the entries within all runs at once. The sort key is unique (the position is packed
    into its low bits), so any sort kind, on any CPU, gives the same result. Entries with the
    same token (a duplicated gene id) are interchangeable.
    """
    pairs = np.flatnonzero(tied)
    member = np.zeros(order.size, dtype=bool)
    member[pairs] = True
    member[pairs + 1] = True
    where = np.flatnonzero(member)  # the tied ranks, ascending
    starts = np.ones(where.size, dtype=bool)  # a rank starts a run unless tied with the one before
    inner = where > 0
    starts[inner] = ~tied[where[inner] - 1]
    run = np.cumsum(starts, dtype=np.int64)
    entries = order[where]
    tokens = entry_tokens[entries].astype(np.int64)
    position_bits = int(where.size - 1).bit_length()
    token_bits = int(tokens.max()).bit_length()
    if int(run[-1]).bit_length() + token_bits + position_bits <= 63:
        key = run << (token_bits + position_bits)
        key |= tokens << position_bits
        key |= np.arange(where.size, dtype=np.int64)
        key.sort()  # numpy's fastest sort: its tie order cannot matter, keys are unique
        positions = key & ((1 << position_bits) - 1)
    else:
        positions = np.lexsort((tokens, run))
    order[where] = entries[positions]


def _normalise_sparse(
    plan: Plan, rows: H5adRows | AnnDataRows, start: int, end: int, passing: np.ndarray
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
    plan: Plan, rows: H5adRows | AnnDataRows, start: int, end: int, passing: np.ndarray
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
    plan: Plan, cells: np.ndarray, n: np.ndarray, row_sum: np.ndarray
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
        raise InputError(msg)
