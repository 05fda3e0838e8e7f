from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import sparse

from builders import write_sampled_splits
from rosmap_geneformer import counts
from rosmap_geneformer.analysis import baselines
from rosmap_geneformer.training.tasks import TaskSpec

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "src" / "stages" / "baseline.py"
CELL_TYPES = ["Exc", "Mic", "Ast"]
N_GENES = 80
MARKERS = {"Exc": range(0, 8), "Mic": range(8, 16), "Ast": range(16, 24)}
AD_GENES = range(24, 30)
PATIENTS = {
    "train": [f"P{i:02d}" for i in range(1, 9)],
    "val": [f"P{i:02d}" for i in range(9, 13)],
    "test": [f"P{i:02d}" for i in range(13, 17)],
}
BASELINE = {
    "n_top_genes": 40,
    "target_sum": 10000,
    "n_components": 10,
    "C": [0.01, 0.1, 1.0],
    "l1_ratio": 0.0,
    "max_iter": 500,
    "class_weight": "balanced",
}
TASKS = {
    "cell_type": {"label": "cell_type", "min_cells_per_class": 5},
    "disease": {
        "label": "ad_status",
        "cell_types": ["Exc", "Mic"],
        "min_cells_per_class": 5,
        "patient_level": True,
        "positive_class": "AD",
    },
}


def make_split(split: str, *, cells_per_patient: int, seed: int) -> tuple[ad.AnnData, list[int]]:
    """Poisson counts with cell-type markers and, in AD donors, raised AD genes.

    Returns the AnnData and the rows the "tokenizer" keeps (the last cell is left out).
    """
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for patient in PATIENTS[split]:
        status = "AD" if int(patient[1:]) % 2 else "control"
        for j in range(cells_per_patient):
            cell_type = CELL_TYPES[j % 3]
            rate = np.full(N_GENES, 1.0)
            rate[list(MARKERS[cell_type])] = 6.0
            if status == "AD":
                rate[list(AD_GENES)] = 3.0
            rate *= rng.uniform(0.6, 1.6)
            rows.append(rng.poisson(rate))
            obs.append(
                {
                    "cell_id": f"L{patient}_{j:04d}-1",
                    "patient_id": patient,
                    "cell_type": cell_type,
                    "ad_status": status,
                }
            )
    frame = pd.DataFrame(obs).set_index("cell_id", drop=False)
    frame.index.name = None
    adata = ad.AnnData(
        sparse.csr_matrix(np.asarray(rows, dtype=np.float32)),
        obs=frame.drop(columns="cell_id"),
        var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(N_GENES)]),
    )
    return adata, list(range(adata.n_obs - 1))


def tokenized(adata: ad.AnnData, rows: list[int]) -> datasets.Dataset:
    obs = adata.obs.iloc[rows]
    return datasets.Dataset.from_dict(
        {
            "input_ids": [[2, 3, 4]] * len(rows),
            "length": [3] * len(rows),
            "cell_id": obs.index.astype(str).tolist(),
            "patient_id": obs["patient_id"].astype(str).tolist(),
            "cell_type": obs["cell_type"].astype(str).tolist(),
            "ad_status": obs["ad_status"].astype(str).tolist(),
        }
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("baseline")
    adatas = {}
    for seed, (split, n) in enumerate((("train", 30), ("val", 24), ("test", 24))):
        adata, keep = make_split(split, cells_per_patient=n, seed=seed)
        adatas[split] = adata
        tokenized(adata, keep).save_to_disk(root / "tok" / f"{split}.dataset")
    # Test first in the matrix: a split's rows need not come in split order.
    write_sampled_splits(root, {s: adatas[s] for s in ("test", "train", "val")})
    return root


def write_params(root: Path, out: Path, **baseline: object) -> Path:
    params = {
        "seed": 0,
        "paths": {
            "sampled": str(root / "sampled"),
            "ensembl": str(root / "ensembl.h5ad"),
            "tokenized": str(root / "tok"),
            "reports": str(out / "reports"),
            "dvclive": str(out / "dvclive"),
            "predictions": str(out / "predictions"),
        },
        "tasks": TASKS,
        "baseline": {**BASELINE, **baseline},
        "evaluate": {"n_boot": 50},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    return out / "params.yaml"


def run_stage(params: Path, task: str, *, subprocess_run: bool = False) -> None:
    argv = ["--params", str(params), "--task", task]
    if subprocess_run:
        subprocess.run([sys.executable, str(STAGE), *argv], check=True, cwd=ROOT)
        return
    spec = importlib.util.spec_from_file_location("baseline_stage", STAGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def splits(root: Path) -> dict[str, baselines.SplitInput]:
    return {
        s: baselines.SplitInput(
            cells=root / "sampled" / f"{s}.parquet",
            matrix=root / "ensembl.h5ad",
            tokenized=root / "tok" / f"{s}.dataset",
        )
        for s in ("train", "val", "test")
    }


def test_stage_beats_chance_and_reproduces(workdir: Path, tmp_path: Path) -> None:
    for run in ("a", "b"):
        params = write_params(workdir, tmp_path / run)
        for task in TASKS:
            # One rerun in a fresh interpreter: nothing may depend on process state.
            run_stage(params, task, subprocess_run=run == "b" and task == "disease")
    for task in TASKS:
        first = (tmp_path / "a/reports/baseline" / task / "metrics.json").read_bytes()
        second = (tmp_path / "b/reports/baseline" / task / "metrics.json").read_bytes()
        assert first == second
        assert (tmp_path / "a/predictions" / f"baseline_{task}.tsv").read_bytes() == (
            tmp_path / "b/predictions" / f"baseline_{task}.tsv"
        ).read_bytes()
    cell_type = json.loads((tmp_path / "a/reports/baseline/cell_type/metrics.json").read_text())
    assert cell_type["cell"]["macro_f1"] > 0.9  # chance: 1/3
    assert cell_type["cell"]["macro_f1_ci_low"] <= cell_type["cell"]["macro_f1"]
    disease = json.loads((tmp_path / "a/reports/baseline/disease/metrics.json").read_text())
    assert disease["cell"]["auroc"] > 0.75  # chance: 0.5
    assert disease["patient"]["auroc"] > 0.5
    assert disease["patient"]["n_patients"] == 4
    assert {"auroc_ci_low", "auroc_ci_high", "accuracy", "balanced_accuracy"} <= set(
        disease["patient"]
    )
    written = {p.name for p in (tmp_path / "a/reports/baseline/disease").iterdir()}
    assert {"metrics.json", "details.json", "patients.tsv", "patient_predictions.png"} <= written
    assert (tmp_path / "a/dvclive/baseline/disease/plots/sklearn/patient_roc.json").is_file()


def test_same_cells_and_classes_as_the_model(workdir: Path) -> None:
    task = TaskSpec.from_params("disease", TASKS["disease"])
    result = baselines.run_baseline(
        task,
        splits(workdir),
        hyper=baselines.BaselineParams.from_params(BASELINE),
        seed=0,
        n_boot=20,
    )
    assert result.classes == ("control", "AD")  # positive class last, as in fine-tuning
    test = datasets.load_from_disk(str(workdir / "tok/test.dataset"))
    expected = sorted(
        c for c, t in zip(test["cell_id"], test["cell_type"], strict=True) if t in {"Exc", "Mic"}
    )
    assert result.predictions["cell_id"].tolist() == expected
    cells = result.details["baseline"]["cells"]
    assert cells["test"] == {
        "cells_sampled": 96,
        "cells_tokenized": 95,
        "cells_not_tokenized": 1,
        "cells_for_task": len(expected),
    }
    assert result.details["test_cells"]["other_cell_types"] == 95 - len(expected)
    assert result.details["baseline"]["selection"]["chosen_C"] in BASELINE["C"]
    assert result.details["baseline"]["features"] == {
        "n_genes": 40,
        "pca_components": 10,
        "pca_explained_variance": pytest.approx(
            result.details["baseline"]["features"]["pca_explained_variance"]
        ),
    }


def test_without_pca(workdir: Path) -> None:
    task = TaskSpec.from_params("cell_type", TASKS["cell_type"])
    hyper = baselines.BaselineParams.from_params({**BASELINE, "n_components": None, "C": 0.1})
    result = baselines.run_baseline(task, splits(workdir), hyper=hyper, seed=0, n_boot=20)
    assert result.details["baseline"]["features"] == {"n_genes": 40, "pca_components": None}
    assert result.metrics["cell"]["accuracy"] > 0.9
    assert "patient" not in result.metrics


def test_missing_tokenized_cell_is_an_error(workdir: Path, tmp_path: Path) -> None:
    table = counts.read_cells(workdir / "sampled/test.parquet")
    counts.write_cells(table.iloc[: len(table) - 5], tmp_path / "test.parquet")
    inputs = splits(workdir)
    inputs["test"] = baselines.SplitInput(
        cells=tmp_path / "test.parquet",
        matrix=workdir / "ensembl.h5ad",
        tokenized=workdir / "tok/test.dataset",
    )
    task = TaskSpec.from_params("cell_type", TASKS["cell_type"])
    with pytest.raises(ValueError, match=r"test\.parquet: 4 cell\(s\) of the tokenized dataset"):
        baselines.run_baseline(
            task, inputs, hyper=baselines.BaselineParams.from_params(BASELINE), seed=0, n_boot=5
        )


def test_test_split_read_in_small_blocks_gives_the_same_predictions(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = TaskSpec.from_params("cell_type", TASKS["cell_type"])
    hyper = baselines.BaselineParams.from_params(BASELINE)
    whole = baselines.run_baseline(task, splits(workdir), hyper=hyper, seed=0, n_boot=5)
    monkeypatch.setattr(baselines, "_BLOCK_ROWS", 7)
    blocks = baselines.run_baseline(task, splits(workdir), hyper=hyper, seed=0, n_boot=5)
    pd.testing.assert_frame_equal(blocks.predictions, whole.predictions, rtol=1e-12)
    assert blocks.metrics == whole.metrics


def test_log_normalize() -> None:
    counts = sparse.csr_matrix(np.array([[1, 0, 3], [0, 0, 0], [2, 2, 0]], dtype=np.float32))
    log = baselines.log_normalize(counts, target_sum=100)
    assert log.dtype == np.float32
    totals = np.expm1(log.toarray().astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(totals, [100, 0, 100], rtol=1e-5)
    np.testing.assert_allclose(log.toarray()[0], np.log1p([25, 0, 75]), rtol=1e-6)


def test_genes_are_chosen_on_train_only() -> None:
    rng = np.random.default_rng(0)
    train = rng.poisson(2.0, (60, 30)).astype(np.float32)
    train[:, 5] = 0  # never expressed on train ...
    train[:30, 7] = 40  # ... while gene 7 is strongly variable
    other = rng.poisson(2.0, (40, 30)).astype(np.float32)
    other[:20, 5] = 50  # gene 5 varies only outside train
    features = baselines.FeatureMap.fit(
        baselines.log_normalize(sparse.csr_matrix(train)), n_top_genes=10, n_components=3, seed=0
    )
    assert 7 in features.genes
    assert 5 not in features.genes
    assert features.transform(baselines.log_normalize(sparse.csr_matrix(other))).shape == (40, 3)


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"n_top_gene": 5}, "unknown key"),
        ({"C": [0.1, -1.0]}, "baseline.C"),
        ({"l1_ratio": 2.0}, "baseline.l1_ratio"),
        ({"n_components": 0}, "baseline.n_components"),
    ],
)
def test_params_are_checked(update: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        baselines.BaselineParams.from_params({**BASELINE, **update})


def test_params_sort_the_grid() -> None:
    hyper = baselines.BaselineParams.from_params({**BASELINE, "C": [1, 0.01]})
    assert hyper.C == [0.01, 1.0]
    assert baselines.BaselineParams.from_params({"C": 0.5}).C == [0.5]


def test_prediction_in_blocks_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    adata, _ = make_split("train", cells_per_patient=12, seed=3)
    log = baselines.log_normalize(adata.X)
    labels = pd.Categorical(adata.obs["cell_type"], categories=CELL_TYPES).codes.astype(np.int64)
    task = TaskSpec.from_params("cell_type", TASKS["cell_type"])
    fitted = baselines.fit_baseline(
        log,
        labels,
        log,
        labels,
        adata.obs["patient_id"].tolist(),
        task=task,
        classes=CELL_TYPES,
        hyper=baselines.BaselineParams.from_params(BASELINE),
        seed=0,
    )
    whole = fitted.predict_proba(log)
    monkeypatch.setattr(baselines, "_BLOCK_ROWS", 7)
    # Equal up to BLAS rounding (block shapes change the summation order).
    np.testing.assert_allclose(fitted.predict_proba(log), whole, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(whole.sum(axis=1), 1.0)
