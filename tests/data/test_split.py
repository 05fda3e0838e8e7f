from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rosmap_geneformer.data.split import split_patients

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def _donors(n_ad: int, n_control: int, *, n_unlabelled: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(1)
    n = n_ad + n_control + n_unlabelled
    ids = [f"D{i:03d}" for i in range(n)]
    donors = pd.DataFrame(
        {
            "msex": rng.integers(0, 2, n),
            "age_death": rng.choice(["(80,85]", "(85,90]", "90+"], n),
            "pmi": rng.uniform(2, 20, n),
        },
        index=pd.Index(ids, name="subject"),
    )
    labels = pd.Series(
        ["AD"] * n_ad + ["control"] * n_control + [np.nan] * n_unlabelled, index=ids, dtype=object
    )
    return donors, labels


def test_every_donor_in_exactly_one_split_and_classes_stratified() -> None:
    donors, labels = _donors(15, 15)
    result = split_patients(donors, labels=labels, fractions=FRACTIONS, seed=0)
    assigned = [p for pats in result.patients.values() for p in pats]
    assert sorted(assigned) == sorted(donors.index)
    assert len(set(assigned)) == len(assigned)
    for split, expected in {"train": 9, "val": 3, "test": 3}.items():
        split_labels = labels[result.patients[split]]
        assert (split_labels == "AD").sum() == expected
        assert (split_labels == "control").sum() == expected


def test_split_is_deterministic_and_depends_on_seed() -> None:
    donors, labels = _donors(10, 10)
    a = split_patients(donors, labels=labels, fractions=FRACTIONS, seed=3)
    b = split_patients(donors, labels=labels, fractions=FRACTIONS, seed=3)
    c = split_patients(donors, labels=labels, fractions=FRACTIONS, seed=4)
    assert a.patients == b.patients
    assert a.patients != c.patients


def test_balancing_reports_pvalues_and_meets_threshold_when_possible() -> None:
    donors, labels = _donors(20, 20)
    result = split_patients(
        donors,
        labels=labels,
        fractions=FRACTIONS,
        balance=["msex", "age_death"],
        max_trials=200,
        seed=0,
    )
    assert set(result.balance_pvalues) == {"msex", "age_death"}
    assert min(result.balance_pvalues.values()) >= 0.1


def test_unlabelled_donors_are_split_as_their_own_stratum() -> None:
    donors, labels = _donors(5, 5, n_unlabelled=5)
    result = split_patients(donors, labels=labels, fractions=FRACTIONS, seed=0)
    unlabelled = set(labels.index[labels.isna()])
    assert sum(len(unlabelled & set(p)) for p in result.patients.values()) == 5


def test_too_few_donors_for_a_class_names_the_class_and_fix() -> None:
    donors, labels = _donors(2, 10)
    with pytest.raises(ValueError, match=r"'AD'.*split\.fractions"):
        split_patients(donors, labels=labels, fractions=FRACTIONS, seed=0)


def test_single_class_is_refused() -> None:
    donors, labels = _donors(0, 10)
    with pytest.raises(ValueError, match="both AD and control"):
        split_patients(donors, labels=labels, fractions=FRACTIONS, seed=0)


@pytest.mark.parametrize(
    "fractions",
    [
        {"train": 0.5, "val": 0.5},
        {"train": 0.7, "val": 0.2, "test": 0.2},
        {"train": 1.0, "val": 0.0, "test": 0.0},
    ],
)
def test_bad_fractions_are_refused(fractions: dict[str, float]) -> None:
    donors, labels = _donors(10, 10)
    with pytest.raises(ValueError, match="split.fractions"):
        split_patients(donors, labels=labels, fractions=fractions, seed=0)


def test_unknown_balance_column_is_refused() -> None:
    donors, labels = _donors(10, 10)
    with pytest.raises(ValueError, match="apoe"):
        split_patients(donors, labels=labels, fractions=FRACTIONS, balance=["apoe"], seed=0)
