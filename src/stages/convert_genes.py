"""Stage convert_genes: raw counts with gene symbols -> counts with Ensembl ids.

Writes data/interim/ensembl.h5ad, reports/genes/mapping.json and reports/genes/lost_genes.tsv.
"""

from __future__ import annotations

from pathlib import Path

from rosmap_geneformer import genes, io
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import get, raw_paths, stage_arguments


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    counts_path = raw_paths(params)["counts"]
    gene_map_path = Path(get(params, "paths.gene_map"))
    reports = Path(get(params, "paths.reports")) / "genes"

    gene_map = genes.read_gene_map(gene_map_path)
    adata = io.read_h5ad(counts_path)
    result = genes.convert_genes(
        adata,
        gene_map,
        batch_key=get(params, "data.columns.batch"),
        source=counts_path,
        gene_map_source=gene_map_path,
    )
    genes.write_conversion(
        result,
        h5ad=get(params, "paths.ensembl"),
        report=reports / "mapping.json",
        lost=reports / "lost_genes.tsv",
    )


if __name__ == "__main__":
    main()
