"""On a tiny demo config, `perturb` and `grn` find what the generator planted (issue #8).

Its own repository: more cells than the shared tiny pipeline (a program needs a few hundred cells
of its cell types to be learned) but short cells (64 tokens), and the demo's model architecture
pretrained for the demo's 10 epochs. About 2.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from dvc_repo import PROJECT, dvc, tiny_repo

from rosmap_geneformer import truth

SHIPPED = yaml.safe_load((PROJECT / "params.yaml").read_text())
TRUTH_PARAMS = {
    "demo": {"n_donors": 12, "cells_per_donor": 250, "n_genes": 400},
    "sample": {"max_cells_per_patient_cell_type": 500, "max_cells_per_class": 5000},
    "base_model": {
        "architecture": SHIPPED["base_model"]["architecture"],
        "pretrain": {"epochs": SHIPPED["base_model"]["pretrain"]["epochs"], "learning_rate": 1e-3},
    },
    "train": {"epochs": 5},
    "perturb": {"cell_type": None, "max_cells": 50, "min_cells": 5},
    "grn": {"max_cells": 100, "min_cells": 5},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tiny_repo(tmp_path_factory, "truth", TRUTH_PARAMS)
    dvc("repro", "perturb", "grn", cwd=root)
    return root


def test_planted_ad_genes_rank_above_random_genes(repo: Path) -> None:
    planted = truth.read_truth(repo / "data/raw/demo/truth")["ad_genes"]
    table = pd.read_csv(repo / "reports/perturb/delete.tsv", sep="\t")
    score = truth.perturbation_against_truth(table, planted, perturb_type="delete")
    assert score["planted_tested"] >= 8, score
    # Each planted gene is counted from the end its direction predicts: deleting a gene that AD
    # raises moves AD cells towards control, deleting one that AD lowers moves them away.
    assert score["auroc"] > 0.65, score
    assert score["p"] < 0.05, score


def test_planted_targets_score_above_the_random_baseline(repo: Path) -> None:
    metrics = json.loads((repo / "reports/grn/metrics.json").read_text())
    model, random = metrics["perturbation"], metrics["random"]
    assert metrics["positive_edges"] > 0
    assert model["aupr"] > 2 * random["aupr"], metrics
    assert model["aupr"] > 2 * metrics["prevalence"], metrics
    assert model["auroc"] > 0.6, metrics
