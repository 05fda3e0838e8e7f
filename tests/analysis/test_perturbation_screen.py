"""Tests for rosmap_geneformer.analysis.perturbation.screen: the perturb stage's screen on a
tiny planted data set."""

from __future__ import annotations

import pickle
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import sparse
from transformers import BertForSequenceClassification

from builders import (
    CELL_COLUMNS,
    ROOT,
    gene_id,
    one_thread,
    project_paths,
    run_stage_process,
    tiny_geneformer_config,
    write_gene_files,
    write_params,
)
from rosmap_geneformer.analysis import embeddings
from rosmap_geneformer.analysis.perturbation import screen
from rosmap_geneformer.analysis.perturbation.annotation import token_annotation

VOCAB = 80


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny models run fastest, and steadiest on a busy machine, on one thread."""
    with one_thread():
        yield


def run_stage(params: Path) -> subprocess.CompletedProcess[str]:
    return run_stage_process(ROOT / "src" / "stages" / "perturb.py", params)


def test_overexpression_positions_skip_the_front_gene():
    cells = [np.array([7, 5, 9]), np.array([2, 5, 7, 3])]
    v1 = screen.perturbation_positions(
        cells[:1], np.array([5, 7]), perturb_type="overexpress", special_tokens=False
    )
    assert v1[0].tolist() == [1]  # 7 is already first
    v2 = screen.perturbation_positions(
        cells[1:], np.array([5, 7]), perturb_type="overexpress", special_tokens=True
    )
    assert v2[0].tolist() == [2]
    deletion = screen.perturbation_positions(
        cells[:1], np.array([5, 7]), perturb_type="delete", special_tokens=False
    )
    assert deletion[0].tolist() == [0, 1]


# ------------------------------------------------------------------------------------------
# A tiny planted data set: a classifier trained on it, then perturbed


AD_TOKENS = [4, 5, 6]
CELL_TYPE_TOKENS = {"Mic": [10, 11, 12], "Ast": [13, 14, 15]}


def planted_cells(n: int, *, seed: int) -> dict[str, list]:
    """Cells of two types; AD cells carry the AD tokens at random ranks in their top half."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in CELL_COLUMNS}
    background = np.arange(20, VOCAB)
    for i in range(n):
        cell_type = ["Mic", "Ast"][i % 2]
        status = ["AD", "control"][(i // 2) % 2]
        ids = list(CELL_TYPE_TOKENS[cell_type])
        ids += rng.choice(background, size=int(rng.integers(14, 22)), replace=False).tolist()
        if status == "AD":
            for token in AD_TOKENS:
                ids.insert(int(rng.integers(0, len(ids) // 2 + 1)), token)
        rows["input_ids"].append(ids)
        rows["length"].append(len(ids))
        rows["cell_id"].append(f"c{i:04d}")
        rows["patient_id"].append(f"P{i % 6}")
        rows["cell_type"].append(cell_type)
        rows["ad_status"].append(status)
    return rows


def train_classifier(dataset: datasets.Dataset, *, seed: int = 0) -> BertForSequenceClassification:
    with one_thread():
        return _train_classifier(dataset, seed=seed)


def _train_classifier(dataset: datasets.Dataset, *, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = tiny_geneformer_config(VOCAB)
    config.num_labels = 2
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ids, mask = embeddings.pad_batch(dataset["input_ids"])
    labels = torch.tensor([s == "AD" for s in dataset["ad_status"]], dtype=torch.long)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(8):
        for batch in torch.randperm(len(labels), generator=generator).split(16):
            loss = model(
                input_ids=ids_t[batch], attention_mask=mask_t[batch], labels=labels[batch]
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def planted_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files the perturb stage reads: tokenized train split, token dictionary, sampled h5ad
    (var only matters) and a fine-tuned disease model, in a temp dir."""
    root = tmp_path_factory.mktemp("planted")
    rows = planted_cells(160, seed=0)
    dataset = datasets.Dataset.from_dict(rows)
    dataset.save_to_disk(root / "tok" / "train.dataset")
    tokens = list(range(2, VOCAB))
    write_gene_files(
        root,
        tokens=tokens,
        symbols=[f"AD{t}" if t in AD_TOKENS else f"G{t}" for t in tokens],
        counts=sparse.csr_matrix((len(dataset), len(tokens)), dtype=np.float32),
        obs=pd.DataFrame(index=rows["cell_id"]),
    )
    model = train_classifier(dataset)
    model.save_pretrained(root / "finetuned" / "disease")
    params = {
        "seed": 0,
        "paths": project_paths(
            root, "tokenized", "dictionaries", "sampled", "ensembl", "finetuned", "reports"
        ),
        "perturb": {
            "task": "disease",
            "emb_layer": 0,
            "split": "train",
            "state_key": "ad_status",
            "start_state": "AD",
            "goal_state": "control",
            "alt_states": [],
            "cell_type": "Mic",
            "types": ["delete", "overexpress"],
            "max_cells": 30,
            "min_cells": 5,
            "max_state_cells": 100,
            "null_size": 100000,
            "fdr": 0.05,
            "max_tokens": 2048,
            "batch_size": 16,
            "top_n": 10,
        },
    }
    write_params(root, params)
    return root


def planted_model_and_annotation(root: Path) -> tuple[Any, pd.DataFrame]:
    """The planted project's fine-tuned encoder and its token annotation, in process."""
    encoder, _ = embeddings.load_encoder(root / "finetuned" / "disease", device="cpu")
    with (root / "dict" / "token_dictionary.pkl").open("rb") as fh:
        token_dictionary = pickle.load(fh)
    annotation = token_annotation(
        token_dictionary,
        {gene_id(t): f"AD{t}" if t in AD_TOKENS else f"G{t}" for t in range(2, VOCAB)},
    )
    return encoder, annotation


def test_planted_ad_genes_rank_first_in_the_perturb_stage(planted_project):
    root = planted_project
    proc = run_stage(root / "params.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "reports" / "perturb"
    table = pd.read_csv(out / "delete.tsv", sep="\t")
    assert list(table.columns[:7]) == ["token", "rank", "gene", "symbol", "mean_shift", "p", "fdr"]
    assert "n_cells" in table.columns
    ranks = table.set_index("symbol")["rank"]
    ad_ranks = sorted(ranks[[f"AD{t}" for t in AD_TOKENS]])
    # The three planted AD genes are the three genes whose deletion moves AD cells most towards
    # control, and they are significant; the random background is not, by and large.
    assert ad_ranks == [1, 2, 3], table.head(8)
    assert table.set_index("symbol").loc[[f"AD{t}" for t in AD_TOKENS], "significant"].all()
    assert (table["mean_shift"].iloc[:3] > 0).all()
    background = table[table["symbol"].str.startswith("G")]
    assert background["significant"].mean() < 0.5
    # Overexpression of genes already in AD cells pushes them further from control.
    over = pd.read_csv(out / "overexpress.tsv", sep="\t").set_index("symbol")
    assert len(over) > 0
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["cells"]["perturbed"] == 30
    assert summary["genes"]["perturbed"] == len(table)
    assert (out / "delete_top_genes.png").stat().st_size > 0
    # Same inputs, same numbers (in process, to keep the test short).
    encoder, annotation = planted_model_and_annotation(root)
    settings = screen.PerturbSettings.from_params(
        {**yaml.safe_load((root / "params.yaml").read_text())["perturb"], "types": ["delete"]}
    )
    tables, _ = screen.perturb_dataset(
        encoder,
        datasets.load_from_disk(str(root / "tok" / "train.dataset")),
        settings=settings,
        annotation=annotation,
        special_tokens=False,
        progress=False,
    )
    again = tables["delete"].copy()
    pd.testing.assert_frame_equal(again.reset_index(drop=True), table, check_dtype=False)


def test_perturb_settings_reject_unknown_keys_and_test_split():
    with pytest.raises(ValueError, match="unknown keys"):
        screen.PerturbSettings.from_params({"bogus": 1})
    with pytest.raises(ValueError, match="test is reserved"):
        screen.PerturbSettings.from_params({"split": "test"})
    with pytest.raises(ValueError, match="perturb.types"):
        screen.PerturbSettings.from_params({"types": ["inhibit"]})


def test_the_estimate_screen_finds_the_planted_genes_and_confirms_them_exactly(planted_project):
    root = planted_project
    encoder, annotation = planted_model_and_annotation(root)
    values = yaml.safe_load((root / "params.yaml").read_text())["perturb"]
    dataset = datasets.load_from_disk(str(root / "tok" / "train.dataset"))
    tables, summaries = {}, {}
    for method in ("exact", "estimate"):
        settings = screen.PerturbSettings.from_params(
            {**values, "screen": {"method": method, "grid": 4, "confirm": 0.1}}
        )
        tables[method], summaries[method] = screen.perturb_dataset(
            encoder,
            dataset,
            settings=settings,
            annotation=annotation,
            special_tokens=False,
            progress=False,
        )
    exact, fast = tables["exact"]["delete"], tables["estimate"]["delete"]
    run = summaries["estimate"]["runs"]["delete"]["screen"]
    assert run["method"] == "estimate" and run["grid"] == 4
    total = summaries["exact"]["runs"]["delete"]["perturbations"]
    assert run["estimated_perturbations"] + run["exact_grid_perturbations"] == total
    assert 0 < run["exact_confirmation_perturbations"] < run["estimated_perturbations"]
    # Overexpression has no estimate: it is run exactly, and the report says so.
    over = summaries["estimate"]["runs"]["overexpress"]["screen"]
    assert over["method"] == "exact" and "deletion only" in over["note"]
    # The planted genes still rank first, were confirmed exactly, and carry the exact numbers.
    assert sorted(fast.set_index("symbol")["rank"][[f"AD{t}" for t in AD_TOKENS]]) == [1, 2, 3]
    confirmed = fast[fast["confirmed"]].set_index("token")
    assert run["genes_confirmed"] == len(confirmed) >= 6
    columns = ["mean_shift", "net_mean_shift", "mean_cosine_to_original", "n_cells"]
    pd.testing.assert_frame_equal(
        confirmed[columns], exact.set_index("token").loc[confirmed.index, columns], atol=1e-6
    )
    # The FDR calls use the estimates of the unconfirmed genes (benchmarks/perturbation_screen.py
    # measures how often they agree); the planted genes are called in both.
    for table in (exact, fast):
        assert table.set_index("symbol").loc[[f"AD{t}" for t in AD_TOKENS], "significant"].all()
    assert "confirmed" not in exact.columns
