"""Stage tokenize@{split}: rank-value encode one sampled split into a Geneformer dataset.

Reads the cell table ``${paths.sampled}/{split}.parquet``, its cells' rows of ``${paths.ensembl}``
(chunk by chunk) and the dictionaries in ``${paths.dictionaries}``, writes
``${paths.tokenized}/{split}.dataset`` (``datasets`` save_to_disk layout) and the metrics
``${paths.reports}/tokenize/{split}.json`` (cells dropped, vocabulary coverage, lengths).
"""

from __future__ import annotations

from pathlib import Path

from rosmap_geneformer import counts, io
from rosmap_geneformer.errors import run_stage
from rosmap_geneformer.geneformer.dictionaries import (
    GENE_MEDIAN_DICTIONARY_FILE,
    TOKEN_DICTIONARY_FILE,
    load_dictionaries,
)
from rosmap_geneformer.geneformer.tokenizer import default_nproc, tokenize_cells
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import stage_arguments


def main(argv: list[str] | None = None) -> None:
    args, params = stage_arguments(argv, description=__doc__, with_split=True)
    setup_logging()
    dictionary_dir = Path(params.paths.dictionaries)
    dictionaries = load_dictionaries(
        dictionary_dir / TOKEN_DICTIONARY_FILE, dictionary_dir / GENE_MEDIAN_DICTIONARY_FILE
    )
    nproc = params.tokenize.nproc
    table = Path(params.paths.sampled) / f"{args.split}.parquet"
    report = tokenize_cells(
        counts.read_cells(table, what="sampled cell table"),
        params.paths.ensembl,
        Path(params.paths.tokenized) / f"{args.split}.dataset",
        dictionaries=dictionaries,
        model_input_size=params.tokenize.model_input_size,
        special_tokens=params.tokenize.special_tokens,
        columns=list(params.tokenize.columns),
        chunk_size=params.tokenize.chunk_size,
        nproc=default_nproc() if nproc == "auto" else int(nproc),
        losses=params.losses,
    )
    report["split"] = args.split
    report["dictionary_layout"] = dictionaries.layout
    io.write_json(report, Path(params.paths.reports) / "tokenize" / f"{args.split}.json")


if __name__ == "__main__":
    run_stage(main)
