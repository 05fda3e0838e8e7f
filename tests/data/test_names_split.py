"""split.balance checked against the donor metadata (issue 15, item 2), and too few donors of
a class in val or test warned about in reports/split.json (item 7)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from builders import ROOT, run_stage, write_params
from rosmap_geneformer.data.split import split_patients
from rosmap_geneformer.errors import InputError

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def donors_and_labels(n_ad: int, n_control: int) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(0)
    ids = [f"D{i:03d}" for i in range(n_ad + n_control)]
    donors = pd.DataFrame(
        {
            "msex": rng.integers(0, 2, len(ids)),
            "age_death": rng.uniform(70, 95, len(ids)),
            "Pathologic_diagnosis_of_AD": ["yes"] * n_ad + ["no"] * n_control,
        },
        index=pd.Index(ids, name="subject"),
    )
    labels = pd.Series(["AD"] * n_ad + ["control"] * n_control, index=ids, dtype=object)
    return donors, labels


def test_unknown_balance_column_lists_the_donor_columns() -> None:
    donors, labels = donors_and_labels(10, 10)
    with pytest.raises(InputError) as caught:
        split_patients(
            donors,
            labels=labels,
            fractions=FRACTIONS,
            balance=["msex", "apoe_genotype"],
            source="data/raw/rosmap/individual_metadata.tsv",
        )
    assert str(caught.value) == (
        "params.yaml split.balance: 'apoe_genotype' matches no donor column in "
        "data/raw/rosmap/individual_metadata.tsv; available: age_death, msex, "
        "Pathologic_diagnosis_of_AD. Fix the name in params.yaml."
    )


def test_few_donors_of_a_class_in_val_or_test_is_a_warning(caplog) -> None:
    donors, labels = donors_and_labels(10, 25)
    with caplog.at_level(logging.WARNING):
        result = split_patients(
            donors, labels=labels, fractions=FRACTIONS, min_donors_per_class=5, seed=0
        )
    # 10 AD donors: 6 / 2 / 2; 25 control donors: 15 / 5 / 5.
    assert [(w["split"], w["class"], w["donors"]) for w in result.warnings] == [
        ("val", "AD", 2),
        ("test", "AD", 2),
    ]
    assert result.warnings[0]["message"] == (
        "split val: 2 donor(s) with AD status 'AD', fewer than split.min_donors_per_class = 5; "
        "early stopping and tuning rest on very few donors (wide intervals). Add donors, or "
        "raise split.fractions.val in params.yaml."
    )
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        w["message"] for w in result.warnings
    ]
    donors, labels = donors_and_labels(25, 25)
    enough = split_patients(donors, labels=labels, fractions=FRACTIONS, min_donors_per_class=5)
    assert enough.warnings == []


def test_split_stage_writes_the_warnings_into_split_json(tmp_path: Path, monkeypatch) -> None:
    donors, _ = donors_and_labels(10, 10)
    raw = tmp_path / "raw" / "rosmap"
    raw.mkdir(parents=True)
    donors.reset_index().to_csv(raw / "individual_metadata.tsv", sep="\t", index=False)
    pd.DataFrame({"dataset": [f"L{d}" for d in donors.index], "subject": donors.index}).to_csv(
        raw / "batch_mapping.tsv", sep="\t", index=False
    )
    batches = [f"L{d}" for d in donors.index for _ in range(3)]
    obs = pd.DataFrame({"batch": batches}, index=[f"{b}_{i}-1" for i, b in enumerate(batches)])
    ad.AnnData(X=sparse.csr_matrix((len(obs), 2), dtype=np.float32), obs=obs).write_h5ad(
        tmp_path / "ensembl.h5ad"
    )
    params = {
        "seed": 0,
        "paths": {
            "raw": str(tmp_path / "raw"),
            "ensembl": str(tmp_path / "ensembl.h5ad"),
            "split": str(tmp_path / "split"),
            "reports": str(tmp_path / "reports"),
        },
        "data": {"source": "rosmap"},
        "split": {"fractions": FRACTIONS, "balance": ["msex"], "min_donors_per_class": 3},
        "labels": {"ad_definition": "pathologic"},
    }
    write_params(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    run_stage(ROOT / "src/stages/split.py", "--params", str(tmp_path / "params.yaml"))
    report = json.loads((tmp_path / "reports" / "split.json").read_text())
    # 10 donors per class: 6 / 2 / 2, two short of 3 in val and in test for each class.
    assert sorted((w["split"], w["class"]) for w in report["warnings"]) == [
        ("test", "AD"),
        ("test", "control"),
        ("val", "AD"),
        ("val", "control"),
    ]
    assert all("split.min_donors_per_class = 3" in w["message"] for w in report["warnings"])
