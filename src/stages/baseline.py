"""Stage baseline@{task}: logistic regression on highly variable genes, scored like `evaluate`.

Same cells (the tokenized datasets' cell ids), classes, val-based selection and test metrics
(cell level, patient level for donor labels, bootstrap intervals) as the fine-tuned model, so
`reports/baseline/{task}/metrics.json` and `reports/eval/{task}/metrics.json` compare key by key.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rosmap_geneformer.analysis import baselines
from rosmap_geneformer.analysis.evaluation.evaluate import write_evaluation
from rosmap_geneformer.errors import run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import SPLITS, stage_arguments
from rosmap_geneformer.training.tasks import TaskSpec

logger = logging.getLogger("stage.baseline")


def main(argv: list[str] | None = None) -> None:
    args, params = stage_arguments(argv, description=__doc__, with_task=True)
    setup_logging()
    task = TaskSpec.from_params(
        args.task,
        params.tasks[args.task].values(),
        rare_class_limit=params.losses.rare_class_cells,
    )
    hyper = baselines.BaselineParams.from_params(params.baseline.values())

    sampled = Path(params.paths.sampled)
    tokenized = Path(params.paths.tokenized)
    splits = {
        split: baselines.SplitInput(
            cells=sampled / f"{split}.parquet",
            matrix=Path(params.paths.ensembl),
            tokenized=tokenized / f"{split}.dataset",
        )
        for split in SPLITS
    }
    result = baselines.run_baseline(
        task,
        splits,
        hyper=hyper,
        seed=params.seed,
        n_boot=params.evaluate.n_boot,
    )
    write_evaluation(
        result,
        Path(params.paths.reports) / "baseline" / args.task,
        live_dir=Path(params.paths.dvclive) / "baseline" / args.task,
        predictions_path=Path(params.paths.predictions) / f"baseline_{args.task}.tsv",
    )
    logger.info("%s baseline: %s", args.task, result.metrics)


if __name__ == "__main__":
    run_stage(main)
