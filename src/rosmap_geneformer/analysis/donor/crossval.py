"""Every donor method on the same folds; out-of-fold and test scores, thresholds and metrics.

- **Folds**: repeated, stratified k-fold over the cross-validation donors (train and val), with
  the donor as the unit (scikit-learn's ``RepeatedStratifiedKFold`` on one row per donor, so a
  donor's cells never sit on both sides). Every method sees the same folds. Test donors are never
  in a fold: each method is refitted once on all cross-validation donors and scores them once.
- **Thresholds** are chosen on training donors: the cut with the highest balanced accuracy
  (Youden's J) on a method's out-of-fold scores, averaged over repeats. The fine-tuned classifier,
  trained once by ``train``, takes its cut from the val donors, which it never trained on.
- **Metrics**: AUROC per fold (mean and sd over folds and repeats, as scAGG reports it), a 95%
  t-interval of the mean over repeats (it reflects how the split falls, not new donors), the
  pooled out-of-fold AUROC with a bootstrap interval over donors, and on test: AUROC, accuracy and
  balanced accuracy at the chosen threshold with bootstrap intervals over donors.
- **Paired comparison** with the reference method (pseudobulk): the AUROC difference on the same
  donors with a paired, class-stratified bootstrap interval and p-value, on test and on the pooled
  out-of-fold scores.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from rosmap_geneformer.analysis.donor.methods import DonorMethod, Scored
from rosmap_geneformer.analysis.evaluation.patient_level import (
    bootstrap_patient_ci,
    paired_auroc_difference,
)
from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fold:
    """One fold of one repeat: the donors a method is fitted on and the donors it scores."""

    repeat: int
    fold: int
    train: tuple[str, ...]
    held_out: tuple[str, ...]


def donor_folds(donors: pd.DataFrame, *, n_splits: int, n_repeats: int, seed: int) -> list[Fold]:
    """Repeated stratified k-fold over ``donors`` (index: donor id, column ``label``).

    Raises
    ------
    InputError
        When a class has fewer donors than folds.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold

    donors = donors.sort_index()
    labels = donors["label"].to_numpy(dtype=np.int64)
    smallest = int(np.bincount(labels, minlength=2).min())
    if smallest < n_splits:
        msg = (
            f"donor.cv.n_splits={n_splits}: the cross-validation donors (train and val) hold "
            f"only {smallest} donor(s) of one class; lower donor.cv.n_splits to at most "
            f"{max(smallest, 2)} in params.yaml, or add donors."
        )
        raise InputError(msg)
    splitter = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed)
    ids = donors.index.to_numpy()
    return [
        Fold(
            repeat=i // n_splits,
            fold=i % n_splits,
            train=tuple(ids[train]),
            held_out=tuple(ids[held]),
        )
        for i, (train, held) in enumerate(splitter.split(ids, labels))
    ]


def fold_seed(seed: int, repeat: int, fold: int) -> int:
    """A seed per fit, independent of the order fits run in."""
    return int(np.random.SeedSequence([seed, repeat, fold]).generate_state(1)[0] % (2**31))


@dataclass
class DonorScores:
    """All scores of a run, long format (``method``, ``patient_id``, ``label``, ``score``).

    Attributes
    ----------
    oof
        Out-of-fold scores, with ``repeat`` and ``fold``.
    test
        Test donors, each method refitted on all cross-validation donors.
    val
        Val donors' scores of methods that are not cross-validated (their threshold).
    cells
        Per-cell details of the test fits (attention), with ``method``.
    """

    oof: pd.DataFrame
    test: pd.DataFrame
    val: pd.DataFrame
    cells: pd.DataFrame


def _rows(
    method: str, donors: Sequence[str], labels: pd.Series, scored: Scored, **extra: Any
) -> pd.DataFrame:
    scores = np.asarray(scored.scores, dtype=np.float64)
    if scores.shape != (len(donors),):
        msg = f"method {method}: returned {scores.shape} scores for {len(donors)} donors."
        raise RuntimeError(msg)
    return pd.DataFrame(
        {
            "method": method,
            **extra,
            "patient_id": list(donors),
            "label": labels.loc[list(donors)].to_numpy(dtype=np.int64),
            "score": scores,
        }
    )


def run_methods(
    methods: Sequence[DonorMethod],
    donors: pd.DataFrame,
    *,
    folds: Sequence[Fold],
    cv_donors: Sequence[str],
    test_donors: Sequence[str],
    val_donors: Sequence[str] = (),
    seed: int = 0,
) -> DonorScores:
    """Fit and score every method on every fold, then once on all CV donors for test.

    Parameters
    ----------
    methods
        The methods; those with ``cross_validated`` False only score val and test.
    donors
        Index: donor id; column ``label``.
    folds
        From :func:`donor_folds` over ``cv_donors``.
    cv_donors, test_donors, val_donors
        Donor ids; ``val_donors`` (a subset of ``cv_donors``) sets the threshold of methods that
        are not cross-validated.
    seed
        The run's seed (each fit gets :func:`fold_seed`).
    """
    labels = donors["label"]
    oof, test, val, cells = [], [], [], []
    fitted = [m for m in methods if m.cross_validated]
    for fold in tqdm(folds, desc="donor folds", unit="fold", disable=None):
        y = labels.loc[list(fold.train)].to_numpy(dtype=np.int64)
        for method in fitted:
            scored = method.fit_score(
                fold.train, y, fold.held_out, seed=fold_seed(seed, fold.repeat, fold.fold)
            )
            oof.append(
                _rows(
                    method.name, fold.held_out, labels, scored, repeat=fold.repeat, fold=fold.fold
                )
            )
    y_cv = labels.loc[list(cv_donors)].to_numpy(dtype=np.int64)
    for method in methods:
        logger.info("donor method %s: scoring the %d test donors", method.name, len(test_donors))
        scored = method.fit_score(cv_donors, y_cv, test_donors, seed=seed)
        test.append(_rows(method.name, test_donors, labels, scored))
        if scored.cells is not None:
            cells.append(scored.cells.assign(method=method.name))
        if not method.cross_validated and len(val_donors):
            val.append(
                _rows(
                    method.name,
                    val_donors,
                    labels,
                    method.fit_score((), y_cv[:0], val_donors, seed=seed),
                )
            )

    def frame(parts: list[pd.DataFrame]) -> pd.DataFrame:
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    return DonorScores(oof=frame(oof), test=frame(test), val=frame(val), cells=frame(cells))


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The score cut (``score >= cut`` is AD) with the highest balanced accuracy; ``None`` with
    one class. Ties go to the highest cut."""
    from sklearn.metrics import roc_curve

    if len(np.unique(labels)) < 2:
        return None
    fpr, tpr, cuts = roc_curve(labels, scores)
    n_pos = int(np.sum(np.asarray(labels) == 1))
    n_neg = len(labels) - n_pos
    # Youden's J = tp / P - fp / N, compared exactly as tp * N - fp * P: in rates, two equal Js
    # can differ in the last bit and the tie would not go to the highest cut.
    j = np.rint(tpr * n_pos) * n_neg - np.rint(fpr * n_neg) * n_pos
    finite = np.isfinite(cuts)
    best = int(np.argmax(np.where(finite, j, -np.inf)))
    return float(cuts[best])


def pooled_oof(oof: pd.DataFrame, method: str) -> pd.DataFrame:
    """One row per donor: its out-of-fold score averaged over repeats (sorted by donor)."""
    rows = oof[oof["method"] == method]
    return (
        rows.groupby("patient_id", sort=True)
        .agg(label=("label", "first"), score=("score", "mean"))
        .reset_index()
    )


def _fill_missing(scores: pd.DataFrame, prior: float) -> tuple[pd.DataFrame, int]:
    # A donor without a cell the method reads (e.g. none of the task's cell types) gets the prior.
    missing = int(scores["score"].isna().sum())
    return scores.assign(score=scores["score"].fillna(prior)), missing


def _patients(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.rename(columns={"score": "mean_p_positive"})[
        ["patient_id", "label", "mean_p_positive"]
    ]


def _with_ci(prefix: str, values: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric, entry in values.items():
        out[f"{prefix}{metric}"] = entry["value"]
        out[f"{prefix}{metric}_ci_low"] = entry["ci_low"]
        out[f"{prefix}{metric}_ci_high"] = entry["ci_high"]
    return out


def fold_aurocs(oof: pd.DataFrame, method: str) -> pd.DataFrame:
    """AUROC of each (repeat, fold) of a method's out-of-fold scores."""
    from sklearn.metrics import roc_auc_score

    rows = oof[oof["method"] == method]
    out = []
    for (repeat, fold), part in rows.groupby(["repeat", "fold"], sort=True):
        part = part.dropna(subset=["score"])
        if part["label"].nunique() == 2:
            out.append(
                {
                    "repeat": repeat,
                    "fold": fold,
                    "auroc": roc_auc_score(part["label"], part["score"]),
                }
            )
    return pd.DataFrame(out, columns=["repeat", "fold", "auroc"])


def summarize(
    scores: DonorScores,
    methods: Sequence[DonorMethod],
    *,
    reference: str | None,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, float | None]]:
    """Metrics per method (flat keys for ``dvc exp show``) and each method's threshold."""
    from scipy import stats

    metrics: dict[str, dict[str, Any]] = {}
    thresholds: dict[str, float | None] = {}
    reference_cv = (
        pooled_oof(scores.oof, reference)
        if reference is not None and not scores.oof.empty
        else None
    )
    reference_test = (
        scores.test[scores.test["method"] == reference].set_index("patient_id")
        if reference is not None
        else None
    )
    for method in methods:
        name = method.name
        entry: dict[str, Any] = {"cross_validated": method.cross_validated}
        test = scores.test[scores.test["method"] == name].reset_index(drop=True)
        if method.cross_validated:
            pooled = pooled_oof(scores.oof, name)
            prior = float(pooled["label"].mean())
            pooled, entry["cv_donors_without_score"] = _fill_missing(pooled, prior)
            per_fold = fold_aurocs(scores.oof, name)
            per_repeat = per_fold.groupby("repeat")["auroc"].mean().to_numpy()
            entry["cv_auroc"] = float(per_fold["auroc"].mean())
            entry["cv_auroc_sd"] = (
                float(per_fold["auroc"].std(ddof=1)) if len(per_fold) > 1 else None
            )
            if len(per_repeat) > 1:
                half = (
                    stats.t.ppf(0.975, len(per_repeat) - 1)
                    * per_repeat.std(ddof=1)
                    / np.sqrt(len(per_repeat))
                )
                entry["cv_auroc_repeats_ci_low"] = float(per_repeat.mean() - half)
                entry["cv_auroc_repeats_ci_high"] = float(per_repeat.mean() + half)
            ci = bootstrap_patient_ci(_patients(pooled), n_boot=n_boot, seed=seed)
            entry["cv_pooled_auroc"] = ci["auroc"]["value"]
            entry["cv_pooled_auroc_ci_low"] = ci["auroc"]["ci_low"]
            entry["cv_pooled_auroc_ci_high"] = ci["auroc"]["ci_high"]
            threshold = youden_threshold(pooled["label"].to_numpy(), pooled["score"].to_numpy())
            entry["threshold_from"] = "out-of-fold scores of the train and val donors"
            if reference_cv is not None and name != reference:
                joined = pooled.merge(reference_cv, on="patient_id", suffixes=("", "_ref"))
                joined["score_ref"] = joined["score_ref"].fillna(prior)
                diff = paired_auroc_difference(
                    joined["label"], joined["score"], joined["score_ref"], n_boot=n_boot, seed=seed
                )
                entry.update(
                    {f"cv_vs_{reference}_{k}": v for k, v in diff.items() if k != "n_boot"}
                )
        else:
            val = scores.val[scores.val["method"] == name] if not scores.val.empty else scores.val
            if len(val):
                prior = float(val["label"].mean())
                val, entry["val_donors_without_score"] = _fill_missing(val, prior)
                threshold = youden_threshold(val["label"].to_numpy(), val["score"].to_numpy())
                entry["threshold_from"] = "val donors (the model was trained on train donors)"
            else:
                prior, threshold = 0.5, 0.5
                entry["threshold_from"] = "fixed 0.5 (no val donors)"
        test, entry["test_donors_without_score"] = _fill_missing(test, prior)
        thresholds[name] = threshold
        entry["threshold"] = threshold
        cut = threshold if threshold is not None else 0.5
        entry.update(
            _with_ci(
                "test_",
                bootstrap_patient_ci(_patients(test), n_boot=n_boot, seed=seed, threshold=cut),
            )
        )
        if reference_test is not None and name != reference and len(reference_test):
            ref = reference_test.loc[test["patient_id"], "score"].to_numpy()
            diff = paired_auroc_difference(
                test["label"], test["score"], ref, n_boot=n_boot, seed=seed
            )
            entry.update({f"test_vs_{reference}_{k}": v for k, v in diff.items() if k != "n_boot"})
        metrics[name] = entry
    return metrics, thresholds
