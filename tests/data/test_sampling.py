from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rosmap_geneformer.data.sampling import split_rng, undersample


def _obs() -> pd.DataFrame:
    rows = []
    for patient, sizes in {
        "P1": {"Exc": 50, "Mic": 3},
        "P2": {"Exc": 40, "Mic": 8},
        "P3": {"Exc": 5},
    }.items():
        for cell_type, n in sizes.items():
            rows += [(patient, cell_type)] * n
    obs = pd.DataFrame(rows, columns=["patient_id", "cell_type"])
    obs.index = [f"c{i}" for i in range(len(obs))]
    return obs


def test_caps_per_patient_class_then_per_class() -> None:
    obs = _obs()
    kept = undersample(obs, max_per_patient_class=20, max_per_class=30, rng=split_rng(0, "train"))
    sub = obs.iloc[kept]
    per_pair = sub.groupby(["patient_id", "cell_type"]).size()
    assert per_pair.max() <= 20
    assert sub["cell_type"].value_counts()["Exc"] == 30
    # Small groups are kept whole.
    assert sub["cell_type"].value_counts()["Mic"] == 11
    assert np.all(np.diff(kept) > 0), "original cell order is kept"


def test_no_caps_keeps_everything() -> None:
    obs = _obs()
    kept = undersample(obs, max_per_patient_class=None, max_per_class=None, rng=split_rng(0, "x"))
    assert kept.tolist() == list(range(len(obs)))


def test_sampling_is_seeded_and_split_specific() -> None:
    obs = _obs()
    kwargs = {"max_per_patient_class": 10, "max_per_class": None}
    a = undersample(obs, rng=split_rng(0, "train"), **kwargs)
    b = undersample(obs, rng=split_rng(0, "train"), **kwargs)
    c = undersample(obs, rng=split_rng(0, "val"), **kwargs)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_non_positive_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="max_per_class"):
        undersample(_obs(), max_per_patient_class=5, max_per_class=0, rng=split_rng(0, "t"))
