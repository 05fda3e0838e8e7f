"""Stage train@{task}: fine-tune the base model on one task, with early stopping on val.

Runs on one process (`python src/stages/train.py --task cell_type`) or several, unchanged
(`torchrun --nproc_per_node 2 src/stages/train.py --task cell_type`). Rerunning an interrupted
run with the same params and data resumes from its last epoch checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from rosmap_geneformer import distributed, io
from rosmap_geneformer.errors import run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import stage_arguments
from rosmap_geneformer.training import finetune
from rosmap_geneformer.training.tasks import TaskSpec


def main(argv: list[str] | None = None) -> None:
    args, params = stage_arguments(argv, description=__doc__, with_task=True)
    setup_logging()
    distributed.configure_threads(params.compute.threads, distributed.current())
    task_params = params.tasks[args.task].values()
    task = TaskSpec.from_params(
        args.task, task_params, rare_class_limit=params.losses.rare_class_cells
    )
    hyper = finetune.Hyperparameters.from_params(params.train.values())
    seed = params.seed

    tokenized = Path(params.paths.tokenized)
    base_model = Path(params.paths.base_model)
    train_path, val_path = tokenized / "train.dataset", tokenized / "val.dataset"
    run = {
        "task": task_params,
        "train": params.train.values(),
        "seed": seed,
        "data": {p.name: finetune.directory_digest(p) for p in (train_path, val_path)},
        "base_model": finetune.directory_digest(base_model),
    }
    finetune.fine_tune(
        task=task,
        train=io.read_dataset(train_path),
        val=io.read_dataset(val_path),
        base_model=base_model,
        output_dir=Path(params.paths.finetuned) / args.task,
        checkpoint_dir=Path(params.paths.checkpoints) / args.task,
        live_dir=Path(params.paths.dvclive) / "train" / args.task,
        hyper=hyper,
        seed=seed,
        run_fingerprint=finetune.fingerprint(run),
    )
    distributed.end()


if __name__ == "__main__":
    run_stage(main)
