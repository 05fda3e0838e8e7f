from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tuning_setup import FIXED, SPACE, TUNE_STAGE, load, make_workdir, write_params

from builders import run_stage
from rosmap_geneformer.training.tuning.space import TuneSettings


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Tiny tokenized train/val (no test split at all), a random 2-layer base model, params."""
    return make_workdir(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learning_rate": {"low": 1e-3, "high": 1e-6, "log": True}}, "low 0.001 is above high"),
        ({"lr_scheduler_type": {"choices": ["linear", "cosine_annealing"]}}, "cosine_annealing"),
        ({"weight_decay": {"low": 0.0, "hi": 0.3}}, r"unknown key\(s\) \['hi'\]"),
        ({"learning_rate": {"low": 0.0, "high": 1e-3, "log": True}}, "log: true needs low > 0"),
        ({"epochs": {"low": 1.5, "high": 3}}, "is not a int"),
        ({"warmup_ratio": {"low": 0.0, "high": 1.5}}, r"warmup_ratio: 1\.5 is not allowed"),
        ({"freeze_layers": {"low": 0, "high": 3}}, "base model has 2 encoder layers"),
        ({"dropout": {"low": 0.0, "high": 0.1}}, "unknown key"),
    ],
)
def test_bad_search_space_is_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TuneSettings.from_params(
            {"task": "cell_type", "n_trials": 3, "space": {**SPACE, **change}},
            fixed=FIXED,
            n_layers=2,
        )


def test_incomplete_space_and_bad_enqueue_are_refused() -> None:
    space = {k: v for k, v in SPACE.items() if k != "freeze_layers"}
    with pytest.raises(ValueError, match=r"lacks \['freeze_layers'\]"):
        TuneSettings.from_params({"task": "t", "n_trials": 3, "space": space}, fixed=FIXED)
    with pytest.raises(ValueError, match=r"tune\.enqueue\[0\]\.epochs=10 is outside"):
        TuneSettings.from_params(
            {"task": "t", "n_trials": 3, "space": SPACE, "enqueue": [{"epochs": 10}]},
            fixed=FIXED,
        )
    # A bare value fixes a key, like Geneformer's batch_size choice([12]).
    settings = TuneSettings.from_params(
        {"task": "t", "n_trials": 3, "space": {**SPACE, "batch_size": 12}}, fixed=FIXED
    )
    assert settings.space.distributions["batch_size"].choices == (12,)


def test_stage_refuses_a_bad_space_before_reading_any_data(workdir: Path) -> None:
    params = load(workdir)
    params["tune"]["space"]["lr_scheduler_type"] = {"choices": ["linear", "bogus"]}
    params["paths"]["tokenized"] = str(workdir / "does-not-exist")
    write_params(workdir, params)
    with pytest.raises(ValueError, match=r"tune\.space\.lr_scheduler_type: 'bogus'"):
        run_stage(TUNE_STAGE, "--params", str(workdir / "params.yaml"))
    assert not (workdir / "reports").exists()
