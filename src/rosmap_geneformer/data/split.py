"""Patient-level train/val/test splits, stratified by AD status, optionally balanced on covariates.

Cells of one donor never reach two splits: AD status is a donor property, and a cell-level split
would let a classifier recognise donors instead of disease.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from rosmap_geneformer.errors import InputError
from rosmap_geneformer.params import SPLITS, check_names

logger = logging.getLogger(__name__)

UNLABELLED = "unlabelled"
# A trial whose balance tests all reach this p-value is accepted (Geneformer's default).
BALANCE_P_THRESHOLD = 0.1
# Splits whose donors per class are counted against split.min_donors_per_class: the donor-level
# metrics of early stopping (val) and of the headline (test) rest on them.
DONOR_CHECKED_SPLITS = ("val", "test")


@dataclass
class PatientSplit:
    """Donor ids per split and how well covariates are balanced."""

    patients: dict[str, list[str]]
    balance_pvalues: dict[str, float] = field(default_factory=dict)
    trial: int = 0
    warnings: list[dict[str, object]] = field(default_factory=list)

    def split_of(self) -> dict[str, str]:
        """Donor id -> split name."""
        return {p: name for name, pats in self.patients.items() for p in pats}


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items by ``fractions`` with the largest-remainder rule (sums to ``n``)."""
    raw = np.asarray(fractions, dtype=float) * n
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    for i in order[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _check_fractions(fractions: Mapping[str, float]) -> list[float]:
    missing = [s for s in SPLITS if s not in fractions]
    if missing:
        msg = f"params.yaml: split.fractions lacks {missing}; give train, val and test fractions."
        raise InputError(msg)
    values = [float(fractions[s]) for s in SPLITS]
    if any(v <= 0 for v in values) or not np.isclose(sum(values), 1.0):
        msg = f"params.yaml: split.fractions {dict(zip(SPLITS, values, strict=True))} must be positive and sum to 1."
        raise InputError(msg)
    return values


def _balance_pvalue(values: pd.Series, assignment: pd.Series) -> float:
    """p-value that ``values`` are distributed alike across splits (chi-square or Kruskal-Wallis)."""
    frame = pd.DataFrame({"v": values, "s": assignment}).dropna()
    if frame["s"].nunique() < 2 or frame["v"].nunique() < 2:
        return 1.0
    numeric = pd.to_numeric(frame["v"], errors="coerce")
    if numeric.notna().all() and frame["v"].nunique() > 5:
        groups = [numeric[frame["s"] == s].to_numpy() for s in sorted(frame["s"].unique())]
        return float(stats.kruskal(*groups).pvalue)
    table = pd.crosstab(frame["v"].astype(str), frame["s"])
    return float(stats.chi2_contingency(table.to_numpy()).pvalue)


def split_patients(
    donors: pd.DataFrame,
    *,
    labels: pd.Series,
    fractions: Mapping[str, float],
    balance: Sequence[str] = (),
    max_trials: int = 100,
    seed: int = 0,
    min_donors_per_class: int = 0,
    source: str = "the donor metadata",
) -> PatientSplit:
    """Assign donors to train/val/test, stratified by AD status.

    Within each AD class donors are shuffled and cut by the fractions (largest remainder). With
    ``balance`` columns, up to ``max_trials`` shuffles are tried; the first whose covariates all
    pass a chi-square (categorical) or Kruskal-Wallis (numeric) test at p >= 0.1 is kept,
    otherwise the trial with the highest minimum p-value.

    Parameters
    ----------
    donors
        Donor metadata indexed by donor id; only donors that have cells should be passed.
    labels
        Donor id -> ``"AD"``/``"control"``/NaN. Unlabelled donors form their own stratum.
    fractions
        ``{"train": f, "val": f, "test": f}``.
    balance
        Donor columns to balance across splits.
    max_trials
        Shuffles tried when balancing.
    seed
        Seed of the shuffles.
    min_donors_per_class
        Fewer donors of an AD class in val or test is a warning (``warnings`` of the result,
        and the log): patient-level metrics on a handful of donors are noise.
    source
        The donor metadata file (named in the messages).

    Raises
    ------
    InputError
        When a ``balance`` column is not in ``donors``, or a split would be empty or lack an AD
        class.
    """
    values = _check_fractions(fractions)
    check_names(
        balance,
        donors.columns,
        key="split.balance",
        what="donor column",
        source=source,
    )
    strata = labels.reindex(donors.index).fillna(UNLABELLED).astype(str)
    _check_feasible(strata, values)

    rng = np.random.default_rng(seed)
    best: PatientSplit | None = None
    best_score = -1.0
    for trial in range(max(1, max_trials if balance else 1)):
        patients: dict[str, list[str]] = {s: [] for s in SPLITS}
        for stratum in sorted(strata.unique()):
            members = np.array(sorted(strata.index[strata == stratum]))
            members = members[rng.permutation(len(members))]
            start = 0
            for name, count in zip(SPLITS, _allocate(len(members), values), strict=True):
                patients[name].extend(members[start : start + count].tolist())
                start += count
        patients = {name: sorted(p) for name, p in patients.items()}
        candidate = PatientSplit(patients=patients, trial=trial)
        assignment = pd.Series(candidate.split_of()).reindex(donors.index)
        candidate.balance_pvalues = {c: _balance_pvalue(donors[c], assignment) for c in balance}
        score = min(candidate.balance_pvalues.values(), default=1.0)
        if score > best_score:
            best, best_score = candidate, score
        if score >= BALANCE_P_THRESHOLD:
            break
    assert best is not None
    if balance and best_score < BALANCE_P_THRESHOLD:
        logger.warning(
            "no split in %d trials balances %s at p>=%.2f; kept trial %d (min p %.3f)",
            max_trials,
            list(balance),
            BALANCE_P_THRESHOLD,
            best.trial,
            best_score,
        )
    best.warnings = donor_warnings(best, strata, min_donors=min_donors_per_class)
    return best


def donor_warnings(
    split: PatientSplit, strata: pd.Series, *, min_donors: int
) -> list[dict[str, object]]:
    """Classes with fewer than ``min_donors`` donors in val or test, one logged warning each.

    Parameters
    ----------
    split
        The donors of each split.
    strata
        Donor id -> AD class (``unlabelled`` donors are not counted).
    min_donors
        ``params.yaml: split.min_donors_per_class``.

    Returns
    -------
    ``{"split", "class", "donors", "min_donors_per_class", "message"}`` per short class.
    """
    warnings: list[dict[str, object]] = []
    classes = sorted(c for c in strata.unique() if c != UNLABELLED)
    for name in DONOR_CHECKED_SPLITS:
        members = strata.reindex(split.patients[name])
        for label in classes:
            n = int((members == label).sum())
            if n >= min_donors:
                continue
            purpose = (
                "early stopping and tuning" if name == "val" else "the patient-level test metrics"
            )
            message = (
                f"split {name}: {n} donor(s) with AD status {label!r}, fewer than "
                f"split.min_donors_per_class = {min_donors}; {purpose} rest on very few donors "
                f"(wide intervals). Add donors, or raise split.fractions.{name} in params.yaml."
            )
            logger.warning("%s", message)
            warnings.append(
                {
                    "split": name,
                    "class": label,
                    "donors": n,
                    "min_donors_per_class": min_donors,
                    "message": message,
                }
            )
    return warnings


def _check_feasible(strata: pd.Series, fractions: Sequence[float]) -> None:
    counts = strata.value_counts()
    for stratum in sorted(counts.index):
        if stratum == UNLABELLED:
            continue
        allocation = dict(zip(SPLITS, _allocate(int(counts[stratum]), fractions), strict=True))
        empty = [s for s, n in allocation.items() if n == 0]
        if empty:
            msg = (
                f"split: {counts[stratum]} donor(s) with AD status {stratum!r} cannot fill every split "
                f"with fractions {dict(zip(SPLITS, fractions, strict=True))}: split(s) {empty} would have none. "
                "Add donors, or change split.fractions in params.yaml."
            )
            raise InputError(msg)
    labelled = [s for s in counts.index if s != UNLABELLED]
    if len(labelled) < 2:
        msg = (
            f"split: donors carry AD status {labelled} only; every split needs both AD and control "
            "donors. Check labels.ad_definition and the donor metadata."
        )
        raise InputError(msg)
