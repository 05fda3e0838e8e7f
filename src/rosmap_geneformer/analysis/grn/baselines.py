"""Network inference baselines, on the same cells, genes and candidate edges as the model.

- co-expression: absolute Spearman correlation of library-size-normalised counts, regulator vs
  target, over the regulator's cells;
- GRNBoost2 (Moerman et al. 2019; ``rustscenic``'s dask-free implementation) and GENIE3
  (Huynh-Thu et al. 2010, on scikit-learn's random forests): per target, a regression of its
  log1p CP10k expression on every regulator's over the cells of all regulators; a regulator's
  importance is the edge's score;
- random scores (seeded).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from scipy import sparse, stats
from sklearn.ensemble import RandomForestRegressor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


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


def _genie3_target(
    features: np.ndarray, target: np.ndarray, *, n_trees: int, seed: int
) -> np.ndarray:
    """Importances of the feature columns for one target (NaN when the target is constant)."""
    if np.ptp(target) == 0:
        return np.full(features.shape[1], np.nan)
    forest = RandomForestRegressor(
        n_estimators=n_trees, max_features="sqrt", random_state=seed, n_jobs=1
    )
    forest.fit(features, (target - target.mean()) / target.std())
    return forest.feature_importances_


@dataclass(frozen=True)
class RegulatorExpression:
    """log1p CP10k expression of regulators and targets over the cells of all regulators."""

    expression: np.ndarray  # cells x genes
    genes: list[int]  # tokens, sorted
    regulators: list[int]  # tokens with a column, sorted
    targets: list[int]  # edge targets with a column, sorted

    def column(self, token: int) -> int:
        """The column of a gene token."""
        return self.genes.index(token)


def regulator_expression(
    edges: pd.DataFrame,
    cells: Mapping[int, np.ndarray],
    counts: Any,
    token_columns: Mapping[int, int],
    *,
    n_counts: np.ndarray | None = None,
) -> RegulatorExpression | None:
    """The expression the regression baselines learn from (``None`` with under 3 cells)."""
    counts = sparse.csr_matrix(counts) if not sparse.issparse(counts) else counts.tocsr()
    totals = np.asarray(counts.sum(axis=1)).ravel() if n_counts is None else np.asarray(n_counts)
    regulators = sorted(int(r) for r in cells if int(r) in token_columns)
    rows = np.unique(np.concatenate([np.zeros(0, np.int64), *(cells[r] for r in regulators)]))
    if not regulators or rows.size < 3:
        return None
    targets = sorted(int(t) for t in edges["target"].unique() if int(t) in token_columns)
    genes = sorted(set(regulators) | set(targets))
    block = counts[rows][:, [token_columns[g] for g in genes]].toarray().astype(np.float64)
    expression = np.log1p(1e4 * block / np.maximum(totals[rows], 1.0)[:, None])
    return RegulatorExpression(expression, genes, regulators, targets)


def _edge_scores(
    edges: pd.DataFrame, scores: Mapping[tuple[int, int], float], data: RegulatorExpression
) -> np.ndarray:
    """Per edge row, its score: 0 for a pair of modelled genes without one, NaN for the rest."""
    modelled = set(data.regulators), set(data.targets)
    out = np.full(len(edges), np.nan)
    pairs = zip(edges["regulator"].astype(int), edges["target"].astype(int), strict=True)
    for i, (r, t) in enumerate(pairs):
        if r in modelled[0] and t in modelled[1] and r != t:
            out[i] = scores.get((r, t), 0.0)
    return out


def grnboost2_baseline(
    edges: pd.DataFrame,
    cells: Mapping[int, np.ndarray],
    counts: Any,
    token_columns: Mapping[int, int],
    *,
    n_counts: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """GRNBoost2 importance of regulator for target, per edge (``rustscenic``'s implementation).

    Parameters are those of :func:`genie3_baseline`. ``rustscenic`` fits, per target, gradient
    boosted trees on the regulators with arboreto's defaults (at most 5,000 rounds, learning
    rate 0.01, early stopping), in Rust and without dask; the same seed gives the same scores.

    Returns
    -------
    One score per edge row (0 for a pair GRNBoost2 gave no importance; NaN where a gene has no
    column).
    """
    from rustscenic.grn import infer

    data = regulator_expression(edges, cells, counts, token_columns, n_counts=n_counts)
    if data is None:
        return np.full(len(edges), np.nan)
    table = infer(
        (data.expression.astype(np.float32), [str(g) for g in data.genes]),
        [str(r) for r in data.regulators],
        seed=seed,
        verbose=False,
    )
    found = {
        (int(r), int(t)): float(v)
        for r, t, v in zip(table["TF"], table["target"], table["importance"], strict=True)
    }
    logger.info(
        "GRNBoost2 (rustscenic): %d targets over %d cells and %d regulators",
        len(data.targets),
        data.expression.shape[0],
        len(data.regulators),
    )
    return _edge_scores(edges, found, data)


def genie3_baseline(
    edges: pd.DataFrame,
    cells: Mapping[int, np.ndarray],
    counts: Any,
    token_columns: Mapping[int, int],
    *,
    n_counts: np.ndarray | None = None,
    n_trees: int = 100,
    seed: int = 0,
    n_jobs: int = 1,
    progress: bool = True,
) -> np.ndarray:
    """GENIE3 importance of regulator for target, per edge.

    Parameters
    ----------
    edges
        Candidate edges (``regulator``, ``target`` tokens).
    cells
        Regulator token -> row indices into ``counts``; the models see the union of them.
    counts
        Raw counts, cells x genes (dense or sparse).
    token_columns
        Gene token -> column of ``counts``.
    n_counts
        Per-cell totals for library-size normalisation; ``None``: row sums of ``counts``.
    n_trees
        Trees per forest (GENIE3's default is 1,000).
    seed
        Seeds every forest (target ``t`` uses ``seed + t``), so the scores do not depend on
        ``n_jobs``.
    n_jobs
        Forests fitted in parallel (joblib).
    progress
        Show a progress bar.

    Returns
    -------
    One score per edge row: the regulator's share of the variance reduction of the target's
    forest (a target that is itself a regulator is not its own feature); NaN where a gene has
    no column or the target is constant over the cells.
    """
    data = regulator_expression(edges, cells, counts, token_columns, n_counts=n_counts)
    if data is None:
        return np.full(len(edges), np.nan)
    regulators = data.regulators
    features = data.expression[:, [data.column(r) for r in regulators]]

    def fit(target: int) -> np.ndarray:
        others = [k for k, r in enumerate(regulators) if r != target]
        out = np.full(len(regulators), np.nan)
        out[others] = _genie3_target(
            features[:, others],
            data.expression[:, data.column(target)],
            n_trees=n_trees,
            seed=seed + target,
        )
        return out

    jobs = (delayed(fit)(t) for t in tqdm(data.targets, desc="GENIE3", disable=not progress))
    importances = Parallel(n_jobs=n_jobs)(jobs)
    found = {
        (r, t): float(values[k])
        for t, values in zip(data.targets, importances, strict=True)
        for k, r in enumerate(regulators)
    }
    logger.info(
        "GENIE3: %d forests of %d trees over %d cells and %d regulators",
        len(data.targets),
        n_trees,
        data.expression.shape[0],
        len(regulators),
    )
    return _edge_scores(edges, found, data)
