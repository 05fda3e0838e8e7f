"""Hyperparameter search for fine-tuning, with optuna, on the patient-level ``val`` split only.

Geneformer tunes with Ray on a cell-level split whose eval set is its test set (spec section 5), so
its scores leak. Here a study trains on ``train``, scores every epoch on ``val`` (macro-F1, or
patient-level AUROC for a patient-level task: the task's early-stopping metric) and never sees
``test``.

Design
------
- The search space is ``params.yaml: tune.space``; it covers Geneformer's space (learning rate
  log-uniform, warm-up, weight decay, scheduler, epochs, batch size) plus ``freeze_layers``. The
  other fine-tuning settings (``train.eval_batch_size``, ``class_weights``,
  ``early_stopping_patience``, ``gradient_accumulation_steps``) are fixed from ``train``, so a
  tuned value promoted into ``train`` does not invalidate the study.
- Each trial is a :func:`rosmap_geneformer.training.finetune.build_trainer` run, the very code path of the
  ``train`` stage, with the pipeline ``seed``: the same hyperparameters give the same model, so the
  best trial's val metric is what ``train`` reproduces with the tuned values. (Geneformer searches
  over the seed too; that confounds hyperparameters with initialisation noise.)
- Sampler: TPE seeded with ``seed`` (``constant_liar`` for parallel workers). Pruner: median
  pruner, fed the val metric after every epoch by :class:`PruningCallback`, at step = epoch so
  that trials with different batch sizes compare.
- Budget: the main process enqueues ``tune.n_trials`` trial slots in the study; the main process and
  any ``--worker`` pop slots atomically from the storage until none are left, so the study ends with
  exactly ``n_trials`` trials however many workers join. Storage is a journal file by default
  (resumable: it lives under ``paths.checkpoints``, which is no DVC output) or any database URL for
  workers on many machines.

Why not ``Trainer.hyperparameter_search(backend="optuna")`` (transformers 5.23)? It reuses one
``Trainer`` across trials, and ``EarlyStoppingCallback`` keeps its patience counter between them;
it reports to the pruner at step = global step, so the median pruner never compares trials with
different batch sizes (it compares values at equal steps only); its objective is the last epoch's
metric, not the best epoch that ``train`` keeps; and it passes no callbacks to
``Study.optimize``, so there is no shared budget across workers.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import optuna
import pandas as pd
import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState
from transformers import TrainerCallback

from rosmap_geneformer.io import atomic_output, save_figure, write_json, write_tsv
from rosmap_geneformer.training import finetune

logger = logging.getLogger(__name__)

#: ``train`` keys a study searches; ``tune.space`` must give each a range, choices or a value.
SEARCHABLE: dict[str, type] = {
    "learning_rate": float,
    "warmup_ratio": float,
    "weight_decay": float,
    "lr_scheduler_type": str,
    "epochs": int,
    "batch_size": int,
    "freeze_layers": int,
}
#: ``train`` keys a study takes as they are.
FIXED = (
    "eval_batch_size",
    "class_weights",
    "early_stopping_patience",
    "gradient_accumulation_steps",
)
BEST_PARAMS_FILE = "best_params.yaml"
TRIALS_FILE = "trials.tsv"
METRICS_FILE = "metrics.json"
PLOT_FILES = ("optimization_history.png", "param_importances.png", "intermediate_values.png")
DEFAULT_JOURNAL = "tune/journal.log"
_READY_ATTR = "slots_ready"


# --------------------------------------------------------------------------------------------
# Settings


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_distribution(key: str, spec: Any) -> BaseDistribution:
    """One ``tune.space`` entry as an optuna distribution.

    ``{low, high}`` (optional ``log``, ``step``) is a range, ``{choices: [...]}`` a categorical
    and a bare value a fixed choice. Integers for ``epochs``, ``batch_size`` and
    ``freeze_layers``, floats for the rest, strings for ``lr_scheduler_type``.
    """
    where = f"params.yaml: tune.space.{key}"
    kind = SEARCHABLE[key]
    if not isinstance(spec, Mapping):
        spec = {"choices": [spec]}
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
    if unknown:
        msg = f"{where} has unknown key(s) {unknown}; use low/high (log, step) or choices."
        raise ValueError(msg)
    if "choices" in spec:
        if set(spec) != {"choices"}:
            msg = f"{where}: give either choices or low/high, not both."
            raise ValueError(msg)
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            msg = f"{where}.choices must be a non-empty list, got {choices!r}."
            raise ValueError(msg)
        for value in choices:
            ok = isinstance(value, str) if kind is str else _is_number(value)
            if kind is int:
                ok = ok and float(value).is_integer()
            if not ok:
                msg = f"{where}: choice {value!r} is not a {kind.__name__}."
                raise ValueError(msg)
        if len(set(choices)) != len(choices):
            msg = f"{where}: choices {choices} repeat a value."
            raise ValueError(msg)
        cast = [kind(v) for v in choices]
        return CategoricalDistribution(cast)
    if kind is str:
        msg = f"{where}: a string parameter takes choices: [...], not a range."
        raise ValueError(msg)
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        msg = f"{where} lacks {missing}; give low and high (or choices)."
        raise ValueError(msg)
    low, high = spec["low"], spec["high"]
    log = bool(spec.get("log", False))
    step = spec.get("step")
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is None and name == "step":
            continue
        if not _is_number(value) or (kind is int and not float(value).is_integer()):
            msg = f"{where}.{name}={value!r} is not a {kind.__name__}."
            raise ValueError(msg)
    if low > high:
        msg = f"{where}: low {low!r} is above high {high!r}; swap them."
        raise ValueError(msg)
    if log and low <= 0:
        msg = f"{where}: log: true needs low > 0 (got {low!r})."
        raise ValueError(msg)
    if log and step is not None:
        msg = f"{where}: log and step cannot be combined."
        raise ValueError(msg)
    if kind is int:
        return IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    return FloatDistribution(float(low), float(high), log=log, step=step)


def _points(distribution: BaseDistribution) -> list[Any]:
    """The values that bound a distribution (range ends, every choice)."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]  # type: ignore[attr-defined]


@dataclass(kw_only=True)
class SearchSpace:
    """The searched fine-tuning hyperparameters (``params.yaml: tune.space``)."""

    distributions: dict[str, BaseDistribution]

    @classmethod
    def from_params(
        cls,
        space: Mapping[str, Any],
        *,
        fixed: Mapping[str, Any],
        n_layers: int | None = None,
    ) -> SearchSpace:
        """Parse and check every entry against the ``train`` rules before any training.

        Parameters
        ----------
        space
            ``params.yaml: tune.space``.
        fixed
            The fixed ``train`` settings (:data:`FIXED` keys); each bound of the space is checked
            together with them by :meth:`Hyperparameters.from_params`.
        n_layers
            Encoder layers of the base model: the most ``freeze_layers`` can freeze.
        """
        if not isinstance(space, Mapping):
            msg = f"params.yaml: tune.space must be a mapping, got {type(space).__name__}."
            raise ValueError(msg)
        unknown = sorted(set(space) - set(SEARCHABLE))
        missing = [k for k in SEARCHABLE if k not in space]
        if unknown:
            msg = (
                f"params.yaml: tune.space has unknown key(s) {unknown}; it searches "
                f"{list(SEARCHABLE)} (the other train keys are fixed: {list(FIXED)})."
            )
            raise ValueError(msg)
        if missing:
            msg = (
                f"params.yaml: tune.space lacks {missing}; give each a range, choices or a "
                "single value (e.g. freeze_layers: 0)."
            )
            raise ValueError(msg)
        distributions = {key: parse_distribution(key, space[key]) for key in SEARCHABLE}
        for key, distribution in distributions.items():
            for value in _points(distribution):
                try:
                    finetune.Hyperparameters.from_params({**fixed, key: value})
                except ValueError as exc:
                    msg = f"params.yaml: tune.space.{key}: {value!r} is not allowed ({exc})"
                    raise ValueError(msg) from exc
        if n_layers is not None:
            most = max(_points(distributions["freeze_layers"]))
            if most > n_layers:
                msg = (
                    f"params.yaml: tune.space.freeze_layers reaches {most}, but the base model "
                    f"has {n_layers} encoder layers."
                )
                raise ValueError(msg)
        return cls(distributions=distributions)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample (or take the enqueued) values of every searched key for ``trial``."""
        values: dict[str, Any] = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                values[key] = trial.suggest_categorical(key, dist.choices)
            elif isinstance(dist, IntDistribution):
                values[key] = trial.suggest_int(
                    key, dist.low, dist.high, step=dist.step, log=dist.log
                )
            else:
                assert isinstance(dist, FloatDistribution)
                values[key] = trial.suggest_float(
                    key, dist.low, dist.high, step=dist.step, log=dist.log
                )
        return values

    def check_point(self, point: Mapping[str, Any], *, where: str) -> None:
        """Refuse a fixed point (``tune.enqueue`` entry) with keys or values outside the space."""
        unknown = sorted(set(point) - set(self.distributions))
        if unknown:
            msg = f"{where} has unknown key(s) {unknown}; use keys of tune.space."
            raise ValueError(msg)
        for key, value in point.items():
            distribution = self.distributions[key]
            if isinstance(distribution, CategoricalDistribution):
                inside = value in distribution.choices
            else:
                kind = SEARCHABLE[key]
                inside = (
                    _is_number(value)
                    and (kind is float or float(value).is_integer())
                    and distribution.low <= value <= distribution.high  # type: ignore[attr-defined]
                )
            if not inside:
                msg = f"{where}.{key}={value!r} is outside tune.space.{key} ({distribution})."
                raise ValueError(msg)


@dataclass(kw_only=True)
class TuneSettings:
    """``params.yaml: tune``.

    Parameters
    ----------
    task
        The ``tasks`` key whose val metric the study maximises.
    n_trials
        Trials in the study, shared by the main process and every worker.
    space
        The search space.
    storage
        ``None`` (a journal file under ``paths.checkpoints``), a journal file path, a database
        URL (``postgresql://...``, ``mysql://...``, ``sqlite:///...``) or ``env:VAR`` (the URL
        in an environment variable, so passwords stay out of git).
    study_name
        ``None``: ``<task>-<fingerprint>``, so a study with other params, data or code never mixes
        with this one.
    enqueue
        Points tried first, in order (e.g. the shipped ``train`` values: the baseline); keys not
        given are sampled.
    sampler_startup_trials
        Random trials before TPE models the results.
    pruner
        ``None`` (no pruning) or the median pruner's ``n_startup_trials`` (completed trials
        before pruning starts) and ``n_warmup_steps`` (epochs of a trial before it can be pruned).
    """

    task: str
    n_trials: int
    space: SearchSpace
    storage: str | None = None
    study_name: str | None = None
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    sampler_startup_trials: int = 5
    pruner: dict[str, int] | None = None

    @classmethod
    def from_params(
        cls, tune: Mapping[str, Any], *, fixed: Mapping[str, Any], n_layers: int | None = None
    ) -> TuneSettings:
        """Parse ``params.yaml: tune``; every error names the key and the fix."""
        known = {
            "task",
            "n_trials",
            "storage",
            "study_name",
            "enqueue",
            "sampler",
            "pruner",
            "space",
        }
        unknown = sorted(set(tune) - known)
        if unknown:
            msg = f"params.yaml: tune has unknown key(s) {unknown}; known: {sorted(known)}."
            raise ValueError(msg)
        for key in ("task", "n_trials", "space"):
            if key not in tune:
                msg = f"params.yaml: tune.{key} is missing."
                raise ValueError(msg)
        n_trials = tune["n_trials"]
        if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
            msg = f"params.yaml: tune.n_trials={n_trials!r} must be a positive integer."
            raise ValueError(msg)
        space = SearchSpace.from_params(tune["space"], fixed=fixed, n_layers=n_layers)
        enqueue = list(tune.get("enqueue") or [])
        for i, point in enumerate(enqueue):
            if not isinstance(point, Mapping):
                msg = f"params.yaml: tune.enqueue[{i}] must be a mapping of tune.space keys."
                raise ValueError(msg)
            space.check_point(point, where=f"params.yaml: tune.enqueue[{i}]")
        if len(enqueue) > n_trials:
            msg = f"params.yaml: tune.enqueue has {len(enqueue)} points, above tune.n_trials."
            raise ValueError(msg)
        sampler = dict(tune.get("sampler") or {})
        if set(sampler) - {"n_startup_trials"}:
            msg = "params.yaml: tune.sampler takes n_startup_trials only."
            raise ValueError(msg)
        pruner = tune.get("pruner")
        if pruner is not None:
            pruner = dict(pruner)
            bad = sorted(set(pruner) - {"n_startup_trials", "n_warmup_steps"})
            values = [v for v in pruner.values() if not isinstance(v, int) or v < 0]
            if bad or values:
                msg = (
                    "params.yaml: tune.pruner takes n_startup_trials and n_warmup_steps "
                    "(non-negative integers), or null for no pruning."
                )
                raise ValueError(msg)
        return cls(
            task=str(tune["task"]),
            n_trials=n_trials,
            space=space,
            storage=tune.get("storage"),
            study_name=tune.get("study_name"),
            enqueue=[dict(p) for p in enqueue],
            sampler_startup_trials=int(sampler.get("n_startup_trials", 5)),
            pruner=pruner,
        )


def fixed_hyperparameters(train: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`FIXED` keys of ``params.yaml: train`` (defaults where absent)."""
    defaults = finetune.Hyperparameters()
    return {key: train.get(key, getattr(defaults, key)) for key in FIXED}


# --------------------------------------------------------------------------------------------
# Storage and study


def resolve_storage(storage: str | None, *, checkpoints: str | Path) -> str:
    """The storage location: a database URL or a journal file path (made absolute)."""
    if storage is None:
        return str(Path(checkpoints) / DEFAULT_JOURNAL)
    storage = str(storage)
    if storage.startswith("env:"):
        name = storage.removeprefix("env:")
        value = os.environ.get(name)
        if not value:
            msg = f"params.yaml: tune.storage={storage!r}, but the variable {name} is not set."
            raise ValueError(msg)
        storage = value
    return storage


def open_storage(location: str, *, heartbeat_s: int = 60) -> optuna.storages.BaseStorage:
    """A storage object: ``RDBStorage`` (with heartbeats) for URLs, a journal file otherwise."""
    if "://" in location:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                location, heartbeat_interval=heartbeat_s, grace_period=4 * heartbeat_s
            )
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def check_shared_storage(location: str) -> None:
    """Refuse a storage that cannot hand trials to several processes safely.

    SQLite has no row locks, so two workers can pop the same trial slot; a journal file (one
    machine, or a shared file system) and server databases (PostgreSQL, MySQL) cannot.
    """
    if location.startswith("sqlite"):
        msg = (
            f"tune.storage={location!r}: SQLite cannot arbitrate between workers (no row locks; "
            "two workers could run the same trial). Use the default journal file on one "
            "machine, or a PostgreSQL/MySQL URL for many."
        )
        raise ValueError(msg)


def make_sampler(settings: TuneSettings, *, seed: int | None) -> optuna.samplers.TPESampler:
    """TPE, seeded; ``constant_liar`` keeps parallel workers from sampling the same point."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=settings.sampler_startup_trials, constant_liar=True
        )


def make_pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    """The median pruner (steps are epochs), or no pruning."""
    if settings.pruner is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=settings.pruner.get("n_startup_trials", 3),
        n_warmup_steps=settings.pruner.get("n_warmup_steps", 1),
        interval_steps=1,
    )


def default_study_name(task: str, digest: str) -> str:
    """``<task>-<first 12 hex digits of the run fingerprint>``."""
    return f"{task}-{digest[:12]}"


def create_study(
    storage: optuna.storages.BaseStorage,
    *,
    name: str,
    settings: TuneSettings,
    seed: int,
    attrs: Mapping[str, Any],
) -> optuna.Study:
    """Create (or resume) the study and top its trial slots up to ``settings.n_trials``.

    Slots are ``WAITING`` trials: the enqueued points first, then empty ones that the sampler
    fills. Trials that failed earlier (or were left ``RUNNING`` by a killed run) are not counted,
    so a rerun replaces them.
    """
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize",
        sampler=make_sampler(settings, seed=seed),
        pruner=make_pruner(settings),
        load_if_exists=True,
    )
    fail_stale_trials(study, storage)
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    trials = study.get_trials(deepcopy=False)
    live = [t for t in trials if t.state != TrialState.FAIL]
    enqueued = {t.user_attrs.get("enqueued") for t in trials if t.state != TrialState.FAIL}
    missing = settings.n_trials - len(live)
    if trials:
        logger.info(
            "resuming study %s: %d trials (%d failed, not counted); %d to add",
            name,
            len(trials),
            len(trials) - len(live),
            max(0, missing),
        )
    for i, point in enumerate(settings.enqueue):
        if missing <= 0:
            break
        if i in enqueued:
            continue
        study.enqueue_trial(point, user_attrs={"enqueued": i})
        missing -= 1
    for _ in range(max(0, missing)):
        study.enqueue_trial({})
    study.set_user_attr(_READY_ATTR, settings.n_trials)
    return study


def fail_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> None:
    """Mark trials left ``RUNNING`` by a killed process as failed.

    With heartbeats (database storage) only trials whose heartbeat stopped; with a journal file
    (no heartbeats) every ``RUNNING`` trial, so do not restart the main process while workers
    run on a journal file.
    """
    if isinstance(storage, optuna.storages.RDBStorage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, "error", "left running by an interrupted run")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        logger.warning("trial %d was left running by an interrupted run: failed", trial.number)


def join_study(
    storage: optuna.storages.BaseStorage,
    *,
    name: str,
    fingerprint: str,
    timeout_s: float,
    poll_s: float = 2.0,
) -> None:
    """Wait until the main process has created study ``name`` and its slots (for workers).

    Refuses a study made from other params, data or code (its ``fingerprint`` attribute).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        names = [s.study_name for s in storage.get_all_studies()]
        if name in names:
            attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
            if attrs.get("fingerprint") not in (None, fingerprint):
                msg = (
                    f"study {name}: it was made from other params, data or code than this worker "
                    "has; check out the same commit and `dvc pull` before joining."
                )
                raise RuntimeError(msg)
            if _READY_ATTR in attrs:
                return
        if time.monotonic() > deadline:
            msg = (
                f"no study {name!r} in the storage after {timeout_s:.0f} s (it holds {names}). "
                "Start the main process (`python src/stages/tune.py`) with the same params.yaml, "
                "data and code, or raise --wait-timeout."
            )
            raise TimeoutError(msg)
        time.sleep(poll_s)


def claim_trial(storage: optuna.storages.BaseStorage, study: optuna.Study) -> optuna.Trial | None:
    """Pop one ``WAITING`` slot of ``study`` (atomically across processes), or ``None``."""
    study_id = storage.get_study_id_from_name(study.study_name)
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        return optuna.Trial(study, trial_id)
    return None


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.BaseStorage, trial: optuna.Trial) -> Iterator[None]:
    """Record heartbeats of a running trial (database storage), so a killed worker's trial
    is failed by the others instead of blocking the study."""
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if not interval:
        yield
        return
    stop = threading.Event()
    study_id = storage.get_study_id_from_name(trial.study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)

    def beat() -> None:
        while not stop.is_set():
            storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
            stop.wait(interval)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# --------------------------------------------------------------------------------------------
# Trials


class PruningCallback(TrainerCallback):
    """Report the val metric to the trial after every epoch (step = epoch) and prune.

    Raising :class:`optuna.TrialPruned` from ``on_evaluate`` stops the ``Trainer`` at once.
    """

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.history: list[dict[str, float]] = []

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        metrics = kwargs.get("metrics") or {}
        key = f"eval_{self.metric}"
        if key not in metrics:
            msg = f"the evaluation returned no {key} (got {sorted(metrics)})."
            raise KeyError(msg)
        epoch = round(float(state.epoch or 0.0))
        self.history.append(
            {
                "epoch": epoch,
                **{
                    k.removeprefix("eval_"): float(v)
                    for k, v in sorted(metrics.items())
                    if k.startswith("eval_") and _is_number(v) and not k.endswith("_per_second")
                },
            }
        )
        value = float(metrics[key])
        self.trial.report(value, epoch)
        self.trial.set_user_attr("val_history", _finite(self.history))
        if self.trial.should_prune():
            logger.info("trial %d pruned after epoch %d (%s)", self.trial.number, epoch, value)
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")


def _finite(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None``."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass(kw_only=True)
class Objective:
    """Train one trial on ``train``, score on ``val``: returns the best epoch's val metric."""

    task: finetune.TaskSpec
    prepared: finetune.PreparedTask
    base_model: str | Path
    space: SearchSpace
    fixed: dict[str, Any]
    seed: int
    work_dir: Path

    def __call__(self, trial: optuna.Trial) -> float:
        values = self.space.suggest(trial)
        hyper = finetune.Hyperparameters.from_params({**self.fixed, **values})
        metric = str(self.task.early_stopping_metric)
        logger.info("trial %d: %s", trial.number, values)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"trial-{trial.number}-", dir=self.work_dir) as out:
            args = finetune.training_arguments(
                hyper,
                output_dir=Path(out),
                metric=metric,
                seed=self.seed,
                n_train=len(self.prepared.train),
                save_checkpoints=False,
            )
            pruning = PruningCallback(trial, metric)
            trainer = finetune.build_trainer(
                task=self.task,
                prepared=self.prepared,
                base_model=self.base_model,
                hyper=hyper,
                args=args,
                seed=self.seed,
                callbacks=[pruning],
            )
            trainer.train()
        best = trainer.state.best_metric
        if best is None or not math.isfinite(best):
            msg = f"trial {trial.number}: the val {metric} was never finite ({pruning.history})."
            raise ValueError(msg)
        epochs = [h["epoch"] for h in pruning.history]
        values_by_epoch = [h[metric] for h in pruning.history]
        trial.set_user_attr("epochs_run", len(epochs))
        trial.set_user_attr("best_epoch", epochs[int(np.nanargmax(values_by_epoch))])
        return float(best)


def run_trials(
    storage: optuna.storages.BaseStorage,
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
) -> int:
    """Pop and run slots until none is left; returns how many this process ran.

    A pruned trial is told ``PRUNED``; any other error is told ``FAIL`` (with the error in the
    trial's ``error`` attribute) and raised, so a broken setup stops the run loudly.
    """
    ran = 0
    while True:
        # A fresh Study per trial: the sampler must see every trial finished so far.
        current = optuna.load_study(
            study_name=study.study_name, storage=storage, sampler=study.sampler, pruner=study.pruner
        )
        trial = claim_trial(storage, current)
        if trial is None:
            return ran
        start = time.perf_counter()
        try:
            with _heartbeat(storage, trial):
                value = objective(trial)
        except optuna.TrialPruned:
            trial.set_user_attr("wall_s", time.perf_counter() - start)
            current.tell(trial, state=TrialState.PRUNED)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
                current.tell(trial, state=TrialState.FAIL)
            raise
        else:
            trial.set_user_attr("wall_s", time.perf_counter() - start)
            current.tell(trial, value)
            logger.info("trial %d: %.4f", trial.number, value)
        finally:
            # Free the trial's model before the next one.
            gc.collect()
        ran += 1


def wait_for_running(
    storage: optuna.storages.BaseStorage,
    study: optuna.Study,
    *,
    timeout_s: float | None,
    poll_s: float = 5.0,
) -> None:
    """Wait until no trial of the study is ``WAITING`` or ``RUNNING`` (workers still busy)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    logged = 0.0
    while True:
        open_trials = [
            t.number
            for t in study.get_trials(
                deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)
            )
        ]
        if not open_trials:
            return
        if isinstance(storage, optuna.storages.RDBStorage):
            fail_stale_trials(study, storage)
        if time.monotonic() - logged > 60:
            logger.info("waiting for trial(s) %s run by other workers", open_trials)
            logged = time.monotonic()
        if deadline is not None and time.monotonic() > deadline:
            msg = (
                f"trial(s) {open_trials} still running after {timeout_s:.0f} s; a worker may have "
                "died. Stop the workers and rerun: the rerun fails and replaces those trials."
            )
            raise TimeoutError(msg)
        time.sleep(poll_s)


def check_patients_disjoint(train: datasets.Dataset, val: datasets.Dataset) -> None:
    """Refuse a ``train``/``val`` pair that shares a patient (the split is by patient)."""
    shared = sorted(set(train["patient_id"]) & set(val["patient_id"]))
    if shared:
        msg = (
            f"patients {shared[:5]} are in both train and val; the split must be by patient. "
            "Rerun the split stage."
        )
        raise ValueError(msg)


# --------------------------------------------------------------------------------------------
# Outputs


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


def best_params_yaml(study: optuna.Study, *, metric: str) -> str:
    """``best_params.yaml``: the best trial's values under ``train:``, with how to apply them."""
    best = study.best_trial
    values = {key: best.params[key] for key in SEARCHABLE}
    header = [
        f"# Best of {len(study.trials)} trials of study {study.study_name}: trial {best.number},",
        f"# val {metric} {best.value:.6g}. Promote the values into params.yaml with:",
        f"#   dvc exp run {' '.join(set_args({'train': values}))}",
        "# (or `dvc exp run $(python src/stages/tune.py --set-args)`).",
    ]
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
        raise FileNotFoundError(msg)
    best = yaml.safe_load(path.read_text())
    if not isinstance(best, dict) or set(best) != {"train"} or not isinstance(best["train"], dict):
        msg = f"{path}: expected a mapping with one key, train."
        raise ValueError(msg)
    unknown = sorted(set(best["train"]) - set(SEARCHABLE))
    if unknown:
        msg = f"{path}: unknown train key(s) {unknown}."
        raise ValueError(msg)
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
    return _finite(summary)


def write_outputs(
    study: optuna.Study, out_dir: str | Path, *, task: str, metric: str, seed: int
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
        (tmp / BEST_PARAMS_FILE).write_text(best_params_yaml(study, metric=metric))
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


def remove_work_dir(path: str | Path) -> None:
    """Remove the trials' scratch folder (checkpoint-free; safe to delete at any time)."""
    shutil.rmtree(path, ignore_errors=True)
