"""Stage gene_map: build the symbol -> Ensembl id table (data/reference/gene_map.tsv)."""

from __future__ import annotations

from rosmap_geneformer.data.gene_map import make_gene_map, write_gene_map
from rosmap_geneformer.errors import run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import stage_arguments


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    gene_map = make_gene_map(
        source=params.gene_map.source,
        release=params.gene_map.release,
        biomart_host=params.gene_map.biomart_host,
    )
    write_gene_map(gene_map, params.paths.gene_map)


if __name__ == "__main__":
    run_stage(main)
