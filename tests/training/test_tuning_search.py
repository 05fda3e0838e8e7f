from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from tuning_setup import (
    FIXED,
    SPACE,
    TUNE_STAGE,
    load,
    make_workdir,
    stage_process,
    write_params,
)

from rosmap_geneformer.training.tuning import outputs, search, space


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Tiny tokenized train/val (no test split at all), a random 2-layer base model, params."""
    return make_workdir(tmp_path)


def _toy_objective(trial: optuna.Trial) -> float:
    time.sleep(0.01)
    return trial.suggest_float("x", 0.0, 1.0)


def _claim_all(location: str, name: str, results: Any) -> None:
    storage = search.open_storage(location)
    study = optuna.load_study(study_name=name, storage=storage)
    results.put(search.run_trials(storage, study, _toy_objective))


def test_slots_are_claimed_once_across_processes(tmp_path: Path) -> None:
    location = str(tmp_path / "journal.log")
    storage = search.open_storage(location)
    settings = space.TuneSettings.from_params(
        {"task": "t", "n_trials": 8, "space": SPACE}, fixed=FIXED
    )
    study = search.create_study(storage, name="s", settings=settings, seed=0, attrs={})
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
    search.create_study(storage, name="s", settings=settings, seed=0, attrs={})
    assert len(study.get_trials()) == 8


def test_database_storage_with_heartbeats(tmp_path: Path) -> None:
    location = f"sqlite:///{tmp_path}/study.db"
    storage = search.open_storage(location, heartbeat_s=1)
    settings = space.TuneSettings.from_params(
        {"task": "t", "n_trials": 3, "space": SPACE}, fixed=FIXED
    )
    study = search.create_study(storage, name="s", settings=settings, seed=0, attrs={})
    assert search.run_trials(storage, study, _toy_objective) == 3
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3
    # SQLite has no row locks: it serves one process, never --worker.
    with pytest.raises(ValueError, match="SQLite cannot arbitrate"):
        search.check_shared_storage(location)
    search.check_shared_storage("postgresql://tuner@db.example.org/optuna")


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

    storage = search.open_storage(str(workdir / "shared.log"))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(n)), "no duplicate and no lost trial"
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    ran_main = int(main_out.split("ran ")[-1].split(" trial")[0])
    ran_worker = int(worker_out.split("worker ran ")[-1].split(" trial")[0])
    assert ran_main + ran_worker == n, (main_out, worker_out)
    trials = pd.read_csv(workdir / "reports/tune" / outputs.TRIALS_FILE, sep="\t")
    assert trials["number"].tolist() == list(range(n))


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# One thread per process: two torch processes on two cores spin otherwise.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _under_launcher(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TORCHRUN, str(TUNE_STAGE), "--params", str(workdir / "params.yaml"), *args],
        cwd=workdir,
        env={**os.environ, **ONE_THREAD},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_each_trial_trains_on_every_process_of_the_launcher(workdir: Path) -> None:
    proc = _under_launcher(workdir)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    # Rank 1 trained every trial rank 0 claimed (a rank missing from DistributedDataParallel or
    # from a pruning decision would hang the other one).
    assert "process 1 trained 4 trial(s) with rank 0" in log, log
    trials = pd.read_csv(workdir / "reports/tune" / outputs.TRIALS_FILE, sep="\t")
    assert trials["number"].tolist() == [0, 1, 2, 3]
    assert trials.loc[1, "state"] == "PRUNED" and trials.loc[1, "epochs_run"] == 1
    best_params = (workdir / "reports/tune" / outputs.BEST_PARAMS_FILE).read_text()
    assert "Each trial trained on 2 processes" in best_params
    storage = search.open_storage(str(workdir / "checkpoints" / search.DEFAULT_JOURNAL))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert study.user_attrs[search.PROCESSES_ATTR] == 2
    assert {t.user_attrs[search.PROCESSES_ATTR] for t in study.trials} == {2}
    # Only rank 0 wrote; the ranks' scratch folders are gone.
    assert list((workdir / "checkpoints/tune").iterdir()) == [
        workdir / "checkpoints" / search.DEFAULT_JOURNAL
    ]

    # A one-process worker would add trials of another batch per step: refused in one line.
    worker = stage_process(workdir, "--worker", "--wait-timeout", "30")
    out, _ = worker.communicate(timeout=300)
    assert worker.returncode == 2, out
    refusals = [line for line in out.splitlines() if "error:" in line]
    assert len(refusals) == 1 and "train on 2 process(es) each, this run on 1" in refusals[0], out


def test_a_refusal_under_the_launcher_is_one_line(workdir: Path) -> None:
    proc = _under_launcher(workdir, "--task", "no_such_task")
    assert proc.returncode != 0
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("tune.py: error:")]
    assert len(refusals) == 1, proc.stderr
    assert "no task 'no_such_task' under tasks" in refusals[0]
