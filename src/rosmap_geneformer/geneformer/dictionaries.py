"""Geneformer gene dictionaries: loading, validation and building them from data.

A Geneformer vocabulary is two pickled dicts (``geneformer-spec.md`` section 1):

- the **token dictionary** ``dict[str, int]``: Ensembl id -> token id, plus special tokens. V1
  (gc30M) has ``<pad>`` 0 and ``<mask>`` 1; V2 (gc104M) adds ``<cls>`` 2 and ``<eos>`` 3;
- the **gene median dictionary** ``dict[str, float]``: Ensembl id -> the non-zero median of
  ``counts / n_counts * 10,000`` over a reference corpus.

Values are kept exactly as loaded (``numpy.int16`` tokens in gc30M, ``numpy.float64`` medians),
because Geneformer's arrays, and therefore the output dtype and the arithmetic, follow them.
"""

from __future__ import annotations

import logging
import math
import numbers
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.errors import InputError, MissingInputError
from rosmap_geneformer.geneformer.cells import checked_n_counts, ensembl_ids, filter_pass_mask
from rosmap_geneformer.io import atomic_output, check_input_file

logger = logging.getLogger(__name__)

PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"
V1_SPECIAL_TOKENS: dict[str, int] = {PAD: 0, MASK: 1}
V2_SPECIAL_TOKENS: dict[str, int] = {PAD: 0, MASK: 1, CLS: 2, EOS: 3}
SPECIAL_TOKENS = frozenset(V2_SPECIAL_TOKENS)
TOKEN_DICTIONARY_FILE = "token_dictionary.pkl"
GENE_MEDIAN_DICTIONARY_FILE = "gene_median_dictionary.pkl"
TARGET_SUM = 10_000
# Pickle protocol of the files we write (fixed, so that the bytes do not depend on Python).
_PICKLE_PROTOCOL = 4
TOKEN_DICTIONARY = "token dictionary"
GENE_MEDIAN_DICTIONARY = "gene median dictionary"
# What each file must hold, in the words of the messages.
EXPECTED_CONTENT = {
    TOKEN_DICTIONARY: "a dict of Ensembl id / special token (str) -> token id (int)",
    GENE_MEDIAN_DICTIONARY: "a dict of Ensembl id (str) -> non-zero median (float)",
}
_NAME_ID_DICTIONARY = "gene name -> Ensembl id dictionary"
_WHERE = (
    "params.yaml: dictionaries.token_dictionary / dictionaries.gene_median_dictionary, "
    "or the CLI flags"
)
_PARAM_KEY = {
    TOKEN_DICTIONARY: "dictionaries.token_dictionary",
    GENE_MEDIAN_DICTIONARY: "dictionaries.gene_median_dictionary",
}


@dataclass(frozen=True)
class GeneDictionaries:
    """A validated pair of Geneformer dictionaries.

    Attributes
    ----------
    token_dictionary
        Ensembl id (and special token) -> token id, values as loaded.
    gene_median_dictionary
        Ensembl id -> non-zero median, values as loaded.
    layout
        ``"V1"`` (``<pad>``, ``<mask>``) or ``"V2"`` (also ``<cls>`` 2, ``<eos>`` 3).
    source
        Where the dictionaries came from, for messages.
    """

    token_dictionary: dict[str, Any]
    gene_median_dictionary: dict[str, Any]
    layout: str
    source: str = field(default="dictionaries", compare=False)

    @property
    def has_special_tokens(self) -> bool:
        """Whether ``<cls>`` and ``<eos>`` exist (V2 layout)."""
        return self.layout == "V2"

    @property
    def gene_ids(self) -> list[str]:
        """The gene keys of the token dictionary, special tokens excluded, in dictionary order."""
        return [k for k in self.token_dictionary if k not in SPECIAL_TOKENS]


def validate_dictionaries(
    token_dictionary: Mapping[str, Any],
    gene_median_dictionary: Mapping[str, Any],
    *,
    source: str = "dictionaries",
) -> str:
    """Check a token/median dictionary pair and return its layout.

    Parameters
    ----------
    token_dictionary
        Ensembl id -> token id, with special tokens.
    gene_median_dictionary
        Ensembl id -> non-zero median.
    source
        Names the files in error messages.

    Returns
    -------
    ``"V1"`` or ``"V2"``.

    Raises
    ------
    ValueError
        On a wrong type, a missing or misplaced special token, duplicate token ids, a gene without
        a median, or a median that is not a finite positive number.
    """
    if not isinstance(token_dictionary, Mapping) or not isinstance(gene_median_dictionary, Mapping):
        msg = (
            f"{source}: expected two dicts (token dictionary str -> int, gene median dictionary "
            f"str -> float), got {type(token_dictionary).__name__} and "
            f"{type(gene_median_dictionary).__name__}."
        )
        raise InputError(msg)
    bad_keys = [k for k in token_dictionary if not isinstance(k, str)][:5]
    if bad_keys:
        msg = f"{source}: token dictionary keys must be str (Ensembl ids); found {bad_keys!r}."
        raise InputError(msg)
    bad_values = [
        (k, v)
        for k, v in token_dictionary.items()
        if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Integral) or int(v) < 0
    ][:5]
    if bad_values:
        msg = f"{source}: token ids must be non-negative integers; found {bad_values!r}."
        raise InputError(msg)
    for token, expected in V1_SPECIAL_TOKENS.items():
        if token_dictionary.get(token) != expected:
            msg = (
                f"{source}: token dictionary must map {token!r} to {expected} (Geneformer V1 and "
                f"V2 layouts); it maps it to {token_dictionary.get(token)!r}."
            )
            raise InputError(msg)
    has_cls, has_eos = CLS in token_dictionary, EOS in token_dictionary
    if has_cls != has_eos:
        msg = (
            f"{source}: token dictionary has only one of <cls>/<eos>; the V2 layout needs both "
            "(<cls> 2, <eos> 3) and the V1 layout neither."
        )
        raise InputError(msg)
    if has_cls and (token_dictionary[CLS] != 2 or token_dictionary[EOS] != 3):
        msg = (
            f"{source}: V2 layout needs <cls> 2 and <eos> 3; found <cls> "
            f"{token_dictionary[CLS]!r} and <eos> {token_dictionary[EOS]!r}."
        )
        raise InputError(msg)
    ids = [int(v) for v in token_dictionary.values()]
    if len(set(ids)) != len(ids):
        seen: dict[int, str] = {}
        clash = []
        for key, value in token_dictionary.items():
            if int(value) in seen:
                clash.append((seen[int(value)], key, int(value)))
            seen.setdefault(int(value), key)
        msg = f"{source}: token ids must be unique; e.g. {clash[:3]} share an id."
        raise InputError(msg)
    genes = [k for k in token_dictionary if k not in SPECIAL_TOKENS]
    if not genes:
        msg = f"{source}: the token dictionary holds no gene (only special tokens)."
        raise InputError(msg)
    missing = [g for g in genes if g not in gene_median_dictionary]
    if missing:
        msg = (
            f"{source}: {len(missing)} of {len(genes)} genes in the token dictionary have no "
            f"entry in the gene median dictionary (e.g. {missing[:5]}). Geneformer would fail "
            "with a KeyError on them; use the median dictionary that belongs to this token "
            "dictionary (e.g. gc30M with gc30M)."
        )
        raise InputError(msg)
    bad_medians = []
    for gene in genes:
        value = gene_median_dictionary[gene]
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
        if not ok or not math.isfinite(float(value)) or float(value) <= 0:
            bad_medians.append((gene, value))
    if bad_medians:
        msg = (
            f"{source}: gene medians must be finite positive numbers; found {len(bad_medians)} "
            f"bad value(s), e.g. {bad_medians[:5]!r}."
        )
        raise InputError(msg)
    extra = len(set(gene_median_dictionary) - set(token_dictionary))
    if extra:
        logger.info("%s: %d median entries have no token and are ignored", source, extra)
    return "V2" if has_cls else "V1"


def load_dictionaries(
    token_dictionary_path: str | Path, gene_median_dictionary_path: str | Path
) -> GeneDictionaries:
    """Load and validate a Geneformer token dictionary and gene median dictionary.

    Each file is first checked for what it holds: a missing or empty file, a Git LFS pointer, a
    file that is not a pickle, a pickle of something other than a dict, and the two files given
    the other way round are refused with the file's name, what it holds (:func:`describe_content`)
    and what was expected.

    Parameters
    ----------
    token_dictionary_path
        Pickled ``dict[str, int]`` (e.g. ``token_dictionary_gc30M.pkl``).
    gene_median_dictionary_path
        Pickled ``dict[str, float]`` (e.g. ``gene_median_dictionary_gc30M.pkl``).

    Returns
    -------
    The validated pair; see :func:`validate_dictionaries` for the checks.
    """
    token_dictionary = _load_pickle(token_dictionary_path, what=TOKEN_DICTIONARY)
    gene_median_dictionary = _load_pickle(gene_median_dictionary_path, what=GENE_MEDIAN_DICTIONARY)
    check_dictionary_files(
        {
            TOKEN_DICTIONARY: (Path(token_dictionary_path), token_dictionary),
            GENE_MEDIAN_DICTIONARY: (Path(gene_median_dictionary_path), gene_median_dictionary),
        }
    )
    source = f"{token_dictionary_path} + {gene_median_dictionary_path}"
    layout = validate_dictionaries(token_dictionary, gene_median_dictionary, source=source)
    logger.info(
        "loaded %s dictionaries: %d tokens, %d medians (%s)",
        layout,
        len(token_dictionary),
        len(gene_median_dictionary),
        source,
    )
    return GeneDictionaries(dict(token_dictionary), dict(gene_median_dictionary), layout, source)


def _load_pickle(path: str | Path, *, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: {what} not found. Give the path to the pickle ({_WHERE})."
        raise MissingInputError(msg)
    check_input_file(path, what=what)
    with path.open("rb") as fh:
        try:
            return pickle.load(fh)
        except Exception as err:
            msg = (
                f"{path}: cannot unpickle the {what} ({type(err).__name__}: {err}); expected a "
                f"pickle of {EXPECTED_CONTENT.get(what, what)}: re-create it or `dvc pull`."
            )
            raise InputError(msg) from err


def describe_content(obj: Any) -> str:
    """What an unpickled object holds, in words, for messages.

    Examples: ``a dict of 25,424 str -> float, like a gene median dictionary``,
    ``a list of 3 str``, ``a pandas DataFrame of 10 rows x 2 columns ['a', 'b']``.
    """
    if isinstance(obj, Mapping):
        if not obj:
            return f"an empty {type(obj).__name__}"
        text = (
            f"a {type(obj).__name__} of {len(obj):,} {_kinds(obj.keys())} -> {_kinds(obj.values())}"
        )
        like = content_kind(obj)
        return f"{text}, like a {like}" if like else text
    if isinstance(obj, pd.DataFrame):
        return f"a pandas DataFrame of {len(obj):,} rows x {obj.shape[1]} columns {list(obj.columns[:5])}"
    if isinstance(obj, pd.Series):
        return f"a pandas Series of {len(obj):,} {obj.dtype} values"
    if isinstance(obj, np.ndarray):
        return f"a numpy array of shape {obj.shape} ({obj.dtype})"
    if isinstance(obj, list | tuple | set | frozenset):
        return f"a {type(obj).__name__} of {len(obj):,} {_kinds(obj) if obj else 'items'}"
    kind = type(obj)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return f"a {name}"


def content_kind(mapping: Mapping[Any, Any]) -> str | None:
    """Which Geneformer dictionary a mapping looks like, or ``None`` when none.

    ``"token dictionary"`` (str -> int), ``"gene median dictionary"`` (str -> float) or
    ``"gene name -> Ensembl id dictionary"`` (str -> str, Geneformer's ``gene_name_id_dict``).
    """
    if not mapping or _kinds(mapping.keys()) != "str":
        return None
    values = set(_kinds(mapping.values()).split(" | "))
    if values == {"int"}:
        return TOKEN_DICTIONARY
    if "float" in values and values <= {"float", "int"}:
        return GENE_MEDIAN_DICTIONARY
    if values == {"str"}:
        return _NAME_ID_DICTIONARY
    return None


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "str"
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    return type(value).__name__


def _kinds(values: Any) -> str:
    return " | ".join(sorted({_kind(v) for v in values}))


def check_dictionary_files(loaded: Mapping[str, tuple[Path, Any]]) -> None:
    """Refuse dictionary files that hold the wrong kind of object, or each other's content.

    Parameters
    ----------
    loaded
        ``{"token dictionary": (path, object), "gene median dictionary": (path, object)}``.

    Raises
    ------
    InputError
        Naming the file, what it holds and what was expected; one message for swapped files.
    """
    wrong = {what: _wrong_kind(what, obj) for what, (_, obj) in loaded.items()}
    (token_path, tokens), (median_path, medians) = (
        loaded[TOKEN_DICTIONARY],
        loaded[GENE_MEDIAN_DICTIONARY],
    )
    if wrong[TOKEN_DICTIONARY] == GENE_MEDIAN_DICTIONARY and wrong[GENE_MEDIAN_DICTIONARY] == (
        TOKEN_DICTIONARY
    ):
        msg = (
            f"{token_path} holds {describe_content(tokens)}, and {median_path} holds "
            f"{describe_content(medians)}: the token and gene median dictionaries are swapped; "
            f"exchange the two paths ({_WHERE})."
        )
        raise InputError(msg)
    for what, (path, obj) in loaded.items():
        if wrong[what] is not None:
            msg = (
                f"{path} holds {describe_content(obj)}, but the {what} is expected there "
                f"({EXPECTED_CONTENT[what]}); give the right pickle (params.yaml: "
                f"{_PARAM_KEY[what]}, or the CLI flag)."
            )
            raise InputError(msg)


def _wrong_kind(what: str, obj: Any) -> str | None:
    """What ``obj`` is instead of the ``what`` dictionary, or ``None`` when it may be one.

    Dicts that look like no known kind pass, so :func:`validate_dictionaries` names the first
    bad entry.
    """
    if not isinstance(obj, Mapping):
        return type(obj).__name__
    if not obj:
        return "empty"
    kind = content_kind(obj)
    if what == GENE_MEDIAN_DICTIONARY and kind == TOKEN_DICTIONARY:
        # A str -> int median dictionary is odd but valid; special tokens give a token one away.
        return kind if PAD in obj or MASK in obj else None
    return kind if kind not in (None, what) else None


def save_dictionaries(dictionaries: GeneDictionaries, directory: str | Path) -> dict[str, Path]:
    """Pickle both dictionaries into ``directory`` (atomically, fixed protocol).

    Returns
    -------
    ``{"token_dictionary": path, "gene_median_dictionary": path}``.
    """
    directory = Path(directory)
    paths = {
        "token_dictionary": directory / TOKEN_DICTIONARY_FILE,
        "gene_median_dictionary": directory / GENE_MEDIAN_DICTIONARY_FILE,
    }
    for key, path in paths.items():
        with atomic_output(path) as tmp, tmp.open("wb") as fh:
            pickle.dump(getattr(dictionaries, key), fh, protocol=_PICKLE_PROTOCOL)
    return paths


def build_dictionaries(
    medians: Mapping[str, float], *, special_tokens: bool = False, source: str = "from data"
) -> GeneDictionaries:
    """Make a token dictionary and a median dictionary from gene medians.

    Token ids follow Geneformer's convention: special tokens first, then genes in ascending
    Ensembl-id order, contiguous. Values are plain Python ``int``/``float``, as in gc104M, so the
    tokenized ``input_ids`` are written as ``int32``.

    Parameters
    ----------
    medians
        Ensembl id -> non-zero median (e.g. from :func:`compute_nonzero_medians`).
    special_tokens
        Add ``<cls>`` 2 and ``<eos>`` 3 (V2 layout); otherwise V1 layout.
    source
        For messages.
    """
    specials = V2_SPECIAL_TOKENS if special_tokens else V1_SPECIAL_TOKENS
    clash = sorted(set(medians) & SPECIAL_TOKENS)
    if clash:
        msg = f"{source}: gene ids {clash} collide with Geneformer's special tokens."
        raise InputError(msg)
    genes = sorted(medians)
    token_dictionary = dict(specials)
    token_dictionary.update({gene: len(specials) + i for i, gene in enumerate(genes)})
    median_dictionary = {gene: float(medians[gene]) for gene in genes}
    layout = validate_dictionaries(token_dictionary, median_dictionary, source=source)
    return GeneDictionaries(token_dictionary, median_dictionary, layout, source)


def compute_nonzero_medians(
    path: str | Path,
    *,
    cells: pd.DataFrame | None = None,
    chunk_size: int = 4096,
    target_sum: float = TARGET_SUM,
    n_bins: int = 256,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Exact per-gene non-zero median of ``counts / n_counts * target_sum``, streamed from an h5ad.

    The value of a stored non-zero count ``x`` of a cell with total ``n`` is
    ``float64(x) / float64(n) * target_sum``; the median is :func:`numpy.median`'s (the middle
    value, or the mean of the two middle values). Only cells with ``filter_pass == 1`` count when
    that column exists. Memory stays bounded: pass 1 counts values per gene in ``n_bins``
    log-spaced bins, pass 2 keeps only the values in the bin(s) holding each gene's middle
    rank(s) and selects the median exactly from them.

    Parameters
    ----------
    path
        An h5ad with raw counts in ``X`` (CSR or dense), ``var["ensembl_id"]`` and, without
        ``cells``, ``obs["n_counts"]``.
    cells
        A cell table (:mod:`rosmap_geneformer.counts`) with ``n_counts``: only its cells are
        read from ``path``, and its columns stand for ``obs``.
    chunk_size
        Cells per chunk.
    target_sum
        The scale factor (Geneformer: 10,000).
    n_bins
        Histogram bins per gene in pass 1.

    Returns
    -------
    ``(medians, report)``: Ensembl id -> median for every gene with a non-zero count, sorted by
    id; the report counts cells, genes, genes without expression and duplicate ids.
    """
    from rosmap_geneformer.counts import H5adRows, cell_rows, read_cell_table, read_var

    if cells is None:
        source = H5adRows(path)
        obs, var = read_cell_table(path)
    else:
        source, obs, var = cell_rows(cells, path), cells, read_var(path)
    ids = ensembl_ids(var, source=path)
    valid = ids.notna().to_numpy() & (ids.astype(str).str.len() > 0).to_numpy()
    gene_names, gene_of_col = np.unique(ids[valid].astype(str).to_numpy(), return_inverse=True)
    col_gene = np.full(len(ids), -1, dtype=np.int64)
    col_gene[np.flatnonzero(valid)] = gene_of_col
    n_dup = int(valid.sum()) - len(gene_names)
    if n_dup:
        logger.warning(
            "%s: %d duplicate Ensembl id column(s) in var; their values are pooled per id",
            path,
            n_dup,
        )
    passing = filter_pass_mask(obs)
    n_counts = checked_n_counts(obs, passing, source=path)
    n_genes = len(gene_names)
    # log2(value) in [-32, 32) covers every realistic normalised count; outliers go to the end bins.
    lo, hi = -32.0, 32.0
    scale = n_bins / (hi - lo)

    def values(start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        chunk = source.read(start, end)
        rows, cols, x = _nonzero_entries(chunk, passing[start:end], source=path)
        gene = col_gene[cols]
        keep = gene >= 0
        rows, gene, x = rows[keep], gene[keep], x[keep]
        value = x.astype(np.float64) / n_counts[start:end][rows].astype(np.float64) * target_sum
        bins = np.floor((np.log2(value) - lo) * scale)
        bins = np.clip(bins, 0, n_bins - 1).astype(np.int64)
        return gene, bins, value

    chunks = [(s, min(s + chunk_size, source.n_obs)) for s in range(0, source.n_obs, chunk_size)]
    hist = np.zeros(n_genes * n_bins, dtype=np.int64)
    for start, end in chunks:
        gene, bins, _ = values(start, end)
        hist += np.bincount(gene * n_bins + bins, minlength=n_genes * n_bins)
    hist = hist.reshape(n_genes, n_bins)
    nnz = hist.sum(axis=1)
    expressed = nnz > 0
    k_lo, k_hi = (nnz - 1) // 2, nnz // 2
    cum = np.cumsum(hist, axis=1)
    # First bin whose cumulative count passes the rank; rows without values get bin 0 (unused).
    bin_lo = np.argmax(cum > k_lo[:, None], axis=1)
    bin_hi = np.argmax(cum > k_hi[:, None], axis=1)
    below = cum[np.arange(n_genes), bin_lo] - hist[np.arange(n_genes), bin_lo]
    del cum, hist

    kept_gene, kept_value = [], []
    for start, end in chunks:
        gene, bins, value = values(start, end)
        hit = (bins == bin_lo[gene]) | (bins == bin_hi[gene])
        kept_gene.append(gene[hit])
        kept_value.append(value[hit])
    gene = np.concatenate(kept_gene) if kept_gene else np.zeros(0, dtype=np.int64)
    value = np.concatenate(kept_value) if kept_value else np.zeros(0)
    source.close()
    order = np.lexsort((value, gene))
    gene, value = gene[order], value[order]
    first = np.searchsorted(gene, np.arange(n_genes))
    medians: dict[str, float] = {}
    for g in np.flatnonzero(expressed):
        lo_value = value[first[g] + k_lo[g] - below[g]]
        hi_value = value[first[g] + k_hi[g] - below[g]]
        medians[str(gene_names[g])] = float(
            lo_value if k_lo[g] == k_hi[g] else (lo_value + hi_value) / 2
        )
    report = {
        "cells": int(source.n_obs),
        "cells_used": int(passing.sum()),
        "genes_in_var": len(ids),
        "genes_without_ensembl_id": int((~valid).sum()),
        "duplicate_ensembl_id_columns": n_dup,
        "genes_with_median": len(medians),
        "genes_without_expression": int((~expressed).sum()),
        "max_values_held_in_pass_2": int(value.size),
    }
    logger.info(
        "%s: non-zero medians of %d genes from %d cells (%d genes never expressed, left out)",
        path,
        len(medians),
        report["cells_used"],
        report["genes_without_expression"],
    )
    return medians, report


def _nonzero_entries(
    chunk: Any, passing: np.ndarray, *, source: str | Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (chunk-local), columns and values of the non-zero counts of passing rows."""
    from scipy import sparse

    from rosmap_geneformer.counts import check_count_values

    if sparse.issparse(chunk):
        csr = sparse.csr_matrix(chunk)
        rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
        cols, x = csr.indices, csr.data
    else:
        rows, cols = np.nonzero(chunk)
        x = chunk[rows, cols]
    keep = passing[rows] & (x != 0)
    rows, cols, x = rows[keep], cols[keep], x[keep]
    check_count_values(x, source=source)
    return rows, cols.astype(np.int64), x
