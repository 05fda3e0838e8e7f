"""A tiny tune setup shared by the tests of :mod:`rosmap_geneformer.training.tuning`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import yaml

from builders import (
    TRAIN_PATHS,
    project_paths,
    start_stage,
    tokenized_cells,
    write_train_inputs,
)
from builders import write_params as write_params_file

ROOT = Path(__file__).resolve().parents[2]
TUNE_STAGE = ROOT / "src" / "stages" / "tune.py"
TRAIN_STAGE = ROOT / "src" / "stages" / "train.py"
VOCAB = 60

SPACE: dict[str, Any] = {
    "learning_rate": {"low": 1.0e-4, "high": 3.0e-3, "log": True},
    "warmup_ratio": {"low": 0.0, "high": 0.2},
    "weight_decay": {"low": 0.0, "high": 0.1},
    "lr_scheduler_type": {"choices": ["linear", "cosine"]},
    "epochs": {"low": 1, "high": 2},
    "batch_size": {"choices": [8, 16]},
    "freeze_layers": {"low": 0, "high": 1},
}
FIXED = {
    "eval_batch_size": 32,
    "class_weights": True,
    "early_stopping_patience": 2,
    "gradient_accumulation_steps": 1,
}


def make_cells(n: int, patients: list[str], *, seed: int) -> datasets.Dataset:
    """Tokenized-looking cells whose first tokens carry the cell type."""
    return tokenized_cells(
        n, patients, seed=seed, vocab_size=VOCAB, lengths=(12, 24), cell_id="{patient}_cell{i:04d}"
    )


def make_workdir(tmp_path: Path) -> Path:
    """Tiny tokenized train/val (no test split at all), a random 2-layer base model, params."""
    write_train_inputs(
        tmp_path,
        train=make_cells(72, ["P1", "P2", "P3", "P4"], seed=0),
        val=make_cells(30, ["P5", "P6", "P7", "P8"], seed=1),
        vocab_size=VOCAB,
    )
    params = {
        "seed": 0,
        "paths": project_paths(tmp_path, *TRAIN_PATHS, "reports"),
        "tasks": {"cell_type": {"label": "cell_type", "min_cells_per_class": 5}},
        "train": {
            "learning_rate": 1.0e-3,
            "epochs": 2,
            "batch_size": 8,
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "lr_scheduler_type": "linear",
            "freeze_layers": 0,
            **FIXED,
        },
        "tune": {
            "task": "cell_type",
            "n_trials": 4,
            "storage": None,
            "study_name": None,
            # A good point, then a hopeless one (tiny learning rate, all layers frozen but
            # one): the median pruner must stop it after its first epoch.
            "enqueue": [
                {"learning_rate": 3.0e-3, "epochs": 2, "batch_size": 8, "freeze_layers": 0},
                {"learning_rate": 1.0e-4, "epochs": 2, "batch_size": 16, "freeze_layers": 1},
            ],
            "sampler": {"n_startup_trials": 2},
            "pruner": {"n_startup_trials": 1, "n_warmup_steps": 0},
            "space": SPACE,
        },
    }
    write_params(tmp_path, params)
    return tmp_path


def write_params(workdir: Path, params: dict[str, Any]) -> Path:
    """Write ``workdir/params.yaml``, keys in the order given."""
    return write_params_file(workdir, params, sort_keys=False)


def stage_process(workdir: Path, *args: str) -> subprocess.Popen[str]:
    return start_stage(
        [sys.executable, str(TUNE_STAGE), "--params", str(workdir / "params.yaml"), *args],
        cwd=workdir,
        env=dict(os.environ, PYTHONHASHSEED="0"),
    )


def load(workdir: Path) -> dict[str, Any]:
    return yaml.safe_load((workdir / "params.yaml").read_text())
