"""A real git+DVC repository in a temporary directory, running the project's stages on tiny data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]

# Small enough for seconds per stage, large enough for every split to hold both AD classes.
TINY_PARAMS: dict[str, Any] = {
    # The data these tests were measured on, whatever params.yaml ships (one AD effect for every
    # AD donor and cell type, 1-2 libraries per donor).
    "demo": {
        "n_donors": 12,
        "cells_per_donor": 70,
        "n_genes": 500,
        "resilient_fraction": 0.0,
        "cell_type_effect_sd": 0.0,
        "libraries_per_donor": [1, 2],
    },
    "qc": {"scrublet": {"min_cells_per_library": 40}},
    "sample": {"max_cells_per_patient_cell_type": 20, "max_cells_per_class": 200},
    "tokenize": {"model_input_size": 64, "nproc": 1},
    "base_model": {
        "architecture": {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        "pretrain": {"epochs": 1, "batch_size": 16, "logging_steps": 5},
    },
    "train": {"epochs": 2, "batch_size": 16, "learning_rate": 1.0e-3},
    "evaluate": {"n_boot": 50},
    # About 9 cross-validation donors: 2 folds; a few MIL epochs.
    "donor": {
        "cv": {"n_splits": 2, "n_repeats": 2},
        "n_boot": 50,
        "pseudobulk": {"n_top_genes": 200},
        "mil": {"epochs": 3, "att_dim": 16},
    },
    "tune": {
        "n_trials": 2,
        "enqueue": [{"learning_rate": 1.0e-3, "epochs": 1, "batch_size": 16, "freeze_layers": 0}],
        "sampler": {"n_startup_trials": 1},
        "space": {"epochs": {"low": 1, "high": 2}},
    },
    "perturb": {
        "cell_type": None,
        "max_cells": 6,
        "min_cells": 3,
        "max_state_cells": 100,
        "null_size": 1000,
    },
    "grn": {"max_cells": 10, "min_cells": 3, "genie3_trees": 10},
}


def deep_update(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively overlay ``update`` onto ``base`` (in place) and return it."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The subprocess environment: the test interpreter first on PATH, PYTHONHASHSEED=0, then
    ``env`` on top."""
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out["PYTHONHASHSEED"] = "0"
    out.update(env or {})
    return out


def run(
    cmd: list[str], cwd: Path, *, check: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command with the test interpreter's environment first on PATH (plus ``env``)."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=environment(env), capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        msg = f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        raise AssertionError(msg)
    return proc


def dvc(
    *args: str, cwd: Path, check: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "dvc", *args], cwd, check=check, env=env)


def git(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args], cwd)


def stages_run(output: str) -> set[str]:
    """Names of the stages that `dvc repro` ran (not those it skipped)."""
    return {
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    }


def make_repo(root: Path, params_update: Mapping[str, Any]) -> Path:
    """Copy the pipeline into ``root``, apply ``params_update``, and commit it in git+DVC."""
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        if (PROJECT / name).exists():
            shutil.copy(PROJECT / name, root / name)
    shutil.copytree(
        PROJECT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    deep_update(params, params_update)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git("init", "-q", "-b", "main", cwd=root)
    dvc("init", "-q", cwd=root)
    dvc("config", "core.analytics", "false", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "tiny pipeline", cwd=root)
    return root


def tiny_repo(
    tmp_path_factory: pytest.TempPathFactory,
    name: str = "repo",
    params_update: Mapping[str, Any] | None = None,
) -> Path:
    """A committed git+DVC copy of the pipeline with :data:`TINY_PARAMS` (plus ``params_update``)."""
    update = deep_update(yaml.safe_load(yaml.safe_dump(TINY_PARAMS)), params_update or {})
    return make_repo(tmp_path_factory.mktemp(name), update)


# One full `dvc repro` of the tiny pipeline, shared by the test modules of a session that need a
# reproduced repository (each works on its own copy).
_REPRODUCED: dict[str, Any] = {}


def reproduced_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny repo after one full `dvc repro`, everything committed (dvc.lock, metrics, plots).

    Built once per test session; do not change it: take a :func:`copy_repo` of it.
    """
    if "root" not in _REPRODUCED:
        root = tiny_repo(tmp_path_factory, "reproduced")
        started = time.perf_counter()
        _REPRODUCED["repro_stdout"] = dvc("repro", cwd=root).stdout
        _REPRODUCED["repro_seconds"] = time.perf_counter() - started
        git("add", "-A", cwd=root)
        git("commit", "-q", "-m", "dvc repro", cwd=root)
        _REPRODUCED["root"] = root
    return _REPRODUCED["root"]


def template_repro_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What the template's first `dvc repro` printed (builds the template if needed)."""
    reproduced_template(tmp_path_factory)
    return _REPRODUCED["repro_stdout"]


def repro_seconds() -> float | None:
    """Wall time of the template's `dvc repro` (None before it ran)."""
    return _REPRODUCED.get("repro_seconds")


def copy_repo(source: Path, target: Path) -> Path:
    """Copy a git+DVC repository (with its DVC cache, without .dvc/tmp) to ``target``."""

    def ignore(directory: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(directory) == source / ".dvc" else []

    shutil.copytree(source, target, symlinks=True, ignore=ignore)
    return target


UP_TO_DATE = "Data and pipelines are up to date."


def lock_outs(repo: Path) -> dict[str, str]:
    """Every out of dvc.lock: path -> md5 (``.dir`` for folders)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
    }


def cached_outs(repo: Path) -> set[str]:
    """Paths (as in dvc.lock) of the outs that DVC caches: data and models, not `cache: false`."""
    from dvc.repo import Repo

    with Repo(str(repo)) as project:
        return {
            out.def_path for stage in project.index.stages for out in stage.outs if out.use_cache
        }
