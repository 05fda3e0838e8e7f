"""Stage evaluate@{task}: predictions of the fine-tuned model on the test split, with cell- and
(for donor-level labels) patient-level metrics and bootstrap intervals."""

from __future__ import annotations

import logging
from pathlib import Path

from rosmap_geneformer import io
from rosmap_geneformer.analysis import evaluation
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import get, stage_arguments
from rosmap_geneformer.training import finetune

logger = logging.getLogger("stage.evaluate")


def main(argv: list[str] | None = None) -> None:
    args, params = stage_arguments(argv, description=__doc__, with_task=True)
    setup_logging()
    task = finetune.TaskSpec.from_params(args.task, get(params, f"tasks.{args.task}"))
    model_dir = Path(get(params, "paths.finetuned")) / args.task
    mapping = finetune.load_label_mapping(model_dir)
    classes = mapping["classes"]

    test_path = Path(get(params, "paths.tokenized")) / "test.dataset"
    test, other_types = finetune.select_cells(
        io.read_dataset(test_path), task, source=str(test_path)
    )
    n_selected = len(test)
    test = finetune.encode_labels(test, task, classes)
    probabilities = finetune.predict(
        model_dir, test, batch_size=int(get(params, "train.eval_batch_size"))
    )
    result = evaluation.evaluate_predictions(
        test["cell_id"],
        test["patient_id"],
        test["label"],
        probabilities,
        classes=classes,
        task_kind="disease" if task.patient_level else "cell_type",
        n_boot=int(get(params, "evaluate.n_boot")),
        seed=int(get(params, "seed")),
    )
    out_dir = Path(get(params, "paths.reports")) / "eval" / args.task
    result.details["test_cells"] = {
        "other_cell_types": other_types,
        "unseen_class": n_selected - len(test),
        "evaluated": len(test),
    }
    evaluation.write_evaluation(
        result,
        out_dir,
        live_dir=Path(get(params, "paths.dvclive")) / "eval" / args.task,
        predictions_path=Path(get(params, "paths.predictions")) / f"{args.task}.tsv",
    )
    logger.info("%s: %s", args.task, result.metrics)


if __name__ == "__main__":
    main()
