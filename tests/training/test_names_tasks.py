"""Names of params.yaml tasks checked against the data, and rare classes counted as a loss
(issue 15, items 2 and 7)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import datasets
import pytest

from builders import project_paths, start_stage, tokenized_cells, write_params, write_train_inputs
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.losses import LossLimit
from rosmap_geneformer.training import tasks

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 60


def saved(tmp_path: Path, name: str, dataset: datasets.Dataset) -> datasets.Dataset:
    """``dataset`` saved and read back, as the stages read it (its folder names it)."""
    dataset.save_to_disk(tmp_path / f"{name}.dataset")
    return datasets.load_from_disk(str(tmp_path / f"{name}.dataset"))


@pytest.fixture
def splits(tmp_path: Path) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Train and val cells (Exc, Mic, Ast; AD and control donors), saved to disk."""
    train = tokenized_cells(
        60, ["P1", "P2", "P3", "P4"], seed=0, vocab_size=VOCAB, lengths=(12, 20)
    )
    val = tokenized_cells(18, ["P5", "P6"], seed=1, vocab_size=VOCAB, lengths=(12, 20))
    return saved(tmp_path, "train", train), saved(tmp_path, "val", val)


def test_misspelt_cell_type_is_refused_with_the_available_ones(splits, tmp_path: Path) -> None:
    train, val = splits
    task = tasks.TaskSpec(name="disease", label="ad_status", cell_types=["Exc", "Micro"])
    with pytest.raises(InputError) as caught:
        tasks.prepare_task(train, val, task)
    message = str(caught.value)
    assert message == (
        f"params.yaml tasks.disease.cell_types: 'Micro' matches no cell type in "
        f"{(tmp_path / 'train.dataset').as_posix()} (cell_type); available: Ast, Exc, Mic. "
        "Fix the name in params.yaml."
    )
    assert "\n" not in message


def test_cell_type_missing_from_val_only_is_a_warning_in_the_report(splits, tmp_path) -> None:
    train, val = splits
    val = saved(tmp_path, "val_no_mic", val.filter(lambda c: c["cell_type"] != "Mic"))
    task = tasks.TaskSpec(name="disease", label="ad_status", cell_types=["Mic", "Ast"])
    prepared = tasks.prepare_task(train, val, task)
    (warning,) = prepared.report["warnings"]
    assert warning["key"] == "tasks.disease.cell_types"
    assert warning["missing"] == ["Mic"]
    assert "'Mic' matches no cell type" in warning["message"]
    assert "available: Ast, Exc" in warning["message"]
    assert set(prepared.val["cell_type"]) == {"Ast"}


def test_misspelt_positive_class_lists_the_classes(splits) -> None:
    train, val = splits
    task = tasks.TaskSpec(name="disease", label="ad_status", positive_class="ad")
    with pytest.raises(
        InputError, match=r"tasks\.disease\.positive_class: 'ad' matches no class"
    ) as caught:
        tasks.prepare_task(train, val, task)
    assert "(ad_status); available: AD, control." in str(caught.value)


def test_rare_positive_class_names_min_cells_per_class(splits) -> None:
    train, val = splits
    task = tasks.TaskSpec(
        name="disease", label="ad_status", positive_class="AD", min_cells_per_class=1000
    )
    with pytest.raises(
        InputError,
        match=r"positive_class: 'AD' has 30 cells in .* fewer than tasks\.disease\.min_cells_per_class = 1000",
    ):
        tasks.prepare_task(train, val, task)


def test_unknown_label_column_names_the_key_and_the_columns(splits) -> None:
    train, val = splits
    task = tasks.TaskSpec(name="disease", label="ad_stat")
    with pytest.raises(InputError) as caught:
        tasks.prepare_task(train, val, task)
    message = str(caught.value)
    assert message.startswith("params.yaml tasks.disease.label: 'ad_stat' matches no column in ")
    assert "available: ad_status, cell_id, cell_type, input_ids, length, patient_id." in message
    assert "tokenize.columns" in message


def _with_rare_class(train: datasets.Dataset, n_rare: int) -> datasets.Dataset:
    extra = datasets.Dataset.from_dict(
        {k: [train[0][k]] * n_rare for k in train.column_names} | {"cell_type": ["Vas"] * n_rare}
    )
    return datasets.concatenate_datasets([train, extra])


def test_rare_class_cells_are_a_checked_loss(splits) -> None:
    train, val = splits
    train = _with_rare_class(train, 2)
    limit = LossLimit(warn=0.01, stop=0.2)
    task = tasks.TaskSpec.from_params(
        "cell_type", {"label": "cell_type", "min_cells_per_class": 3}, rare_class_limit=limit
    )
    prepared = tasks.prepare_task(train, val, task)
    entry = prepared.report["rare_class_cells"]
    assert entry == {
        "lost": 2,
        "total": 62,
        "fraction": round(2 / 62, 6),
        "warn_above": 0.01,
        "stop_above": 0.2,
        "status": "warning",
    }
    strict = tasks.TaskSpec.from_params(
        "cell_type",
        {"label": "cell_type", "min_cells_per_class": 3},
        rare_class_limit=LossLimit(warn=0.01, stop=0.02),
    )
    with pytest.raises(
        InputError, match=r"losses\.rare_class_cells\.stop = 0\.02.*min_cells_per_class"
    ):
        tasks.prepare_task(train, val, strict)
    # Without a limit (a caller without params.yaml) the drop is counted, not checked.
    unchecked = tasks.prepare_task(
        train, val, tasks.TaskSpec(name="cell_type", label="cell_type", min_cells_per_class=3)
    )
    assert "rare_class_cells" not in unchecked.report
    assert unchecked.report["train_cells_rare_class"] == 2


def test_train_stage_refuses_a_misspelt_cell_type_in_one_line(tmp_path: Path) -> None:
    write_train_inputs(
        tmp_path,
        train=tokenized_cells(30, ["P1", "P2"], seed=0, vocab_size=VOCAB, lengths=(12, 20)),
        val=tokenized_cells(12, ["P3", "P4"], seed=1, vocab_size=VOCAB, lengths=(12, 20)),
        vocab_size=VOCAB,
    )
    params = {
        "seed": 0,
        "paths": project_paths(
            tmp_path, "tokenized", "base_model", "finetuned", "checkpoints", "dvclive"
        ),
        "tasks": {
            "disease": {"label": "ad_status", "cell_types": ["Micro"], "positive_class": "AD"}
        },
        "train": {"epochs": 1},
    }
    write_params(tmp_path, params)
    proc = start_stage(
        [
            sys.executable,
            str(ROOT / "src/stages/train.py"),
            "--params",
            str(tmp_path / "params.yaml"),
            "--task",
            "disease",
        ],
        cwd=tmp_path,
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1, out
    assert re.search(
        r"train\.py: error: params\.yaml tasks\.disease\.cell_types: 'Micro' matches no cell type in "
        r"tok/train\.dataset \(cell_type\); available: Ast, Exc, Mic\.",
        errors[0],
    ), errors[0]
