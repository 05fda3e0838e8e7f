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
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.parallel import resolve_workers
from rosmap_geneformer.params import get, stage_arguments


def main(argv: list[str] | None = None) -> None:
    args, params = stage_arguments(argv, description=__doc__, with_split=True)
    setup_logging()

    scrublet = get(params, "qc.scrublet")
    settings = qc.QCSettings(
        min_genes=int(get(params, "qc.min_genes")),
        min_counts=int(get(params, "qc.min_counts")),
        max_pct_mito=float(get(params, "qc.max_pct_mito")),
        scrublet=bool(get(params, "qc.scrublet.enabled")),
        expected_doublet_rate=float(get(params, "qc.scrublet.expected_doublet_rate")),
        n_prin_comps=int(get(params, "qc.scrublet.n_prin_comps")),
        min_cells_per_library=int(get(params, "qc.scrublet.min_cells_per_library")),
        seed=int(get(params, "seed")),
        # Optional keys: a fixed threshold (default: chosen per library) and the cap on the
        # fraction of a library an automatic threshold may call (default 2 x expected rate).
        threshold=scrublet.get("threshold"),
        max_doublet_fraction=scrublet.get("max_doublet_fraction"),
        max_cells_per_run=scrublet.get("max_cells_per_run"),
    )
    source = Path(get(params, "paths.split")) / f"{args.split}.parquet"
    reports = Path(get(params, "paths.reports")) / "qc"

    result = qc.run_qc(
        counts.read_cells(source, what="split cell table"),
        get(params, "paths.ensembl"),
        batch_key=get(params, "data.columns.batch"),
        settings=settings,
        split=args.split,
        source=source,
        workers=resolve_workers(get(params, "compute.workers")),
        scheduler=get(params, "compute.scheduler"),
    )
    qc.write_reports(
        result,
        report=reports / f"{args.split}.json",
        plots=reports / args.split,
        cells=Path(get(params, "paths.qc")) / f"{args.split}.parquet",
    )


if __name__ == "__main__":
    main()
