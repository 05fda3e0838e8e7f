"""`compute.launcher`: the model stages under `torchrun` with two CPU processes (gloo), straight
from dvc.yaml, against the one-process run of the same repository (issue #19)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvc_repo import copy_repo, dvc, lock_outs, reproduced_template, run

LAUNCHER = "torchrun --standalone --nproc_per_node 2"
# One thread per process: two torch processes on two cores spin otherwise.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_repo(
        reproduced_template(tmp_path_factory), tmp_path_factory.mktemp("launcher") / "repo"
    )
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["compute"]["launcher"] = LAUNCHER
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _untracked(root: Path) -> list[str]:
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], root).stdout
    return [line for line in status.splitlines() if line.startswith("??")]


def test_embed_perturb_and_grn_give_one_process_bytes_on_two(repo: Path) -> None:
    before = lock_outs(repo)
    for stage in ("embed", "perturb", "grn"):
        out = dvc("repro", "-s", "--force", stage, cwd=repo, env=ONE_THREAD)
        assert f"Running stage '{stage}'" in out.stdout, out.stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage in ("embed", "perturb", "grn"):
        assert lock[stage]["cmd"] == f"{LAUNCHER} src/stages/{stage}.py"
        for out in lock[stage]["outs"]:
            assert out["md5"] == before[out["path"]], (stage, out["path"])
    # Rank 1 wrote nothing: no file the one-process run did not have.
    assert _untracked(repo) == []


def test_pretraining_runs_under_the_launcher_with_one_writer(repo: Path) -> None:
    one_process = json.loads((repo / "models/base/base_model.json").read_text())
    dvc("repro", "-s", "--force", "base_model", cwd=repo, env=ONE_THREAD)
    two = json.loads((repo / "models/base/base_model.json").read_text())
    # DistributedDataParallel: each step takes a batch per process, so an epoch has half the
    # steps (rounded up per process).
    assert two["epochs"] == one_process["epochs"]
    assert two["steps"] < one_process["steps"]
    assert two["data"] == one_process["data"]
    assert sorted(p.name for p in (repo / "models/base").iterdir()) == [
        "base_model.json",
        "config.json",
        "model.safetensors",
    ]
    metrics = json.loads((repo / "dvclive/base_model/metrics.json").read_text())
    assert metrics["eval"]["loss"] > 0
    assert _untracked(repo) == []
