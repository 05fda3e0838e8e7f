"""Donor classifiers with one interface: fit on some donors, score others.

Every method is fitted on the training donors of a fold only, and everything it learns (gene
choice, imputation, scaling, the penalty) is inside that fit:

- :class:`FeatureLogistic`: a scikit-learn pipeline over one row of features per donor
  (pseudobulk, cell-type proportions): mean imputation, optionally the ``n_top`` genes of highest
  variance among the training donors (unsupervised), standardisation, and a penalised logistic
  regression whose ``C`` is chosen by an inner stratified cross-validation on the training donors
  (``GridSearchCV``, ROC AUC).
- :class:`CellLogistic`: a cell-level logistic regression on cell embeddings, each cell labelled
  with its donor's status, ``C`` chosen by an inner cross-validation grouped by donor; a donor's
  score is the mean P(AD) of its cells: the "cell-level classifier aggregated to donors" of the
  literature.
- :class:`PrecomputedScores`: scores that exist already (the fine-tuned classifier, trained once
  by ``train``); it cannot be cross-validated here, so it only scores the donors it was given.

Multiple-instance learning is in :mod:`rosmap_geneformer.analysis.donor.mil`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)


@dataclass
class Scored:
    """A method's scores of the donors it was asked about (higher = more likely AD), in order,
    and optional per-cell details (attention)."""

    scores: np.ndarray
    cells: pd.DataFrame | None = None


class DonorMethod(Protocol):
    """What the cross-validation needs from a method."""

    name: str
    description: str
    cross_validated: bool

    def fit_score(
        self, train: Sequence[str], labels: np.ndarray, score: Sequence[str], *, seed: int
    ) -> Scored:
        """Fit on the donors ``train`` (0/1 ``labels``), return the scores of ``score``."""
        ...


def _column_variance(features: np.ndarray, _labels: Any) -> np.ndarray:
    # SelectKBest's score function; the labels are ignored, so the choice is unsupervised.
    return np.nanvar(features, axis=0)


@dataclass(frozen=True)
class _VarianceRankInBlock:
    """SelectKBest's score function for features in blocks (one block per cell type): minus each
    column's variance rank within its block, so the ``k`` best are the top of every block alike.
    Label-free, like :func:`_column_variance`."""

    blocks: tuple[str, ...]

    def __call__(self, features: np.ndarray, _labels: Any) -> np.ndarray:
        variance = np.nanvar(features, axis=0)
        labels = np.asarray(self.blocks)
        score = np.empty(len(variance))
        for block in np.unique(labels):
            columns = np.flatnonzero(labels == block)
            order = np.argsort(-variance[columns], kind="stable")
            score[columns[order]] = -np.arange(len(columns), dtype=np.float64)
        return score


def inner_folds(labels: np.ndarray, *, max_splits: int, seed: int) -> Any:
    """Stratified folds for choosing ``C`` inside the training donors (at most ``max_splits``,
    at most the smaller class's size, at least 2)."""
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(labels, minlength=2).min())
    if smallest < 2:
        msg = (
            f"a training fold has {smallest} donor(s) of one class: too few to choose the penalty. "
            "Add donors or lower donor.cv.n_splits in params.yaml."
        )
        raise InputError(msg)
    return StratifiedKFold(n_splits=min(max_splits, smallest), shuffle=True, random_state=seed)


def logistic(*, C: float = 1.0, l1_ratio: float, max_iter: int, seed: int) -> Any:
    """A seeded, class-balanced logistic regression: liblinear for pure L1 or L2 (on a few dozen
    donors x thousands of genes about 200x faster than saga), saga for an elastic net."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(
        C=C,
        l1_ratio=l1_ratio,
        solver="liblinear" if l1_ratio in (0, 1) else "saga",
        class_weight="balanced",
        max_iter=max_iter,
        random_state=seed,
    )


@dataclass
class FeatureLogistic:
    """Penalised logistic regression on one feature row per donor (see the module docstring).

    Attributes
    ----------
    features
        Donors x features (index: donor ids); ``NaN`` is imputed with the training donors' mean.
    n_top
        Keep this many features of highest variance among the training donors; ``None``: all.
    blocks
        The block (cell type) of each feature column, or ``None``. With blocks, ``n_top`` is per
        block: a single cut over all blocks takes almost everything from the smallest cell types,
        whose pseudobulks of a few cells vary most (on the demo 1,812 of 2,000 genes from Vas and
        Mic, and a cross-validated AUROC near chance).
    C
        Grid of inverse penalties, chosen by inner cross-validation.
    l1_ratio
        0: ridge, 1: LASSO.
    """

    name: str
    description: str
    features: pd.DataFrame
    C: Sequence[float]
    l1_ratio: float = 1.0
    n_top: int | None = None
    blocks: Sequence[str] | None = None
    max_iter: int = 5000
    inner_splits: int = 3
    cross_validated: bool = True
    chosen: list[dict[str, Any]] = field(default_factory=list)

    def pipeline(self, usable: np.ndarray, seed: int) -> Any:
        """The fold's pipeline over the feature columns where ``usable`` is true."""
        from sklearn.feature_selection import SelectKBest
        from sklearn.impute import SimpleImputer
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        # keep_empty_features: an inner split may lack every value of a column the fold has, and the
        # column count must not change under the per-block selection.
        imputer = SimpleImputer(strategy="mean", keep_empty_features=True)
        steps: list[tuple[str, Any]] = [("impute", imputer)]
        if self.n_top is not None and self.blocks is not None:
            blocks = tuple(np.asarray(self.blocks)[usable])
            sizes = pd.Series(blocks).value_counts()
            k = int(np.minimum(sizes, self.n_top).sum())
            if k < len(blocks):
                score = _VarianceRankInBlock(blocks)
                steps.append(("top_variance_per_block", SelectKBest(score, k=k)))
        elif self.n_top is not None and self.n_top < int(usable.sum()):
            steps.append(("top_variance", SelectKBest(_column_variance, k=self.n_top)))
        steps.append(("scale", StandardScaler()))
        steps.append(("model", logistic(l1_ratio=self.l1_ratio, max_iter=self.max_iter, seed=seed)))
        return Pipeline(steps)

    def fit_score(
        self, train: Sequence[str], labels: np.ndarray, score: Sequence[str], *, seed: int
    ) -> Scored:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import GridSearchCV

        x_train = self.features.loc[list(train)].to_numpy(dtype=np.float64)
        # Columns no training donor has a value for would be dropped by the imputer: drop them
        # here, so the column count is known.
        usable = ~np.isnan(x_train).all(axis=0)
        search = GridSearchCV(
            self.pipeline(usable, seed),
            {"model__C": [float(c) for c in self.C]},
            scoring="roc_auc",
            cv=inner_folds(labels, max_splits=self.inner_splits, seed=seed),
            refit=True,
            n_jobs=1,
        )
        with warnings.catch_warnings():
            # saga on a few dozen donors: a C that does not converge is scored and usually lost.
            warnings.simplefilter("ignore", ConvergenceWarning)
            search.fit(x_train[:, usable], labels)
        inner_auroc = float(search.best_score_)
        self.chosen.append(
            {
                "C": search.best_params_["model__C"],
                "inner_auroc": inner_auroc if np.isfinite(inner_auroc) else None,
            }
        )
        x_score = self.features.loc[list(score)].to_numpy(dtype=np.float64)[:, usable]
        return Scored(scores=search.predict_proba(x_score)[:, 1])


@dataclass
class CellLogistic:
    """Cell-level logistic regression on embeddings, averaged per donor (module docstring).

    Attributes
    ----------
    embeddings
        Cells x dimensions.
    donors
        The donor of each cell.
    """

    name: str
    description: str
    embeddings: np.ndarray
    donors: np.ndarray
    C: Sequence[float]
    max_iter: int = 2000
    inner_splits: int = 3
    cross_validated: bool = True
    chosen: list[dict[str, Any]] = field(default_factory=list)

    def fit_score(
        self, train: Sequence[str], labels: np.ndarray, score: Sequence[str], *, seed: int
    ) -> Scored:
        from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        label_of = dict(zip(train, labels, strict=True))
        rows = np.flatnonzero(np.isin(self.donors, list(train)))
        y = np.array([label_of[d] for d in self.donors[rows]], dtype=np.int64)
        n_splits = min(self.inner_splits, int(np.bincount(labels, minlength=2).min()))
        if n_splits < 2:
            msg = (
                "a training fold has fewer than 2 donors of one class: too few to choose the "
                "penalty. Add donors or lower donor.cv.n_splits in params.yaml."
            )
            raise InputError(msg)
        search = GridSearchCV(
            Pipeline(
                [
                    ("scale", StandardScaler()),
                    ("model", logistic(l1_ratio=0.0, max_iter=self.max_iter, seed=seed)),
                ]
            ),
            {"model__C": [float(c) for c in self.C]},
            scoring="roc_auc",
            cv=StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed),
            refit=True,
            n_jobs=1,
        )
        search.fit(self.embeddings[rows], y, groups=self.donors[rows])
        inner_auroc = float(search.best_score_)
        self.chosen.append(
            {
                "C": search.best_params_["model__C"],
                "inner_auroc": inner_auroc if np.isfinite(inner_auroc) else None,
            }
        )
        return Scored(scores=mean_per_donor(self.embeddings, self.donors, score, search))


def mean_per_donor(
    embeddings: np.ndarray, donors: np.ndarray, wanted: Sequence[str], model: Any
) -> np.ndarray:
    """Mean P(positive) of each wanted donor's cells under a fitted classifier (``NaN`` for a
    donor without cells)."""
    rows = np.flatnonzero(np.isin(donors, list(wanted)))
    if rows.size == 0:
        return np.full(len(wanted), np.nan)
    p = model.predict_proba(embeddings[rows])[:, 1]
    means = pd.Series(p).groupby(donors[rows]).mean()
    return means.reindex(list(wanted)).to_numpy(dtype=np.float64)


@dataclass
class PrecomputedScores:
    """Donor scores computed elsewhere (the fine-tuned classifier); not refitted per fold."""

    name: str
    description: str
    scores: pd.Series
    cross_validated: bool = False

    def fit_score(
        self, train: Sequence[str], labels: np.ndarray, score: Sequence[str], *, seed: int
    ) -> Scored:
        return Scored(scores=self.scores.reindex(list(score)).to_numpy(dtype=np.float64))
