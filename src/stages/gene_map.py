"""Stage gene_map: build the symbol -> Ensembl id table (data/reference/gene_map.tsv)."""

from __future__ import annotations

from rosmap_geneformer.data import genes
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import get, stage_arguments


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    gene_map = genes.make_gene_map(
        source=get(params, "gene_map.source"),
        release=get(params, "gene_map.release"),
        biomart_host=get(params, "gene_map.biomart_host"),
    )
    genes.write_gene_map(gene_map, get(params, "paths.gene_map"))


if __name__ == "__main__":
    main()
