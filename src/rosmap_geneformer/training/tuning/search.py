"""The optuna study and its trials: storage, sampler and pruner, trial slots shared by workers, and
the objective that fine-tunes one trial on ``train`` and scores it on ``val``.
"""

from __future__ import annotations

import contextlib
import gc
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
from optuna.trial import TrialState
from transformers import TrainerCallback

from rosmap_geneformer import distributed
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.training import finetune
from rosmap_geneformer.training.tasks import PreparedTask, TaskSpec
from rosmap_geneformer.training.tuning.space import SearchSpace, TuneSettings, is_number

logger = logging.getLogger(__name__)

DEFAULT_JOURNAL = "tune/journal.log"
_READY_ATTR = "slots_ready"
PROCESSES_ATTR = "processes_per_trial"


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
            raise InputError(msg)
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
        raise InputError(msg)


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
    check_processes_per_trial(study.user_attrs, name=name, processes=attrs.get(PROCESSES_ATTR))
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


def check_processes_per_trial(
    attrs: Mapping[str, Any], *, name: str, processes: int | None
) -> None:
    """Refuse to add trials run on another number of processes than the study's.

    Under a launcher each trial trains on every process (DistributedDataParallel): a step takes
    ``batch_size`` cells per process, so trials run on 1 and on 4 processes are not comparable.
    """
    recorded = attrs.get(PROCESSES_ATTR)
    if recorded is None or processes is None or int(recorded) == int(processes):
        return
    msg = (
        f"study {name}: its trials train on {recorded} process(es) each, this run on "
        f"{processes} (a step takes batch_size cells per process, so the trials would not be "
        "comparable); start it under the study's compute.launcher, or set tune.study_name "
        "to start another study."
    )
    raise InputError(msg)


def join_study(
    storage: optuna.storages.BaseStorage,
    *,
    name: str,
    fingerprint: str,
    timeout_s: float,
    processes: int = 1,
    poll_s: float = 2.0,
) -> None:
    """Wait until the main process has created study ``name`` and its slots (for workers).

    Refuses a study made from other params, data or code (its ``fingerprint`` attribute), or
    whose trials run on another number of ``processes`` (:func:`check_processes_per_trial`).
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
                check_processes_per_trial(attrs, name=name, processes=processes)
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
    Under a launcher every process evaluates (the metrics are gathered, so they agree); rank 0
    holds the ``trial``, reports and decides, and the others (``trial=None``) follow its
    decision, so that all stop at the same epoch.
    """

    def __init__(
        self,
        trial: optuna.Trial | None,
        metric: str,
        processes: distributed.Processes | None = None,
    ) -> None:
        self.trial = trial
        self.metric = metric
        self.processes = processes or distributed.Processes()
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
                    if k.startswith("eval_") and is_number(v) and not k.endswith("_per_second")
                },
            }
        )
        value = float(metrics[key])
        prune = False
        if self.trial is not None:
            self.trial.report(value, epoch)
            self.trial.set_user_attr("val_history", finite(self.history))
            prune = self.trial.should_prune()
        if distributed.broadcast_from_main(prune, self.processes):
            if self.trial is not None:
                logger.info("trial %d pruned after epoch %d (%s)", self.trial.number, epoch, value)
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")


def finite(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None``."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass(kw_only=True)
class Objective:
    """Train one trial on ``train``, score on ``val``: returns the best epoch's val metric.

    Under a launcher (``processes.world_size > 1``) a trial trains on every process: rank 0
    claims and samples it (``__call__``, inside :func:`run_trials`) and sends its values to the
    others, which wait in :meth:`follow`; :meth:`release` lets them go when no trial is left.
    """

    task: TaskSpec
    prepared: PreparedTask
    base_model: str | Path
    space: SearchSpace
    fixed: dict[str, Any]
    seed: int
    work_dir: Path
    processes: distributed.Processes = field(default_factory=distributed.Processes)

    def __call__(self, trial: optuna.Trial) -> float:
        values = self.space.suggest(trial)
        logger.info("trial %d: %s", trial.number, values)
        distributed.broadcast_from_main({"number": trial.number, "values": values}, self.processes)
        trial.set_user_attr(PROCESSES_ATTR, self.processes.world_size)
        pruning = PruningCallback(trial, str(self.task.early_stopping_metric), self.processes)
        best = self.fit(values, number=trial.number, pruning=pruning)
        epochs = [h["epoch"] for h in pruning.history]
        values_by_epoch = [h[pruning.metric] for h in pruning.history]
        trial.set_user_attr("epochs_run", len(epochs))
        trial.set_user_attr("best_epoch", epochs[int(np.nanargmax(values_by_epoch))])
        return best

    def fit(self, values: Mapping[str, Any], *, number: int, pruning: PruningCallback) -> float:
        """Fine-tune with the fixed hyperparameters and ``values``; the best val metric."""
        hyper = finetune.Hyperparameters.from_params({**self.fixed, **values})
        metric = pruning.metric
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"trial-{number}-", dir=self.work_dir) as out:
            args = finetune.training_arguments(
                hyper,
                output_dir=Path(out),
                metric=metric,
                seed=self.seed,
                n_train=len(self.prepared.train),
                save_checkpoints=False,
            )
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
            msg = f"trial {number}: the val {metric} was never finite ({pruning.history})."
            raise InputError(msg)
        return float(best)

    def follow(self) -> int:
        """On the launcher's other ranks: train every trial rank 0 sends, until it releases
        them; returns how many."""
        followed = 0
        while True:
            message = distributed.broadcast_from_main(None, self.processes)
            if message is None:
                return followed
            pruning = PruningCallback(None, str(self.task.early_stopping_metric), self.processes)
            try:
                self.fit(message["values"], number=message["number"], pruning=pruning)
            except optuna.TrialPruned:
                pass
            finally:
                gc.collect()
            followed += 1

    def release(self) -> None:
        """On rank 0, once :func:`run_trials` has returned: the followers stop."""
        distributed.broadcast_from_main(None, self.processes)


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
        raise InputError(msg)


def remove_work_dir(path: str | Path) -> None:
    """Remove the trials' scratch folder (checkpoint-free; safe to delete at any time)."""
    shutil.rmtree(path, ignore_errors=True)
