"""Perturbed encodings of a cell (``geneformer-spec.md`` section 7): what deleting or
overexpressing a gene does to its token list, built with array indexing, not per-token Python.

- **delete**: the gene's token is removed; the cell gets one token shorter.
- **overexpress** (genes present in the cell): the gene's token moves to the front, position 0 in
  V1 and position 1, right after ``<cls>``, in V2; the other tokens keep their order.
  :func:`overexpress_tokens` also implements the gene-list form (genes inserted at the front when
  absent, then truncation to the model's length keeping ``<eos>``).

:mod:`~rosmap_geneformer.analysis.perturbation.engine` runs them through the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rosmap_geneformer.errors import InputError

PERTURB_TYPES = ("delete", "overexpress")


def check_type(perturb_type: str) -> None:
    """Refuse a perturbation type other than delete or overexpress."""
    if perturb_type not in PERTURB_TYPES:
        msg = f"perturb_type={perturb_type!r}: use one of {list(PERTURB_TYPES)}."
        raise InputError(msg)


def gene_slice(length: int, *, special_tokens: bool) -> slice:
    """Positions of the genes in a cell of ``length`` tokens (``<cls>``/``<eos>`` excluded)."""
    return slice(1, length - 1) if special_tokens else slice(0, length)


def delete_tokens(input_ids: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
    """Geneformer's deletion: remove every occurrence of ``tokens`` (perturbed together).

    Parameters
    ----------
    input_ids
        A cell's rank-value encoding.
    tokens
        Gene tokens to delete; tokens absent from the cell are ignored.
    """
    ids = np.asarray(input_ids)
    return ids[~np.isin(ids, np.asarray(tokens, dtype=ids.dtype))]


def overexpress_tokens(
    input_ids: Sequence[int],
    tokens: Sequence[int],
    *,
    special_tokens: bool,
    max_length: int | None = None,
) -> np.ndarray:
    """Geneformer's overexpression of a gene set: the genes go to the front.

    Genes present in the cell move to the front in their original relative order; absent genes
    are inserted there too, after the present ones in the order given. The front is position 0
    (V1) or 1, after ``<cls>`` (V2). The result is truncated to ``max_length``; in V2 the last
    token stays ``<eos>``.

    Parameters
    ----------
    input_ids
        A cell's rank-value encoding.
    tokens
        Gene tokens to overexpress (together).
    special_tokens
        Whether the cell starts with ``<cls>`` and ends with ``<eos>``.
    max_length
        The model's input size; ``None``: no truncation.
    """
    ids = np.asarray(input_ids)
    tokens = np.asarray(tokens, dtype=ids.dtype)
    present = np.isin(ids, tokens)
    moved = ids[present]
    if special_tokens:
        present[[0, -1]] = False
        moved = ids[present]
    absent = tokens[~np.isin(tokens, ids)]
    front = np.concatenate([moved, absent]).astype(ids.dtype)
    rest = ids[~present]
    if special_tokens:
        out = np.concatenate([rest[:1], front, rest[1:]])
        if max_length is not None and len(out) > max_length:
            out = np.concatenate([out[: max_length - 1], out[-1:]])
        return out
    out = np.concatenate([front, rest])
    return out[:max_length] if max_length is not None else out


def perturbation_index(
    length: int, positions: np.ndarray, *, perturb_type: str, special_tokens: bool
) -> np.ndarray:
    """For each single-gene perturbation, the original position of every perturbed position.

    Parameters
    ----------
    length
        Tokens in the cell.
    positions
        Positions perturbed, one perturbation each.
    perturb_type
        ``"delete"`` (rows of ``length - 1``) or ``"overexpress"`` (rows of ``length``, the gene
        moved to the front).
    special_tokens
        V2 layout (the front is position 1).

    Returns
    -------
    ``int64`` array, perturbations x perturbed length: ``perturbed = input_ids[index]``, and the
    same index aligns the perturbed cell's gene embeddings with the original's.
    """
    check_type(perturb_type)
    p = np.asarray(positions, dtype=np.int64)[:, None]
    if perturb_type == "delete":
        j = np.arange(length - 1, dtype=np.int64)[None, :]
        return j + (j >= p)
    front = 1 if special_tokens else 0
    j = np.arange(length, dtype=np.int64)[None, :]
    shifted = np.where(j <= p, j - 1, j)
    return np.where(j < front, j, np.where(j == front, p, shifted))


def perturbation_batch(
    input_ids: Sequence[int],
    positions: Sequence[int],
    *,
    perturb_type: str,
    special_tokens: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """All single-gene perturbations of one cell as one matrix.

    Parameters
    ----------
    input_ids
        The cell's tokens.
    positions
        Positions to perturb (genes only; ``<cls>``/``<eos>`` are refused).
    perturb_type
        ``"delete"`` or ``"overexpress"``.
    special_tokens
        V2 layout.

    Returns
    -------
    The perturbed encodings (perturbations x length, the input's dtype) and their
    :func:`perturbation_index`.
    """
    ids = np.asarray(input_ids)
    positions = np.asarray(positions, dtype=np.int64)
    genes = gene_slice(len(ids), special_tokens=special_tokens)
    if positions.size and (
        positions.min() < genes.start
        or positions.max() >= genes.stop
        or positions.max() >= len(ids)
    ):
        msg = (
            f"positions {positions.tolist()} include a non-gene position for a cell of "
            f"{len(ids)} tokens (genes are positions {genes.start}..{genes.stop - 1})."
        )
        raise InputError(msg)
    index = perturbation_index(
        len(ids), positions, perturb_type=perturb_type, special_tokens=special_tokens
    )
    return ids[index], index
