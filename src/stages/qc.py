"""Stage qc@{split}: per-cell metrics, threshold filters and Scrublet doublets, per library.

Reads ${paths.split}/{split}.h5ad; writes ${paths.qc}/{split}.h5ad, ${paths.reports}/qc/{split}.json,
${paths.qc}/{split}_cells.tsv (every input cell and its fate)
and, under ${paths.reports}/qc/{split}/, qc_distributions.png, doublet_scores.png and libraries.tsv.
"""

from __future__ import annotations

from pathlib import Path

from rosmap_geneformer import qc
from rosmap_geneformer.logs import setup_logging
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
    )
    source = Path(get(params, "paths.split")) / f"{args.split}.h5ad"
    output = Path(get(params, "paths.qc")) / f"{args.split}.h5ad"
    reports = Path(get(params, "paths.reports")) / "qc"

    result = qc.run_qc(
        source,
        output,
        batch_key=get(params, "data.columns.batch"),
        settings=settings,
        split=args.split,
    )
    qc.write_reports(
        result,
        report=reports / f"{args.split}.json",
        plots=reports / args.split,
        cells=Path(get(params, "paths.qc")) / f"{args.split}_cells.tsv",
    )


if __name__ == "__main__":
    main()
