"""Stage evaluate@{task}: predictions of the fine-tuned model on the test split, with cell- and
(for donor-level labels) patient-level metrics and bootstrap intervals."""

from __future__ import annotations

import logging
from pathlib import Path

from rosmap_geneformer import distributed, io
from rosmap_geneformer.analysis.evaluation.evaluate import evaluate_predictions, write_evaluation
from rosmap_geneformer.errors import run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import stage_arguments
from rosmap_geneformer.training import finetune
from rosmap_geneformer.training.tasks import TaskSpec, encode_labels, select_cells

logger = logging.getLogger("stage.evaluate")


def main(argv: list[str] | None = None) -> None:
    args, params = stage_arguments(argv, description=__doc__, with_task=True)
    setup_logging()
    distributed.configure_threads(params.compute.threads, distributed.current())
    task = TaskSpec.from_params(args.task, params.tasks[args.task].values())
    model_dir = Path(params.paths.finetuned) / args.task
    mapping = finetune.load_label_mapping(model_dir)
    classes = mapping["classes"]

    test_path = Path(params.paths.tokenized) / "test.dataset"
    warnings: list[dict] = []
    test, other_types = select_cells(
        io.read_dataset(test_path), task, source=str(test_path), warnings=warnings
    )
    n_selected = len(test)
    test = encode_labels(test, task, classes)
    probabilities = finetune.predict(model_dir, test, batch_size=params.train.eval_batch_size)
    result = evaluate_predictions(
        test["cell_id"],
        test["patient_id"],
        test["label"],
        probabilities,
        classes=classes,
        task_kind="disease" if task.patient_level else "cell_type",
        n_boot=params.evaluate.n_boot,
        seed=params.seed,
    )
    out_dir = Path(params.paths.reports) / "eval" / args.task
    result.details["test_cells"] = {
        "other_cell_types": other_types,
        "unseen_class": n_selected - len(test),
        "evaluated": len(test),
    }
    if warnings:
        result.details["warnings"] = warnings
    write_evaluation(
        result,
        out_dir,
        live_dir=Path(params.paths.dvclive) / "eval" / args.task,
        predictions_path=Path(params.paths.predictions) / f"{args.task}.tsv",
    )
    logger.info("%s: %s", args.task, result.metrics)


if __name__ == "__main__":
    run_stage(main)
