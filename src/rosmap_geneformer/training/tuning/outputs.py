"""What a finished study leaves behind: ``best_params.yaml``, ``trials.tsv``, ``metrics.json``
and plots, and the way back from ``best_params.yaml`` into ``params.yaml`` (``-S`` arguments).

Outputs hold no wall times (they stay in the study's storage and the log): a cached output must
have the same bytes on every run.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState

from rosmap_geneformer.errors import InputError, MissingInputError
from rosmap_geneformer.io import atomic_output, save_figure, write_json, write_tsv
from rosmap_geneformer.training.tuning.search import finite
from rosmap_geneformer.training.tuning.space import SEARCHABLE

logger = logging.getLogger(__name__)

BEST_PARAMS_FILE = "best_params.yaml"
TRIALS_FILE = "trials.tsv"
METRICS_FILE = "metrics.json"
PLOT_FILES = ("optimization_history.png", "param_importances.png", "intermediate_values.png")


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, epochs, params, val per epoch.

    Wall times stay in the study's storage (user attribute ``wall_s``) and the log: a cached
    output must have the same bytes on every run.
    """
    rows = []
    for trial in study.get_trials(deepcopy=False):
        history = trial.user_attrs.get("val_history", [])
        row: dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name,
            "value": trial.value,
            "epochs_run": len(history),
            "best_epoch": trial.user_attrs.get("best_epoch"),
            "enqueued": trial.user_attrs.get("enqueued"),
        }
        for key in SEARCHABLE:
            row[key] = trial.params.get(key)
        row["val_by_epoch"] = json.dumps(list(trial.intermediate_values.values()))
        row["error"] = trial.user_attrs.get("error")
        rows.append(row)
    columns = [
        "number", "state", "value", "epochs_run", "best_epoch", "enqueued",
        *SEARCHABLE, "val_by_epoch", "error",
    ]  # fmt: skip
    table = pd.DataFrame(rows, columns=columns)
    for column in ("best_epoch", "enqueued"):
        table[column] = table[column].astype("Int64")
    return table


def best_params_yaml(study: optuna.Study, *, metric: str, processes_per_trial: int = 1) -> str:
    """``best_params.yaml``: the best trial's values under ``train:``, with how to apply them.

    Trials trained on several processes say so: ``train`` matches them only under the same
    launcher (a step takes ``batch_size`` cells per process).
    """
    best = study.best_trial
    values = {key: best.params[key] for key in SEARCHABLE}
    header = [
        f"# Best of {len(study.trials)} trials of study {study.study_name}: trial {best.number},",
        f"# val {metric} {best.value:.6g}. Promote the values into params.yaml with:",
        f"#   dvc exp run {' '.join(set_args({'train': values}))}",
        "# (or `dvc exp run $(python src/stages/tune.py --set-args)`).",
    ]
    if processes_per_trial > 1:
        header.append(
            f"# Each trial trained on {processes_per_trial} processes (batch_size cells per "
            "process and step): train under the same compute.launcher to match."
        )
    return "\n".join(header) + "\n" + yaml.safe_dump({"train": values}, sort_keys=False)


def _yaml_scalar(value: Any) -> str:
    """A value as YAML 1.1 reads it back to the same thing (floats keep a dot: ``1.0e-05``)."""
    return yaml.safe_dump(value).strip().removesuffix("...").strip()


def set_args(best: Mapping[str, Any]) -> list[str]:
    """``-S train.<key>=<value>`` arguments for ``dvc exp run`` from a best-params mapping."""
    args = []
    for section, values in best.items():
        for key, value in values.items():
            args += ["-S", f"{section}.{key}={_yaml_scalar(value)}"]
    return args


def load_best_params(path: str | Path) -> dict[str, Any]:
    """Read ``best_params.yaml`` and check that it holds searchable ``train`` keys only."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: not found; run the tune stage (`dvc repro tune`) first."
        raise MissingInputError(msg)
    best = yaml.safe_load(path.read_text())
    if not isinstance(best, dict) or set(best) != {"train"} or not isinstance(best["train"], dict):
        msg = f"{path}: expected a mapping with one key, train."
        raise InputError(msg)
    unknown = sorted(set(best["train"]) - set(SEARCHABLE))
    if unknown:
        msg = f"{path}: unknown train key(s) {unknown}."
        raise InputError(msg)
    return best


def apply_best_params(params: Mapping[str, Any], best: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` with the tuned ``train`` values in place (what ``-S`` does)."""
    updated = json.loads(json.dumps(params))
    updated.setdefault("train", {}).update(best["train"])
    return updated


def _placeholder(text: str) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


def study_figures(study: optuna.Study, *, seed: int, metric: str) -> dict[str, Any]:
    """Optimisation history, parameter importances (fANOVA, seeded) and per-epoch val curves.

    A plot that the study cannot support yet (importances need two completed trials) becomes a
    figure that says so, so the stage always writes the same files.
    """
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    makers = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(
            study, target_name=f"val {metric}"
        ),
        "param_importances.png": lambda: ovm.plot_param_importances(
            study,
            evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
            target_name=f"val {metric}",
        ),
        "intermediate_values.png": lambda: ovm.plot_intermediate_values(study),
    }
    figures = {}
    for name, make in makers.items():
        if name == "param_importances.png" and len(complete) < 2:
            figures[name] = _placeholder(
                f"parameter importances need >= 2 completed trials ({len(complete)} so far)"
            )
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = make()
            except (ValueError, RuntimeError) as exc:
                logger.warning("%s: %s", name, exc)
                figures[name] = _placeholder(f"{name.removesuffix('.png')}: {exc}")
                continue
        figures[name] = axes.figure
    return figures


def param_importances(study: optuna.Study, *, seed: int) -> dict[str, float] | None:
    """fANOVA importances (seeded), or ``None`` with fewer than two completed trials."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return None
    try:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)
        )
    except (ValueError, RuntimeError) as exc:
        logger.warning("parameter importances: %s", exc)
        return None
    return {k: round(float(v), 6) for k, v in importances.items()}


def summarise(study: optuna.Study, *, task: str, metric: str, seed: int) -> dict[str, Any]:
    """``metrics.json``: trial counts, best and baseline (first enqueued) values."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    summary: dict[str, Any] = {
        "task": task,
        "metric": f"val_{metric}",
        "study": study.study_name,
        "trials": {"total": len(trials), **{k: counts[k] for k in ("complete", "pruned", "fail")}},
        "best": None,
        "baseline": None,
        "param_importance": param_importances(study, seed=seed),
    }
    if counts["complete"]:
        best = study.best_trial
        summary["best"] = {"value": best.value, "trial": best.number}
    baseline = [t for t in trials if t.user_attrs.get("enqueued") == 0 and t.state.is_finished()]
    if baseline:
        t = baseline[-1]
        summary["baseline"] = {"value": t.value, "trial": t.number, "state": t.state.name}
        if summary["best"] and t.value is not None and t.state == TrialState.COMPLETE:
            summary["best"]["gain_over_baseline"] = summary["best"]["value"] - t.value
    return finite(summary)


def write_outputs(
    study: optuna.Study,
    out_dir: str | Path,
    *,
    task: str,
    metric: str,
    seed: int,
    processes_per_trial: int = 1,
) -> dict[str, Any]:
    """Write ``best_params.yaml``, ``trials.tsv``, ``metrics.json`` and the PNG plots into
    ``out_dir``, atomically as one folder."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        msg = (
            f"study {study.study_name}: no trial completed (all pruned or failed; see the "
            "trials' error attribute). Loosen tune.pruner or check the logs."
        )
        raise RuntimeError(msg)
    summary = summarise(study, task=task, metric=metric, seed=seed)
    figures = study_figures(study, seed=seed, metric=metric)
    with atomic_output(out_dir) as tmp:
        tmp.mkdir(parents=True)
        (tmp / BEST_PARAMS_FILE).write_text(
            best_params_yaml(study, metric=metric, processes_per_trial=processes_per_trial)
        )
        write_tsv(trials_table(study), tmp / TRIALS_FILE)
        write_json(summary, tmp / METRICS_FILE)
        for name, fig in figures.items():
            save_figure(fig, tmp / name)
    logger.info(
        "study %s: best val %s %s (trial %s) of %s; wrote %s",
        study.study_name,
        metric,
        summary["best"]["value"],
        summary["best"]["trial"],
        summary["trials"],
        out_dir,
    )
    log_wall_times(study)
    return summary


def log_wall_times(study: optuna.Study) -> None:
    """Log the wall time per trial (kept in the storage, never in a cached output)."""
    for state in (TrialState.COMPLETE, TrialState.PRUNED):
        walls = [
            t.user_attrs["wall_s"]
            for t in study.get_trials(deepcopy=False, states=(state,))
            if "wall_s" in t.user_attrs
        ]
        if walls:
            logger.info(
                "wall time per %s trial: mean %.1f s, median %.1f s, total %.1f s (%d trials)",
                state.name.lower(),
                np.mean(walls),
                np.median(walls),
                np.sum(walls),
                len(walls),
            )
