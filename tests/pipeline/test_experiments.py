"""A queued hyperparameter grid with `dvc exp run --queue`, run by one queue worker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from dvc_repo import copy_repo, dvc, reproduced_template, stages_run

pytestmark = pytest.mark.pipeline

QUEUE_TIMEOUT_S = 900


def _wait_for_queue(repo: Path) -> str:
    """Poll `dvc queue status` until nothing is queued or running (never `dvc queue stop`)."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        status = dvc("queue", "status", cwd=repo).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {QUEUE_TIMEOUT_S} s:\n{status}"
        time.sleep(3)


def test_queued_learning_rate_grid_runs_and_is_listed(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    repo = copy_repo(
        reproduced_template(tmp_path_factory), tmp_path_factory.mktemp("experiments") / "repo"
    )

    # A grid on one task: each experiment reproduces up to that task's evaluation.
    dvc(
        "exp",
        "run",
        "--queue",
        "evaluate@cell_type",
        "-S",
        "train.learning_rate=1e-4,3e-4",
        cwd=repo,
    )
    assert dvc("queue", "status", cwd=repo).stdout.count("Queued") == 2
    dvc("queue", "start", "-j", "1", cwd=repo)
    status = _wait_for_queue(repo)
    assert "Failed" not in status, status

    shown = json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)
    experiments = [
        exp
        for commit in shown
        for entry in commit.get("experiments") or []
        for exp in entry.get("revs", [])
    ]
    rates = {}
    for exp in experiments:
        data = exp["data"]
        rate = data["params"]["params.yaml"]["data"]["train"]["learning_rate"]
        metrics = data["metrics"]
        assert any("eval/cell_type/metrics.json" in path for path in metrics), metrics.keys()
        rates[rate] = metrics
    assert set(rates) == {1e-4, 3e-4}
    # Only the stages a learning-rate change invalidates rerun in each experiment.
    log = dvc("queue", "logs", experiments[0]["name"], cwd=repo, check=False).stdout
    assert stages_run(log) == {"train@cell_type", "evaluate@cell_type"}, log[-2000:]
