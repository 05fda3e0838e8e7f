"""Deliberately slow reference tokenizers, written from geneformer-spec.md sections 2.4-2.7.

Nothing here imports ``rosmap_geneformer``: these are independent oracles for the fast path.

- :func:`reference_tokenize` walks one cell at a time and one gene at a time, with numpy scalars
  (whose type promotion is the same as numpy arrays'), the way the spec describes each step.
- :func:`scipy_expression_tokenize` evaluates Geneformer's own matrix expression
  (``X_view / n_counts * 10_000 / medians`` then ``csr_matrix``) with scipy on chunks of cells,
  as Geneformer's h5ad path does, then ranks row by row.

Both rank by value descending and order exact ties by ``ties``: ``"token"`` (the project's
rule: ascending token id) or ``"numpy"`` (Geneformer's ``argsort(-v)`` with numpy's default,
unstable kind over the genes in var order, whose tie order depends on the CPU's sort kernel).
:func:`compare_up_to_ties` checks an output against the ``"numpy"`` order: the same up to the
order within groups of exactly equal values.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from scipy import sparse

SPECIALS = ("<pad>", "<mask>", "<cls>", "<eos>")
TARGET_SUM = 10_000


def _kept_genes(ensembl_ids: list[Any], token_dict: dict[str, Any]) -> list[tuple[int, str]]:
    # Spec 2.4/2.5.1: identity mapping of upper(id); kept iff the mapped id is a token-dict key.
    kept = []
    for j, gene in enumerate(ensembl_ids):
        if not isinstance(gene, str):
            continue
        mapped = gene.upper()
        if mapped in token_dict and mapped not in SPECIALS:
            kept.append((j, mapped))
    return kept


def _cells(obs: Any) -> list[int]:
    # Spec 2.5.2: filter_pass == 1, in obs order; every cell without the column.
    if "filter_pass" not in obs.columns:
        return list(range(len(obs)))
    return [i for i, flag in enumerate(obs["filter_pass"]) if flag == 1]


def _finish(
    ranked: np.ndarray, token_dict: dict[str, Any], model_input_size: int, special_tokens: bool
) -> list[int]:
    # Spec 2.7.
    if special_tokens:
        body = [int(t) for t in ranked[: model_input_size - 2]]
        return [int(token_dict["<cls>"]), *body, int(token_dict["<eos>"])]
    return [int(t) for t in ranked[:model_input_size]]


def _rank(values: np.ndarray, tokens: np.ndarray, ties: str) -> np.ndarray:
    # Spec 2.5.5, with exact ties by token id ("token") or as numpy's default argsort has them.
    if ties == "numpy":
        return np.argsort(-values)
    if ties == "token":
        keys = [(-float(v), int(t)) for v, t in zip(values, tokens, strict=True)]
        return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.intp)
    msg = f"ties={ties!r}: 'token' or 'numpy'"
    raise ValueError(msg)


def _labels(adata: Any, i: int, columns: list[str]) -> dict[str, Any]:
    out = {}
    for column in columns:
        if column == "cell_id" and column not in adata.obs.columns:
            out[column] = str(adata.obs_names[i])
        else:
            out[column] = adata.obs[column].iloc[i]
    return out


def reference_tokenize(
    adata: Any,
    token_dict: dict[str, Any],
    median_dict: dict[str, Any],
    *,
    model_input_size: int,
    special_tokens: bool,
    columns: list[str] = (),
    ties: str = "token",
) -> list[dict[str, Any]]:
    """One dict per output cell: ``input_ids`` (list of int), ``length``, the label columns and
    the whole ranking before truncation (``ranked`` tokens and their ``ranked_values``)."""
    kept = _kept_genes(list(adata.var["ensembl_id"]), token_dict)
    kept_col = {j: k for k, (j, _) in enumerate(kept)}
    tokens = np.array([token_dict[g] for _, g in kept])
    medians = np.array([median_dict[g] for _, g in kept])
    n_counts = adata.obs["n_counts"].to_numpy()
    is_sparse = sparse.issparse(adata.X)
    X = sparse.csr_matrix(adata.X) if is_sparse else np.asarray(adata.X)
    out = []
    for i in _cells(adata.obs):
        n = n_counts[i]
        per_gene: dict[int, Any] = {}
        if is_sparse:
            # Spec 2.5.3, sparse: x * (1/n), * 10000, * (1/m); stored entries (zeros too) kept.
            lo, hi = X.indptr[i], X.indptr[i + 1]
            for col, x in zip(X.indices[lo:hi], X.data[lo:hi], strict=True):
                if int(col) not in kept_col:
                    continue
                k = kept_col[int(col)]
                a = x * np.divide(1, n)
                b = a * TARGET_SUM
                v = b * np.divide(1, medians[k])
                # Duplicate stored entries are summed, as csr_matrix(coo) does.
                per_gene[k] = per_gene[k] + v if k in per_gene else v
        else:
            # Spec 2.5.3, dense: true division; zeros are not ranked.
            for j, k in kept_col.items():
                x = X[i, j]
                v = x / n * TARGET_SUM / medians[k]
                if v != 0:
                    per_gene[k] = v
        if not per_gene:
            continue  # spec 2.5.6: empty cells are dropped
        genes = sorted(per_gene)  # var order of the kept genes
        values = np.array([per_gene[k] for k in genes], dtype=np.float64)
        gene_tokens = tokens[np.array(genes)]
        order = _rank(values, gene_tokens, ties)
        ranked = gene_tokens[order]
        ids = _finish(ranked, token_dict, model_input_size, special_tokens)
        out.append(
            {
                "input_ids": ids,
                "length": len(ids),
                **_labels(adata, i, list(columns)),
                "ranked": [int(t) for t in ranked],
                "ranked_values": [float(v) for v in values[order]],
            }
        )
    return out


def scipy_expression_tokenize(
    adata: Any,
    token_dict: dict[str, Any],
    median_dict: dict[str, Any],
    *,
    model_input_size: int,
    special_tokens: bool,
    chunk_size: int = 512,
    ties: str = "token",
) -> list[list[int]]:
    """``input_ids`` per output cell from Geneformer's matrix expression, evaluated by scipy.

    With ``ties="token"`` exact ties are ordered by ``np.lexsort`` (stable) on the token ids.
    """
    kept = _kept_genes(list(adata.var["ensembl_id"]), token_dict)
    loc = np.array([j for j, _ in kept])
    tokens = np.array([token_dict[g] for _, g in kept])
    medians = np.array([median_dict[g] for _, g in kept])
    cells = np.array(_cells(adata.obs))
    out = []
    for start in range(0, len(cells), chunk_size):
        idx = cells[start : start + chunk_size]
        n_counts = adata.obs["n_counts"].to_numpy()[idx][:, None]
        x_view = adata.X[idx][:, loc]
        x_norm = sparse.csr_matrix(x_view / n_counts * TARGET_SUM / medians)
        for r in range(x_norm.shape[0]):
            row = x_norm[r]
            if row.data.size == 0:
                continue
            row_tokens = tokens[row.indices]
            if ties == "token":
                order = np.lexsort((row_tokens, -row.data))
            else:
                order = _rank(row.data, row_tokens, ties)
            out.append(_finish(row_tokens[order], token_dict, model_input_size, special_tokens))
    return out


def compare_up_to_ties(
    ours: list[list[int]], geneformer: list[dict[str, Any]], *, special_tokens: bool
) -> dict[str, int]:
    """Check ``ours`` against :func:`reference_tokenize` with ``ties="numpy"``, cell by cell.

    Within every group of exactly equal values (Geneformer's ``ranked_values``) ours must hold
    the same tokens, in ascending token id; a group cut by truncation keeps its lowest token ids.
    So the values come in the same sequence, and a cell without a tie among its output genes is
    identical. Returns how many cells were identical, differed only in the order of ties, and
    had a tie at all.
    """
    counts = {"identical": 0, "differ_only_in_tie_order": 0, "cells_with_ties": 0}
    assert len(ours) == len(geneformer)
    for ids, ref in zip(ours, geneformer, strict=True):
        ids = list(ids)
        assert len(ids) == ref["length"]
        genes = ids[1:-1] if special_tokens else ids
        if special_tokens:
            assert [ids[0], ids[-1]] == [ref["input_ids"][0], ref["input_ids"][-1]]
        ranked, values = ref["ranked"], ref["ranked_values"]
        start, tie = 0, False
        while start < len(genes):
            end = start + 1
            while end < len(ranked) and values[end] == values[start]:
                end += 1
            group, mine = ranked[start:end], genes[start : min(end, len(genes))]
            tie = tie or len(group) > 1
            if end <= len(genes):
                assert Counter(mine) == Counter(group), (start, mine, group)
            assert mine == sorted(group)[: len(mine)], (start, mine, group)
            start = end
        counts["cells_with_ties"] += tie
        if ids == list(ref["input_ids"]):
            counts["identical"] += 1
        else:
            assert tie, "a cell without ties must be identical"
            counts["differ_only_in_tie_order"] += 1
    return counts
