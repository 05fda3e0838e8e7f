"""Stage tune: an optuna study of fine-tuning hyperparameters, scored on the val split only.

The main invocation (`python src/stages/tune.py --task disease`, the dvc stage) creates or resumes
the study, runs trials until the study holds `tune.n_trials`, waits for trials other workers
still run, then writes reports/tune/ (best_params.yaml, trials.tsv, metrics.json, plots).

More workers, on this machine or others, join the same study and share the trial budget:

    python src/stages/tune.py --task disease --worker

They need the same commit and data (`dvc pull`) and a storage they all reach: `tune.storage` set
to a database URL (e.g. `env:OPTUNA_STORAGE` with OPTUNA_STORAGE=postgresql://user@host/db), or a
journal file on a shared file system. Workers write nothing but trials.

Each trial may itself train on several processes or GPUs: the stage runs under
`compute.launcher`, and a worker under the same launcher, for instance on a node with 4 GPUs

    torchrun --standalone --nproc_per_node 4 src/stages/tune.py --task disease --worker

Rank 0 claims and samples the trials and tells the storage; every rank trains them
(DistributedDataParallel). A study's trials all run on one number of processes.

Promote the best values into params.yaml: `dvc exp run $(python src/stages/tune.py --set-args)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import optuna
import torch
import transformers

from rosmap_geneformer import distributed, io
from rosmap_geneformer.errors import InputError, MissingInputError, run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import DEFAULT_PARAMS, read_params
from rosmap_geneformer.training import finetune, trainer
from rosmap_geneformer.training import tasks as training_tasks
from rosmap_geneformer.training.tuning import outputs, search, space

logger = logging.getLogger("tune")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="parameter file")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a refusal")
    parser.add_argument("--task", help="a key of params.yaml: tasks (default: tune.task)")
    parser.add_argument("--worker", action="store_true", help="only join the study and run trials")
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        help="seconds a worker waits for the study (default 600) or the main process waits "
        "for other workers' trials (default: no limit)",
    )
    parser.add_argument(
        "--set-args",
        action="store_true",
        help="print `-S train.<key>=<value>` arguments from best_params.yaml and exit",
    )
    args = parser.parse_args(argv)
    params = read_params(args.params)
    out_dir = Path(params.paths.reports) / "tune"
    if args.set_args:
        best = outputs.load_best_params(out_dir / outputs.BEST_PARAMS_FILE)
        sys.stdout.write(" ".join(outputs.set_args(best)) + "\n")
        return
    setup_logging()
    processes = distributed.start(params.compute.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    tune = params.section("tune").values()
    task_name = args.task or tune.get("task")
    tasks = {name: task.values() for name, task in params.section("tasks").items()}
    if task_name not in tasks:
        msg = f"params.yaml: no task {task_name!r} under tasks; known: {sorted(tasks)}."
        raise InputError(msg)
    tune["task"] = task_name
    task = training_tasks.TaskSpec.from_params(
        task_name, tasks[task_name], rare_class_limit=params.losses.rare_class_cells
    )
    base_model = Path(params.paths.base_model)
    config = base_model / "config.json"
    if not config.is_file():
        msg = f"{config}: no base model; run the base_model stage (`dvc repro base_model`)."
        raise MissingInputError(msg)
    fixed = space.fixed_hyperparameters(params.section("train").values())
    # Every search-space error surfaces here, before any data is read or model trained.
    settings = space.TuneSettings.from_params(
        tune, fixed=fixed, n_layers=int(json.loads(config.read_text())["num_hidden_layers"])
    )
    seed = params.seed

    # Only train and val: the test split is never read by the search.
    tokenized = Path(params.paths.tokenized)
    train_path, val_path = tokenized / "train.dataset", tokenized / "val.dataset"
    train, val = io.read_dataset(train_path), io.read_dataset(val_path)
    search.check_patients_disjoint(train, val)
    prepared = training_tasks.prepare_task(train, val, task)
    metric = training_tasks.check_task_metric(prepared, task)

    study_inputs = {
        "task": tasks[task_name],
        "tune": {k: v for k, v in tune.items() if k not in ("n_trials", "storage", "study_name")},
        "fixed": fixed,
        "seed": seed,
        "data": {p.name: finetune.directory_digest(p) for p in (train_path, val_path)},
        "base_model": finetune.directory_digest(base_model),
        "code": {
            Path(m.__file__).name: finetune.directory_digest(m.__file__)
            for m in (training_tasks, finetune, trainer, space, search)
        },
        "versions": [optuna.__version__, transformers.__version__, torch.__version__],
    }
    fingerprint = finetune.fingerprint(study_inputs)
    name = settings.study_name or search.default_study_name(task_name, fingerprint)
    checkpoints = Path(params.paths.checkpoints)
    location = search.resolve_storage(settings.storage, checkpoints=checkpoints)
    if args.worker:
        search.check_shared_storage(location)
    work_dir = checkpoints / "tune" / f"work-{os.getpid()}"
    objective = search.Objective(
        task=task,
        prepared=prepared,
        base_model=base_model,
        space=settings.space,
        fixed=fixed,
        seed=seed,
        work_dir=work_dir,
        processes=processes,
    )
    try:
        if not processes.is_main:
            followed = objective.follow()
            distributed.end(wait=False)
            logger.info("process %d trained %d trial(s) with rank 0", processes.rank, followed)
            return
        storage = search.open_storage(location)
        shown = location.split("@")[-1]  # no password in the logs
        if args.worker:
            logger.info("worker joining study %s in %s", name, shown)
            search.join_study(
                storage,
                name=name,
                fingerprint=fingerprint,
                timeout_s=600.0 if args.wait_timeout is None else args.wait_timeout,
                processes=processes.world_size,
            )
            # Workers sample from fresh entropy: the same seed would repeat the main's draws.
            study = optuna.load_study(
                study_name=name,
                storage=storage,
                sampler=search.make_sampler(settings, seed=None),
                pruner=search.make_pruner(settings),
            )
        else:
            logger.info(
                "study %s in %s: %d trials on %d process(es) each",
                name,
                shown,
                settings.n_trials,
                processes.world_size,
            )
            study = search.create_study(
                storage,
                name=name,
                settings=settings,
                seed=seed,
                attrs={
                    "fingerprint": fingerprint,
                    "task": task_name,
                    "metric": metric,
                    search.PROCESSES_ATTR: processes.world_size,
                },
            )
        ran = search.run_trials(storage, study, objective)
        objective.release()
        distributed.end(wait=False)
        if args.worker:
            logger.info("worker ran %d trial(s) of study %s", ran, name)
            return
        logger.info("ran %d trial(s)", ran)
        search.wait_for_running(storage, study, timeout_s=args.wait_timeout)
        outputs.write_outputs(
            study,
            out_dir,
            task=task_name,
            metric=metric,
            seed=seed,
            processes_per_trial=processes.world_size,
        )
    finally:
        search.remove_work_dir(work_dir)


if __name__ == "__main__":
    run_stage(main)
