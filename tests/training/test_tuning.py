from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from builders import (
    TRAIN_PATHS,
    project_paths,
    run_stage,
    start_stage,
    tokenized_cells,
    write_train_inputs,
)
from builders import write_params as write_params_file
from rosmap_geneformer.training import tuning

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


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
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


# --------------------------------------------------------------------------------------------
# Search-space checks: before any training


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
        tuning.TuneSettings.from_params(
            {"task": "cell_type", "n_trials": 3, "space": {**SPACE, **change}},
            fixed=FIXED,
            n_layers=2,
        )


def test_incomplete_space_and_bad_enqueue_are_refused() -> None:
    space = {k: v for k, v in SPACE.items() if k != "freeze_layers"}
    with pytest.raises(ValueError, match=r"lacks \['freeze_layers'\]"):
        tuning.TuneSettings.from_params({"task": "t", "n_trials": 3, "space": space}, fixed=FIXED)
    with pytest.raises(ValueError, match=r"tune\.enqueue\[0\]\.epochs=10 is outside"):
        tuning.TuneSettings.from_params(
            {"task": "t", "n_trials": 3, "space": SPACE, "enqueue": [{"epochs": 10}]},
            fixed=FIXED,
        )
    # A bare value fixes a key, like Geneformer's batch_size choice([12]).
    settings = tuning.TuneSettings.from_params(
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


def test_set_args_keep_floats_yaml_readable() -> None:
    args = tuning.set_args({"train": {"learning_rate": 1e-05, "lr_scheduler_type": "cosine"}})
    assert args == ["-S", "train.learning_rate=1.0e-05", "-S", "train.lr_scheduler_type=cosine"]
    # DVC parses -S values as YAML: the float must come back as the same float.
    assert yaml.safe_load(args[1].split("=", 1)[1]) == 1e-05


def _toy_objective(trial: optuna.Trial) -> float:
    time.sleep(0.01)
    return trial.suggest_float("x", 0.0, 1.0)


def _claim_all(location: str, name: str, results: Any) -> None:
    storage = tuning.open_storage(location)
    study = optuna.load_study(study_name=name, storage=storage)
    results.put(tuning.run_trials(storage, study, _toy_objective))


def test_slots_are_claimed_once_across_processes(tmp_path: Path) -> None:
    location = str(tmp_path / "journal.log")
    storage = tuning.open_storage(location)
    settings = tuning.TuneSettings.from_params(
        {"task": "t", "n_trials": 8, "space": SPACE}, fixed=FIXED
    )
    study = tuning.create_study(storage, name="s", settings=settings, seed=0, attrs={})
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_claim_all, args=(location, "s", results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert sum(results.get(timeout=5) for _ in workers) == 8
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(8)), "no duplicate and no lost trial"
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Rerunning the main tops the study up to n_trials again: nothing to add.
    tuning.create_study(storage, name="s", settings=settings, seed=0, attrs={})
    assert len(study.get_trials()) == 8


def test_database_storage_with_heartbeats(tmp_path: Path) -> None:
    location = f"sqlite:///{tmp_path}/study.db"
    storage = tuning.open_storage(location, heartbeat_s=1)
    settings = tuning.TuneSettings.from_params(
        {"task": "t", "n_trials": 3, "space": SPACE}, fixed=FIXED
    )
    study = tuning.create_study(storage, name="s", settings=settings, seed=0, attrs={})
    assert tuning.run_trials(storage, study, _toy_objective) == 3
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3
    # SQLite has no row locks: it serves one process, never --worker.
    with pytest.raises(ValueError, match="SQLite cannot arbitrate"):
        tuning.check_shared_storage(location)
    tuning.check_shared_storage("postgresql://tuner@db.example.org/optuna")


# --------------------------------------------------------------------------------------------
# A real study


def test_study_prunes_writes_outputs_and_round_trips_into_train(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_stage(TUNE_STAGE, "--params", str(workdir / "params.yaml"))
    out = workdir / "reports/tune"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [tuning.BEST_PARAMS_FILE, tuning.TRIALS_FILE, tuning.METRICS_FILE, *tuning.PLOT_FILES]
    )
    trials = pd.read_csv(out / tuning.TRIALS_FILE, sep="\t")
    assert trials["number"].tolist() == [0, 1, 2, 3]
    assert trials.loc[0, "state"] == "COMPLETE" and trials.loc[0, "enqueued"] == 0
    assert trials.loc[1, "state"] == "PRUNED", trials.to_string()
    assert trials.loc[1, "epochs_run"] == 1, "pruned after its first epoch"
    assert set(trials["state"]) <= {"COMPLETE", "PRUNED"}
    metrics = json.loads((out / tuning.METRICS_FILE).read_text())
    assert metrics["metric"] == "val_macro_f1"
    assert metrics["trials"]["total"] == 4 and metrics["trials"]["pruned"] >= 1
    assert metrics["baseline"]["trial"] == 0
    complete = trials[trials["state"] == "COMPLETE"]
    assert metrics["best"]["value"] == pytest.approx(complete["value"].max())
    assert "wall_s" not in trials.columns and "wall_s" not in json.dumps(metrics)
    for name in tuning.PLOT_FILES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # best_params.yaml -> params (what `dvc exp run -S ...` does) -> train: the same model
    # as the best trial, so the same val metric.
    best = tuning.load_best_params(out / tuning.BEST_PARAMS_FILE)
    assert set(best["train"]) == set(tuning.SEARCHABLE)
    best_row = complete.loc[complete["value"].idxmax()]
    assert best["train"]["learning_rate"] == pytest.approx(best_row["learning_rate"])
    params = tuning.apply_best_params(load(workdir), best)
    write_params(workdir, params)
    run_stage(TRAIN_STAGE, "--params", str(workdir / "params.yaml"), "--task", "cell_type")
    summary = json.loads((workdir / "finetuned/cell_type/train_summary.json").read_text())
    assert summary["best_metric"] == pytest.approx(metrics["best"]["value"], abs=1e-9)

    # The tuned values do not touch the study (tune reads only the fixed train keys): a rerun
    # resumes the finished study, runs no trial and writes the same best params.
    before = (out / tuning.BEST_PARAMS_FILE).read_text()
    run_stage(TUNE_STAGE, "--params", str(workdir / "params.yaml"))
    assert (out / tuning.BEST_PARAMS_FILE).read_text() == before
    capsys.readouterr()
    run_stage(TUNE_STAGE, "--params", str(workdir / "params.yaml"), "--set-args")
    assert capsys.readouterr().out.split() == tuning.set_args(best)


def test_main_and_worker_share_one_budget(workdir: Path) -> None:
    params = load(workdir)
    n = 6
    params["tune"].update(
        {"n_trials": n, "enqueue": [], "pruner": None, "storage": str(workdir / "shared.log")}
    )
    params["tune"]["space"]["epochs"] = 1
    write_params(workdir, params)
    worker = stage_process(workdir, "--worker", "--wait-timeout", "120")
    main = stage_process(workdir)
    main_out, _ = main.communicate(timeout=600)
    worker_out, _ = worker.communicate(timeout=600)
    assert main.returncode == 0, main_out
    assert worker.returncode == 0, worker_out

    storage = tuning.open_storage(str(workdir / "shared.log"))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(n)), "no duplicate and no lost trial"
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    ran_main = int(main_out.split("ran ")[-1].split(" trial")[0])
    ran_worker = int(worker_out.split("worker ran ")[-1].split(" trial")[0])
    assert ran_main + ran_worker == n, (main_out, worker_out)
    trials = pd.read_csv(workdir / "reports/tune" / tuning.TRIALS_FILE, sep="\t")
    assert trials["number"].tolist() == list(range(n))
