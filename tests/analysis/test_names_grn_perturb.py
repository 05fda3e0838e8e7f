"""Names of params.yaml grn and perturb checked against the data (issue 15, item 2): cell types,
states, the state column and regulators that match nothing are refused with the available
names; regulators of which only some are absent are a warning in the grn summary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse
from transformers import BertModel

from builders import gene_id, one_thread, tiny_geneformer_config, write_gene_files
from rosmap_geneformer import counts
from rosmap_geneformer.analysis.grn import stage
from rosmap_geneformer.analysis.grn.settings import GRNSettings
from rosmap_geneformer.analysis.perturbation import screen
from rosmap_geneformer.analysis.perturbation.annotation import token_annotation
from rosmap_geneformer.errors import InputError

VOCAB = 40
# TFA and TFB are expressed; TFC is in the vocabulary but in no cell.
SYMBOLS = {4: "TFA", 5: "TFB", 6: "TFC"}
ABSENT_TOKEN = 6


def symbol(token: int) -> str:
    return SYMBOLS.get(token, f"G{token}")


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """30 cells (Mic and Ast, AD and control) of 12 genes each, their gene files, run from
    ``tmp_path`` as stages run from the project root."""
    rng = np.random.default_rng(0)
    genes = [t for t in range(2, VOCAB) if t != ABSENT_TOKEN]
    cells, rows = [], []
    for i in range(30):
        ids = rng.choice(genes, size=12, replace=False)
        cells.append(ids.tolist())
        rows.append(np.isin(np.arange(2, VOCAB), ids).astype(np.float32) * (i % 3 + 1))
    cell_ids = [f"c{i:03d}" for i in range(30)]
    datasets.Dataset.from_dict(
        {
            "input_ids": cells,
            "length": [len(c) for c in cells],
            "cell_id": cell_ids,
            "cell_type": ["Mic", "Ast"] * 15,
            "ad_status": ["AD", "AD", "control", "control"] * 7 + ["AD", "control"],
        }
    ).save_to_disk(tmp_path / "tok" / "train.dataset")
    matrix = np.vstack(rows)
    write_gene_files(
        tmp_path,
        tokens=list(range(2, VOCAB)),
        symbols=[symbol(t) for t in range(2, VOCAB)],
        counts=sparse.csr_matrix(matrix),
        obs=pd.DataFrame({"n_counts": matrix.sum(axis=1)}, index=cell_ids),
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def encoder() -> BertModel:
    torch.manual_seed(0)
    return BertModel(tiny_geneformer_config(VOCAB), add_pooling_layer=False).eval()


def annotation() -> pd.DataFrame:
    return token_annotation(
        {"<pad>": 0, "<mask>": 1, **{gene_id(t): t for t in range(2, VOCAB)}},
        {gene_id(t): symbol(t) for t in range(2, VOCAB)},
    )


def run_grn(project: Path, encoder: BertModel, **settings):
    values = {"max_cells": 10, "min_cells": 2, "k": [5], "max_tokens": 2048, **settings}
    return stage.grn_dataset(
        encoder,
        datasets.load_from_disk("tok/train.dataset"),
        settings=GRNSettings.from_params(values),
        annotation=annotation(),
        cell_table=counts.read_cells(Path("sampled/train.parquet"), what="sampled cell table"),
        matrix=Path("ensembl.h5ad"),
        special_tokens=False,
        progress=False,
        source="tok/train.dataset",
    )


# ------------------------------------------------------------------------------------------
# grn


def test_misspelt_grn_cell_type_is_refused(project: Path, encoder: BertModel) -> None:
    with pytest.raises(InputError) as caught:
        run_grn(project, encoder, regulators=["TFA"], cell_types=["Mic", "Astro"])
    assert str(caught.value) == (
        "params.yaml grn.cell_types: 'Astro' matches no cell type in tok/train.dataset "
        "(cell_type); available: Ast, Mic. Fix the name in params.yaml."
    )


def test_absent_regulators_are_a_warning_in_the_summary(project: Path, encoder: BertModel) -> None:
    truth = pd.DataFrame({"tf": ["OTHER"], "target": ["G10"]})
    truth.to_csv("truth.tsv", sep="\t", index=False)
    edges, summary, _ = run_grn(
        project, encoder, regulators=["TFA", "TFB", "TFC", "NOTAGENE"], truth="truth.tsv"
    )
    assert set(edges["regulator_symbol"]) == {"TFA", "TFB"}
    assert summary["regulators"]["not_in_vocabulary"] == ["NOTAGENE"]
    assert summary["regulators"]["not_expressed"] == ["TFC"]
    regulators, truth_warning = summary["warnings"]
    assert regulators["key"] == "grn.regulators"
    assert regulators["missing"] == ["TFC", "NOTAGENE"]
    message = regulators["message"]
    assert message.startswith(
        "params.yaml grn.regulators: 'TFC', 'NOTAGENE' match no gene expressed in the train "
        "cells of tok/train.dataset; available: G10, G11, "
    )
    assert f"({VOCAB - 3} in all). Skipped: 2 of 4 regulators remain." in message
    # A truth network without any of the regulators scores nothing: said, not hidden.
    assert truth_warning["key"] == "grn.truth"
    assert "has no edge from any regulator used" in truth_warning["message"]


def test_no_regulator_in_the_data_is_refused(project: Path, encoder: BertModel, tmp_path) -> None:
    with pytest.raises(InputError) as caught:
        run_grn(project, encoder, regulators=["TFC", "NOTAGENE"])
    message = str(caught.value)
    assert message.startswith(
        "params.yaml grn.regulators: 'TFC', 'NOTAGENE' match no gene expressed in the train "
        "cells of tok/train.dataset; available: G10, "
    )
    assert message.endswith("Fix grn.regulators in params.yaml.")
    (tmp_path / "regulators.txt").write_text("# mine\nSOX9\n")
    with pytest.raises(InputError, match=r"grn\.regulators \+ grn\.regulators_file: 'TFC', 'SOX9'"):
        run_grn(project, encoder, regulators=["TFC"], regulators_file="regulators.txt")


# ------------------------------------------------------------------------------------------
# perturb


def run_perturb(encoder: BertModel, **settings) -> None:
    screen.perturb_dataset(
        encoder,
        datasets.load_from_disk("tok/train.dataset"),
        settings=screen.PerturbSettings.from_params(
            {"max_cells": 4, "min_cells": 2, "max_state_cells": 4, "types": ["delete"], **settings}
        ),
        annotation=annotation(),
        special_tokens=False,
        progress=False,
        source="tok/train.dataset",
    )


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"cell_type": "Micro"},
            "params.yaml perturb.cell_type: 'Micro' matches no cell type in tok/train.dataset "
            "(cell_type); available: Ast, Mic. Fix the name in params.yaml.",
        ),
        (
            {"start_state": "ADD"},
            "params.yaml perturb.start_state: 'ADD' matches no state in tok/train.dataset "
            "(ad_status); available: AD, control. Fix the name in params.yaml.",
        ),
        (
            {"goal_state": "ctrl"},
            "params.yaml perturb.goal_state: 'ctrl' matches no state in tok/train.dataset "
            "(ad_status); available: AD, control. Fix the name in params.yaml.",
        ),
        (
            {"alt_states": ["control", "MCI"]},
            "params.yaml perturb.alt_states: 'MCI' matches no state in tok/train.dataset "
            "(ad_status); available: AD, control. Fix the name in params.yaml.",
        ),
        (
            {"state_key": "diagnosis"},
            "params.yaml perturb.state_key: 'diagnosis' matches no column in tok/train.dataset; "
            "available: ad_status, cell_id, cell_type, input_ids, length. Fix the name in "
            "params.yaml, or add the column to tokenize.columns and rerun the tokenize stage.",
        ),
    ],
)
def test_perturb_names_are_checked(project: Path, encoder: BertModel, settings, expected) -> None:
    with pytest.raises(InputError) as caught:
        run_perturb(encoder, **settings)
    assert str(caught.value) == expected


def test_cell_type_without_a_state_names_the_counts(project: Path, encoder: BertModel) -> None:
    dataset = datasets.load_from_disk("tok/train.dataset")
    dataset.map(
        lambda c: {"ad_status": "control" if c["cell_type"] == "Mic" else c["ad_status"]}
    ).save_to_disk("tok2")
    with pytest.raises(
        InputError, match=r"perturb\.cell_type: .* has no Mic cells in state\(s\) AD"
    ):
        screen.perturb_dataset(
            encoder,
            datasets.load_from_disk("tok2"),
            settings=screen.PerturbSettings.from_params({"types": ["delete"]}),
            annotation=annotation(),
            special_tokens=False,
            progress=False,
        )
