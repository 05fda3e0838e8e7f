"""Stage qc@{split}: per-cell metrics, threshold filters and Scrublet doublets, per library.

Reads the cell table ${paths.split}/{split}.parquet and its cells' rows of ${paths.ensembl}, library
by library on ``compute.workers`` processes; writes the cell table ${paths.qc}/{split}.parquet (every
input cell, its metrics and its fate), ${paths.reports}/qc/{split}.json and, under
${paths.reports}/qc/{split}/, qc_distributions.png, doublet_scores.png and libraries.tsv.
"""

from __future__ import annotations

from pathlib import Path

from rosmap_geneformer import counts
from rosmap_geneformer.data import qc
from rosmap_geneformer.data.qc_report import write_reports
from rosmap_geneformer.errors import run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.parallel import resolve_workers
from rosmap_geneformer.params import stage_arguments


def main(argv: list[str] | None = None) -> None:
    args, params = stage_arguments(argv, description=__doc__, with_split=True)
    setup_logging()

    settings = qc.QCSettings.from_params(params.qc, seed=params.seed)
    source = Path(params.paths.split) / f"{args.split}.parquet"
    reports = Path(params.paths.reports) / "qc"

    result = qc.run_qc(
        counts.read_cells(source, what="split cell table"),
        params.paths.ensembl,
        batch_key=params.data.columns.batch,
        settings=settings,
        split=args.split,
        source=source,
        workers=resolve_workers(params.compute.workers),
        scheduler=params.compute.scheduler,
        losses=params.losses,
    )
    write_reports(
        result,
        report=reports / f"{args.split}.json",
        plots=reports / args.split,
        cells=Path(params.paths.qc) / f"{args.split}.parquet",
    )


if __name__ == "__main__":
    run_stage(main)
