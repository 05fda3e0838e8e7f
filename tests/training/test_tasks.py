from __future__ import annotations

import datasets
import numpy as np
import pytest

from builders import tokenized_cells
from rosmap_geneformer.training import tasks

VOCAB = 60
AD_TOKEN = 55


def make_cells(n: int, patients: list[str], *, seed: int) -> datasets.Dataset:
    """Tokenized-looking cells whose tokens carry the cell type and, for AD donors, one AD token."""
    return tokenized_cells(
        n, patients, seed=seed, vocab_size=VOCAB, lengths=(12, 30), ad_token=AD_TOKEN
    )


def test_prepare_task_sorts_classes_drops_rare_and_selects_cell_types() -> None:
    train = make_cells(30, ["P1", "P2"], seed=0)
    extra = datasets.Dataset.from_dict(
        {k: [train[0][k]] * 2 for k in train.column_names} | {"cell_type": ["Vas", "Vas"]}
    )
    train = datasets.concatenate_datasets([train, extra])
    val = make_cells(9, ["P3", "P4"], seed=1)
    prepared = tasks.prepare_task(
        train, val, tasks.TaskSpec(name="cell_type", label="cell_type", min_cells_per_class=3)
    )
    assert prepared.classes == ["Ast", "Exc", "Mic"]
    assert prepared.report["rare_classes_dropped"] == ["Vas"]
    assert prepared.report["train_cells_rare_class"] == 2
    names = [prepared.classes[i] for i in prepared.train["label"]]
    assert names == prepared.train["cell_type"]

    disease = tasks.prepare_task(
        train,
        val,
        tasks.TaskSpec(name="disease", label="ad_status", cell_types=["Mic"], positive_class="AD"),
    )
    assert disease.classes == ["control", "AD"], "the positive class gets id 1"
    assert set(disease.train["cell_type"]) == {"Mic"}
    assert disease.report["train_cells_other_cell_types"] == 32 - 10


def test_patient_auroc_aggregates_cells_per_patient() -> None:
    patients = ["a", "a", "b", "b", "c", "c"]
    labels = np.array([1, 1, 0, 0, 1, 1])
    # Cell-level AUROC is imperfect, patient means separate perfectly.
    probs = np.array([0.9, 0.3, 0.4, 0.2, 0.6, 0.5])
    assert tasks.patient_auroc(patients, labels, probs) == 1.0
    assert np.isnan(tasks.patient_auroc(["a", "b"], np.array([1, 1]), np.array([0.2, 0.3])))


def test_bad_tasks_are_refused() -> None:
    with pytest.raises(ValueError, match="early_stopping_metric"):
        tasks.TaskSpec.from_params("x", {"label": "cell_type", "early_stopping_metric": "auc"})
    with pytest.raises(ValueError, match="patient_level"):
        tasks.TaskSpec.from_params(
            "x", {"label": "cell_type", "early_stopping_metric": "patient_auroc"}
        )
