"""The ``grn`` stage's regulators: names resolved to tokens, and checked against the cells
that express them (a warning while some remain, a refusal when none does)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.analysis.grn.settings import GRNSettings
from rosmap_geneformer.params import check_names, names_warning

logger = logging.getLogger(__name__)


def resolve_regulators(
    names: Sequence[str], annotation: pd.DataFrame
) -> tuple[dict[str, int], list[str]]:
    """Map regulator symbols (case-insensitive) or Ensembl ids to tokens.

    Parameters
    ----------
    names
        Symbols or Ensembl ids.
    annotation
        Token -> ``ensembl_id``, ``symbol``
        (:func:`rosmap_geneformer.analysis.perturbation.annotation.token_annotation`).

    Returns
    -------
    Name -> token for the names found, and the names not in the vocabulary.
    """
    by_id = {gene: int(t) for t, gene in annotation["ensembl_id"].items()}
    by_symbol: dict[str, int] = {}
    for t, symbol in annotation["symbol"].items():
        if symbol:
            by_symbol.setdefault(str(symbol).upper(), int(t))
    found, missing = {}, []
    for name in names:
        token = by_id.get(name, by_symbol.get(name.upper()))
        if token is None:
            missing.append(name)
        else:
            found[name] = token
    return found, missing


def cells_per_token(cells: Sequence[np.ndarray], *, chunk: int = 4096) -> np.ndarray:
    """How many of ``cells`` hold each token (index: token id; a gene appears once in a cell)."""
    counts = np.zeros(0, dtype=np.int64)
    for start in range(0, len(cells), chunk):
        part = [np.asarray(c, dtype=np.int64) for c in cells[start : start + chunk]]
        if not part:
            continue
        found = np.bincount(np.concatenate(part))
        if found.size > counts.size:
            found[: counts.size] += counts
            counts = found
        else:
            counts[: found.size] += found
    return counts


def check_regulators(
    names: Sequence[str],
    found: Mapping[str, int],
    expressed: np.ndarray,
    annotation: pd.DataFrame,
    *,
    settings: GRNSettings,
    source: str,
) -> tuple[list[str], dict[str, Any] | None]:
    """Regulators absent from the data: a warning entry while some remain, an error when none.

    Parameters
    ----------
    names
        The regulators asked for.
    found
        Those in the vocabulary (name -> token).
    expressed
        Cells per token among the cells used (:func:`cells_per_token`).
    annotation
        Token -> ``ensembl_id``, ``symbol``.
    settings
        ``params.yaml: grn``.
    source
        The tokenized dataset, named in the messages.

    Returns
    -------
    The regulators in the vocabulary but in none of the cells, and the warning entry for the
    stage's summary (logged here) or ``None`` when every regulator is in the data.

    Raises
    ------
    InputError
        When no regulator is expressed in the cells; the message lists the genes that are.
    """

    def n_cells(token: int) -> int:
        return int(expressed[token]) if token < expressed.size else 0

    not_expressed = [n for n, t in found.items() if n_cells(t) == 0]
    absent = [n for n in names if n not in found or n in not_expressed]
    if not absent:
        return not_expressed, None
    if settings.regulators_file:
        key = "grn.regulators + grn.regulators_file"
        fix = f"Fix the names in grn.regulators (params.yaml) or in {settings.regulators_file}"
    else:
        key, fix = "grn.regulators", "Fix grn.regulators in params.yaml"
    where = f"the {settings.split} cells of {source}"
    if settings.cell_types:
        where += f" (cell types {', '.join(settings.cell_types)})"
    present = [
        symbol or gene
        for token, gene, symbol in annotation[["ensembl_id", "symbol"]].itertuples()
        if n_cells(int(token)) > 0
    ]
    if len(absent) == len(names):
        check_names(absent, present, key=key, what="gene expressed", source=where, fix=f"{fix}.")
    entry = names_warning(
        absent,
        present,
        key=key,
        what="gene expressed",
        source=where,
        consequence=f"Skipped: {len(names) - len(absent)} of {len(names)} regulators remain. {fix}",
    )
    logger.warning("%s", entry["message"])
    return not_expressed, entry
