from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import sparse
from transformers import BertConfig, BertForSequenceClassification

from builders import (
    CELL_COLUMNS,
    project_paths,
    save_random_base_model,
    tiny_bert_config,
    write_sampled_splits,
)
from builders import run_stage as run_stage_script
from builders import write_params as write_params_file
from rosmap_geneformer.analysis import embedding_report

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "src" / "stages" / "embed.py"
VOCAB = 40
HIDDEN = 32


def tiny_config(**extra: object) -> BertConfig:
    return tiny_bert_config(VOCAB, hidden_size=HIDDEN, **extra)


def tiny_cells(n: int = 48, *, seed: int = 0) -> datasets.Dataset:
    """Cells whose tokens depend on the cell type, so the embeddings differ by type."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in CELL_COLUMNS}
    for i in range(n):
        cell_type = ["Exc", "Mic", "Ast"][i % 3]
        patient = f"P{i % 4}"
        start = {"Exc": 2, "Mic": 14, "Ast": 26}[cell_type]
        ids = (start + rng.permutation(12)[: int(rng.integers(6, 12))]).tolist()
        rows["input_ids"].append(ids)
        rows["length"].append(len(ids))
        rows["cell_id"].append(f"L1_{i:04d}-1")
        rows["patient_id"].append(patient)
        rows["cell_type"].append(cell_type)
        rows["ad_status"].append("AD" if i % 4 in (1, 3) else "control")
    return datasets.Dataset.from_dict(rows)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embed")
    cells = tiny_cells()
    cells.save_to_disk(root / "tok" / "test.dataset")
    # Raw counts of the same cells (plus one the tokenizer dropped) for the hvg_pca reference.
    rng = np.random.default_rng(1)
    rates = np.ones((len(cells) + 1, 30))
    for i, cell_type in enumerate([*cells["cell_type"], "Exc"]):
        rates[i, {"Exc": 0, "Mic": 10, "Ast": 20}[cell_type] :][:10] = 8.0
    counts = ad.AnnData(
        sparse.csr_matrix(rng.poisson(rates).astype(np.float32)),
        obs=pd.DataFrame(index=[*cells["cell_id"], "L1_dropped-1"]),
    )
    write_sampled_splits(root, {"test": counts[::-1].copy()})  # another row order
    save_random_base_model(root / "base", VOCAB)  # seeds torch for the fine-tuned ones too
    for task, classes in (("cell_type", ["Ast", "Exc", "Mic"]), ("disease", ["control", "AD"])):
        config = tiny_config(
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)},
        )
        BertForSequenceClassification(config).save_pretrained(root / "finetuned" / task)
    return root


def write_params(root: Path, out: Path, **embed: object) -> Path:
    params = {
        "seed": 0,
        "paths": project_paths(root, "tokenized", "sampled", "ensembl", "base_model", "finetuned")
        | project_paths(out, "embeddings", "reports"),
        "tasks": {"cell_type": {"label": "cell_type"}, "disease": {"label": "ad_status"}},
        "tokenize": {"special_tokens": False},
        "embed": {
            "emb_layer": -1,
            "batch_size": 8,
            "max_cells": None,
            "n_neighbors": 10,
            "metric": "cosine",
            "silhouette_max_cells": 1000,
            "hvg_pca": None,
            **embed,
        },
    }
    return write_params_file(out, params)


def run_stage(params: Path) -> None:
    run_stage_script(STAGE, "--params", str(params))


def test_stage_writes_embeddings_umaps_and_silhouettes(workdir: Path, tmp_path: Path) -> None:
    for run in ("a", "b"):
        run_stage(write_params(workdir, tmp_path / run))
    models = ["base", "finetuned_cell_type", "finetuned_disease"]
    adata = ad.read_h5ad(tmp_path / "a/embeddings/test.h5ad")
    assert adata.n_obs == 48
    assert adata.obs_names[0] == "L1_0000-1"
    assert list(adata.obs.columns) == ["patient_id", "cell_type", "ad_status"]
    for model in models:
        assert adata.obsm[f"X_{model}"].shape == (48, HIDDEN)
        assert adata.obsm[f"X_{model}"].dtype == np.float32
        assert adata.obsm[f"X_umap_{model}"].shape == (48, 2)
    assert adata.uns["embed"]["hidden_states_index"]["base"] == 1  # 2 layers, emb_layer -1
    metrics = json.loads((tmp_path / "a/reports/embed/metrics.json").read_text())
    assert list(metrics) == models
    for scores in metrics.values():
        assert set(scores) == {"cell_type", "ad_status", "patient_id"}
        assert all(-1 <= v <= 1 for v in scores.values())
    # Tokens depend on the cell type only: even random weights separate types better than donors.
    assert metrics["base"]["cell_type"] > metrics["base"]["patient_id"]
    for model in models:
        png = tmp_path / "a/reports/embed" / f"umap_{model}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.read_bytes() == (tmp_path / "b/reports/embed" / f"umap_{model}.png").read_bytes()
    for name in ("reports/embed/metrics.json", "embeddings/test.h5ad"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_stage_subsamples_and_refuses_missing_models(workdir: Path, tmp_path: Path) -> None:
    params = write_params(
        workdir,
        tmp_path / "sub",
        max_cells=20,
        emb_layer=0,
        hvg_pca={"n_top_genes": 20, "n_components": 5},
    )
    run_stage(params)
    adata = ad.read_h5ad(tmp_path / "sub/embeddings/test.h5ad")
    assert adata.n_obs == 20
    assert adata.obsm["X_hvg_pca"].shape == (20, 5)
    metrics = json.loads((tmp_path / "sub/reports/embed/metrics.json").read_text())
    assert list(metrics)[-1] == "hvg_pca"
    assert metrics["hvg_pca"]["cell_type"] > 0.3  # the counts carry cell-type markers
    assert (tmp_path / "sub/reports/embed/umap_hvg_pca.png").is_file()
    assert adata.uns["embed"]["hidden_states_index"]["base"] == 2  # emb_layer 0: last layer
    assert adata.obs_names.is_monotonic_increasing  # dataset order kept

    config = yaml.safe_load(params.read_text())
    config["tasks"]["other"] = {"label": "cell_type"}
    params.write_text(yaml.safe_dump(config))
    with pytest.raises(FileNotFoundError, match="finetuned/other"):
        run_stage(params)


def test_silhouette_is_high_for_separated_labels() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(["a", "b", "c"], 30)
    centres = {"a": [10, 0, 0], "b": [0, 10, 0], "c": [0, 0, 10]}
    embedding = np.array([centres[g] for g in groups]) + rng.normal(0, 0.5, (90, 3))
    obs = pd.DataFrame({"cell_type": groups, "patient_id": np.tile(["p1", "p2", "p3"], 30)})
    scores = embedding_report.silhouette_scores(
        embedding, obs, labels=["cell_type", "patient_id"], seed=0
    )
    assert scores["cell_type"] > 0.8
    assert abs(scores["patient_id"]) < 0.1
    same = embedding_report.silhouette_scores(
        embedding, obs, labels=["cell_type", "patient_id"], max_cells=50, seed=0
    )
    assert same == embedding_report.silhouette_scores(
        embedding, obs, labels=["cell_type", "patient_id"], max_cells=50, seed=0
    )
    one = obs.assign(ad_status="AD")
    assert embedding_report.silhouette_scores(embedding, one, labels=["ad_status"]) == {
        "ad_status": None
    }


def test_build_anndata_checks_shapes() -> None:
    obs = pd.DataFrame({"cell_type": ["a", "b"]}, index=["c1", "c2"])
    with pytest.raises(ValueError, match="expected shape"):
        embedding_report.build_anndata(obs, {"base": np.zeros((3, 4))})
    with pytest.raises(ValueError, match="NaN"):
        embedding_report.build_anndata(obs, {"base": np.full((2, 4), np.nan)})
    adata = embedding_report.build_anndata(obs, {"base": np.ones((2, 4))})
    assert adata.obsm["X_base"].dtype == np.float32
    assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype)
