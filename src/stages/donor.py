"""Stage donor@{task}: AD status per donor, every method on the same donor folds.

Fine-tuned classifier aggregated per donor, cell-level classifier aggregated, cell-type
proportions, pseudobulk (per donor and per donor x cell type) and gated-attention MIL over the
base and fine-tuned embeddings; repeated stratified cross-validation over the train and val
donors, one final figure per method on the test donors, paired tests against pseudobulk.
Writes `reports/donor/<task>/` (metrics.json: the headline figures, summary.json: all of them,
details.json, donors.tsv, oof.tsv, attention
tables and figures).
"""

from __future__ import annotations

import logging
from pathlib import Path

from rosmap_geneformer import distributed, io
from rosmap_geneformer.analysis.donor.run import (
    DonorInputs,
    DonorSettings,
    run_donor_analysis,
    write_donor_run,
)
from rosmap_geneformer.errors import run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import SPLITS, stage_arguments
from rosmap_geneformer.training.tasks import TaskSpec

logger = logging.getLogger("stage.donor")


def main(argv: list[str] | None = None) -> None:
    args, params = stage_arguments(argv, description=__doc__, with_task=True)
    setup_logging()
    distributed.configure_threads(params.compute.threads, distributed.current())
    task = TaskSpec.from_params(args.task, params.tasks[args.task].values())
    paths = params.paths
    inputs = DonorInputs(
        annotated={s: Path(paths.annotated) / f"{s}.parquet" for s in SPLITS},
        matrix=Path(paths.ensembl),
        tokenized={s: Path(paths.tokenized) / f"{s}.dataset" for s in SPLITS},
        base_model=Path(paths.base_model),
        finetuned=Path(paths.finetuned) / args.task,
    )
    run = run_donor_analysis(
        inputs,
        task,
        DonorSettings.from_params(params.section("donor")),
        seed=params.seed,
        chunk_size=params.compute.chunk_size,
        special_tokens=params.tokenize.special_tokens,
    )
    with io.atomic_output(Path(paths.reports) / "donor" / args.task) as out_dir:
        write_donor_run(run, out_dir)
    for name, entry in run.summary["methods"].items():
        logger.info(
            "%s: CV AUROC %s, test AUROC %s",
            name,
            None if entry.get("cv_auroc") is None else round(entry["cv_auroc"], 3),
            None if entry.get("test_auroc") is None else round(entry["test_auroc"], 3),
        )


if __name__ == "__main__":
    run_stage(main)
