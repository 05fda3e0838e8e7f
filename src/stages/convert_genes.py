"""Stage convert_genes: raw counts with gene symbols -> counts with Ensembl ids, streamed.

Reads the raw counts ``compute.chunk_size`` cells at a time and writes the one count matrix that
every later stage reads rows from (data/interim/ensembl.h5ad), plus reports/genes/mapping.json and
reports/genes/lost_genes.tsv.
"""

from __future__ import annotations

from pathlib import Path

from rosmap_geneformer.data import convert_genes, gene_map
from rosmap_geneformer.errors import run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import raw_paths, stage_arguments


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    counts_path = raw_paths(params)["counts"]
    gene_map_path = Path(params.paths.gene_map)
    reports = Path(params.paths.reports) / "genes"

    result = convert_genes.convert_genes_file(
        counts_path,
        params.paths.ensembl,
        gene_map.read_gene_map(gene_map_path),
        batch_key=params.data.columns.batch,
        chunk_size=params.compute.chunk_size,
        gene_map_source=gene_map_path,
        losses=params.losses,
    )
    convert_genes.write_conversion(
        result, h5ad=None, report=reports / "mapping.json", lost=reports / "lost_genes.tsv"
    )


if __name__ == "__main__":
    run_stage(main)
