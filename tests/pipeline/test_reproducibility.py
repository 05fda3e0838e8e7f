"""Byte-level reproducibility of the whole tiny pipeline, and interrupted stages.

`dvc repro -f` runs every stage again, in another folder and with another Python hash seed, and
must give the same bytes: every out in dvc.lock keeps its hash (data and models, and also the
metrics, plots, dvclive logs and reports), so git sees no change at all and `dvc metrics diff` is
empty. Wall-clock timings are kept out of every output for this (see
``training.trainer.is_wall_clock``). Both runs use torch's default number of CPU threads: model weights
depend on it (1 and 2 threads give different bytes). A stage killed partway must leave nothing
that DVC could cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dvc_repo import (
    UP_TO_DATE,
    cached_outs,
    copy_repo,
    dvc,
    environment,
    git,
    lock_outs,
    repro_seconds,
    reproduced_template,
    stages_run,
)

pytestmark = pytest.mark.pipeline


def lock_stages(repo: Path) -> set[str]:
    return set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"])


def out_files(repo: Path, out: str) -> dict[str, bytes]:
    top = repo / out
    files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
    return {f.relative_to(repo).as_posix(): f.read_bytes() for f in files}


def differences(first: Path, second: Path, out: str) -> list[str]:
    """Files of ``out`` that differ between the two runs (or exist in one only)."""
    a, b = out_files(first, out), out_files(second, out)
    return sorted(rel for rel in set(a) | set(b) if a.get(rel) != b.get(rel))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The pipeline run twice from scratch: the shared first run, and `dvc repro -f` on a copy in
    another folder with another hash seed (set and dict orders, absolute paths would show)."""
    first = reproduced_template(tmp_path_factory)
    second = copy_repo(first, tmp_path_factory.mktemp("rerun") / "repo")
    started = time.perf_counter()
    proc = dvc("repro", "-f", cwd=second, env={"PYTHONHASHSEED": "1"})
    seconds = time.perf_counter() - started
    assert stages_run(proc.stdout) == lock_stages(first), "dvc repro -f skipped stages"
    print(  # shown with `pytest -s`
        f"\ntiny pipeline: first dvc repro {repro_seconds() or float('nan'):.0f} s, "
        f"dvc repro -f {seconds:.0f} s"
    )
    return first, second


def test_every_out_keeps_its_hash(runs: tuple[Path, Path]) -> None:
    first, second = runs
    a, b = lock_outs(first), lock_outs(second)
    assert set(a) == set(b)
    # Data, dictionaries, tokenized datasets, base and fine-tuned models, predictions ...
    assert {"data/interim/ensembl.h5ad", "models/base", "models/finetuned/disease"} <= cached_outs(
        first
    )
    # ... and the metrics, plots, dvclive logs and reports (cache: false).
    assert any(out.startswith("dvclive/") for out in a) and any("metrics.json" in o for o in a)
    changed = {out: differences(first, second, out) for out in sorted(a) if a[out] != b[out]}
    assert not changed, f"outs whose bytes differ between two runs (out: files): {changed}"


def test_git_sees_no_change_and_metrics_are_identical(runs: tuple[Path, Path]) -> None:
    _, second = runs
    # The first run's dvc.lock, metrics, plots and reports are committed in the copy.
    assert git("status", "--porcelain", cwd=second).stdout.strip() == ""
    diff = json.loads(dvc("metrics", "diff", "--all", "--json", cwd=second).stdout or "{}")
    assert diff, "dvc metrics diff --all lists no metrics"
    changed = {
        f"{path}: {name}": values
        for path, metrics in diff.items()
        for name, values in metrics.items()
        if values.get("old") != values.get("new")
    }
    assert not changed, changed


def test_a_killed_stage_leaves_nothing_dvc_could_cache(runs: tuple[Path, Path]) -> None:
    _, repo = runs
    out = repo / "models/base"
    before = lock_outs(repo)["models/base"]
    cache = repo / ".dvc/cache"
    objects = {p for p in cache.rglob("*") if p.is_file()}
    # Long pretraining, so that the stage is surely killed partway; the params go back after.
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["base_model"]["pretrain"]["epochs"] = 200
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "base_model"],
        cwd=repo,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: dvc and the stage's python
    )
    try:
        # The stage is under way once it writes its (atomic, temporary) dvclive log.
        deadline = time.monotonic() + 180
        while not list(repo.glob("dvclive/.tmp-base_model-*/**/*.tsv")):
            assert proc.poll() is None, "base_model ended before it could be killed"
            assert time.monotonic() < deadline, "base_model did not start"
            time.sleep(0.05)
        time.sleep(1.0)  # into pretraining
        assert proc.poll() is None, "base_model ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    params_path.write_text(original)

    assert not out.exists(), "a killed stage left models/base behind"
    # Nothing of the killed run went into the DVC cache or the run cache.
    assert {p for p in cache.rglob("*") if p.is_file()} == objects
    status = dvc("status", "base_model", cwd=repo).stdout
    assert "base_model" in status and "deleted" in status, status

    # A rerun (of the command: no restore from the run cache) gives the same model again, so
    # nothing downstream has to run.
    ran = stages_run(dvc("repro", "--no-run-cache", cwd=repo).stdout)
    assert ran == {"base_model"}, ran
    assert lock_outs(repo)["models/base"] == before
    assert dvc("status", cwd=repo).stdout.strip() == UP_TO_DATE
    # The rerun removed what the killed one left behind.
    assert not list(repo.glob("models/.tmp-base-*")) + list(repo.glob("dvclive/.tmp-*"))
