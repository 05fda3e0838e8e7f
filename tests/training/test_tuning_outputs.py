from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tuning_setup import TRAIN_STAGE, TUNE_STAGE, load, make_workdir, write_params

from builders import run_stage
from rosmap_geneformer.training.tuning import outputs, space


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Tiny tokenized train/val (no test split at all), a random 2-layer base model, params."""
    return make_workdir(tmp_path)


def test_set_args_keep_floats_yaml_readable() -> None:
    args = outputs.set_args({"train": {"learning_rate": 1e-05, "lr_scheduler_type": "cosine"}})
    assert args == ["-S", "train.learning_rate=1.0e-05", "-S", "train.lr_scheduler_type=cosine"]
    # DVC parses -S values as YAML: the float must come back as the same float.
    assert yaml.safe_load(args[1].split("=", 1)[1]) == 1e-05


def test_study_prunes_writes_outputs_and_round_trips_into_train(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_stage(TUNE_STAGE, "--params", str(workdir / "params.yaml"))
    out = workdir / "reports/tune"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [outputs.BEST_PARAMS_FILE, outputs.TRIALS_FILE, outputs.METRICS_FILE, *outputs.PLOT_FILES]
    )
    trials = pd.read_csv(out / outputs.TRIALS_FILE, sep="\t")
    assert trials["number"].tolist() == [0, 1, 2, 3]
    assert trials.loc[0, "state"] == "COMPLETE" and trials.loc[0, "enqueued"] == 0
    assert trials.loc[1, "state"] == "PRUNED", trials.to_string()
    assert trials.loc[1, "epochs_run"] == 1, "pruned after its first epoch"
    assert set(trials["state"]) <= {"COMPLETE", "PRUNED"}
    metrics = json.loads((out / outputs.METRICS_FILE).read_text())
    assert metrics["metric"] == "val_macro_f1"
    assert metrics["trials"]["total"] == 4 and metrics["trials"]["pruned"] >= 1
    assert metrics["baseline"]["trial"] == 0
    complete = trials[trials["state"] == "COMPLETE"]
    assert metrics["best"]["value"] == pytest.approx(complete["value"].max())
    assert "wall_s" not in trials.columns and "wall_s" not in json.dumps(metrics)
    for name in outputs.PLOT_FILES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # best_params.yaml -> params (what `dvc exp run -S ...` does) -> train: the same model
    # as the best trial, so the same val metric.
    best = outputs.load_best_params(out / outputs.BEST_PARAMS_FILE)
    assert set(best["train"]) == set(space.SEARCHABLE)
    best_row = complete.loc[complete["value"].idxmax()]
    assert best["train"]["learning_rate"] == pytest.approx(best_row["learning_rate"])
    params = outputs.apply_best_params(load(workdir), best)
    write_params(workdir, params)
    run_stage(TRAIN_STAGE, "--params", str(workdir / "params.yaml"), "--task", "cell_type")
    summary = json.loads((workdir / "finetuned/cell_type/train_summary.json").read_text())
    assert summary["best_metric"] == pytest.approx(metrics["best"]["value"], abs=1e-9)

    # The tuned values do not touch the study (tune reads only the fixed train keys): a rerun
    # resumes the finished study, runs no trial and writes the same best params.
    before = (out / outputs.BEST_PARAMS_FILE).read_text()
    run_stage(TUNE_STAGE, "--params", str(workdir / "params.yaml"))
    assert (out / outputs.BEST_PARAMS_FILE).read_text() == before
    capsys.readouterr()
    run_stage(TUNE_STAGE, "--params", str(workdir / "params.yaml"), "--set-args")
    assert capsys.readouterr().out.split() == outputs.set_args(best)
