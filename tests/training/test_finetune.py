from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from builders import (
    TRAIN_PATHS,
    project_paths,
    start_stage,
    tokenized_cells,
    write_params,
    write_train_inputs,
)
from rosmap_geneformer.training import finetune

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 60
AD_TOKEN = 55
TRAIN_STAGE = ROOT / "src" / "stages" / "train.py"


def make_cells(n: int, patients: list[str], *, seed: int) -> datasets.Dataset:
    """Tokenized-looking cells whose tokens carry the cell type and, for AD donors, one AD token."""
    return tokenized_cells(
        n, patients, seed=seed, vocab_size=VOCAB, lengths=(12, 30), ad_token=AD_TOKEN
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A tiny train/val tokenized pair, a random base model and params, in ``tmp_path``."""
    write_train_inputs(
        tmp_path,
        train=make_cells(96, ["P1", "P2", "P3", "P4"], seed=0),
        val=make_cells(36, ["P5", "P6", "P7", "P8"], seed=1),
        vocab_size=VOCAB,
    )
    params = {
        "seed": 0,
        "paths": project_paths(tmp_path, *TRAIN_PATHS),
        "tasks": {
            "cell_type": {"label": "cell_type", "min_cells_per_class": 5},
            "disease": {
                "label": "ad_status",
                "cell_types": ["Mic", "Ast"],
                "patient_level": True,
                "positive_class": "AD",
            },
        },
        "train": {
            "learning_rate": 1e-3,
            "epochs": 3,
            "batch_size": 8,
            "early_stopping_patience": 3,
        },
    }
    write_params(tmp_path, params)
    return tmp_path


def test_collator_pads_right_with_attention_mask() -> None:
    batch = finetune.ClassificationCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7], "label": 1, "length": 3},
            {"input_ids": [8], "label": 0, "length": 1},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_class_weights_are_balanced() -> None:
    weights = finetune.class_weights([0, 0, 0, 1], 2)
    assert torch.allclose(weights, torch.tensor([4 / 6, 4 / 2]))
    # Weighted counts are equal across classes.
    assert torch.isclose(weights[0] * 3, weights[1] * 1)


def test_freeze_layers_freezes_only_the_first_layers() -> None:
    config = BertConfig(
        vocab_size=20,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
    )
    model = BertForSequenceClassification(config)
    finetune.freeze_layers(model, 2)
    frozen = [
        all(not p.requires_grad for p in layer.parameters()) for layer in model.bert.encoder.layer
    ]
    assert frozen == [True, True, False]
    assert all(p.requires_grad for p in model.bert.embeddings.parameters())
    with pytest.raises(ValueError, match="freeze_layers=4"):
        finetune.freeze_layers(model, 4)


def test_bad_hyperparameters_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        finetune.Hyperparameters.from_params({"learning_rat": 1e-4})
    with pytest.raises(ValueError, match=r"train\.learning_rate"):
        finetune.Hyperparameters.from_params({"learning_rate": -1.0})


def _run_stage(workdir: Path, task: str, *, launcher: list[str] | None = None) -> subprocess.Popen:
    cmd = [
        *(launcher or [sys.executable]),
        str(TRAIN_STAGE),
        "--params",
        str(workdir / "params.yaml"),
        "--task",
        task,
    ]
    return start_stage(cmd, cwd=workdir)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_training_is_deterministic_and_saves_the_label_mapping(workdir: Path) -> None:
    for run in ("a", "b"):
        proc = _run_stage(workdir, "disease")
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        (workdir / "finetuned/disease").rename(workdir / f"disease_{run}")
    a, b = _weights(workdir / "disease_a"), _weights(workdir / "disease_b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    mapping = finetune.load_label_mapping(workdir / "disease_a")
    assert mapping["classes"] == ["control", "AD"]
    summary = json.loads((workdir / "disease_a/train_summary.json").read_text())
    assert summary["early_stopping_metric"] == "patient_auroc"
    assert 0.0 <= summary["val"]["patient_auroc"] <= 1.0
    live = json.loads((workdir / "dvclive/train/disease/metrics.json").read_text())
    assert "eval" in live and "macro_f1" in live["eval"]
    probabilities = finetune.predict(
        workdir / "disease_a", datasets.load_from_disk(workdir / "tok/val.dataset")
    )
    assert probabilities.shape == (36, 2) and np.allclose(probabilities.sum(axis=1), 1.0)


def test_interrupted_training_resumes_to_the_same_model(workdir: Path) -> None:
    proc = _run_stage(workdir, "cell_type")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    (workdir / "finetuned/cell_type").rename(workdir / "uninterrupted")

    proc = _run_stage(workdir, "cell_type")
    deadline = time.monotonic() + 240
    checkpoints = workdir / "checkpoints/cell_type"
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, "training finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (workdir / "finetuned/cell_type").exists(), "a killed run must leave no model"

    proc = _run_stage(workdir, "cell_type")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    summary = json.loads((workdir / "finetuned/cell_type/train_summary.json").read_text())
    assert summary["resumed"] is True
    a, b = _weights(workdir / "uninterrupted"), _weights(workdir / "finetuned/cell_type")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_two_process_torchrun_on_cpu(workdir: Path) -> None:
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    proc = _run_stage(workdir, "cell_type", launcher=launcher)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    summary = json.loads((workdir / "finetuned/cell_type/train_summary.json").read_text())
    assert summary["classes"] == ["Ast", "Exc", "Mic"]
    model = BertForSequenceClassification.from_pretrained(workdir / "finetuned/cell_type")
    assert model.config.id2label == {0: "Ast", 1: "Exc", 2: "Mic"}
