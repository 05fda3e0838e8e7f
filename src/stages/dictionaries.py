"""Stage dictionaries: Geneformer token and gene median dictionaries, from data or from Geneformer.

``dictionaries.source: from_data`` computes each gene's exact non-zero median of
counts / n_counts x 10,000 over the (sampled) train split's rows of the count matrix; ``geneformer`` validates and copies the
two pickles named by ``dictionaries.token_dictionary`` / ``dictionaries.gene_median_dictionary``.
``tokenize.special_tokens`` decides the layout built from data (V2 with ``<cls>``/``<eos>``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rosmap_geneformer import counts, io
from rosmap_geneformer.errors import InputError, run_stage
from rosmap_geneformer.geneformer.dictionaries import (
    GENE_MEDIAN_DICTIONARY_FILE,
    TOKEN_DICTIONARY_FILE,
    build_dictionaries,
    compute_nonzero_medians,
    load_dictionaries,
    save_dictionaries,
)
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import stage_arguments

SOURCES = ("from_data", "geneformer")


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    source = params.dictionaries.source
    special_tokens = params.tokenize.special_tokens
    out_dir = Path(params.paths.dictionaries)
    report: dict = {"source": source}
    if source == "from_data":
        train = Path(params.paths.sampled) / "train.parquet"
        medians, report["medians"] = compute_nonzero_medians(
            params.paths.ensembl,
            cells=counts.read_cells(train, what="sampled train cell table"),
            chunk_size=params.dictionaries.chunk_size,
        )
        dictionaries = build_dictionaries(medians, special_tokens=special_tokens, source=str(train))
        with io.atomic_output(out_dir) as tmp:
            save_dictionaries(dictionaries, tmp)
    elif source == "geneformer":
        token_path = Path(params.dictionaries.token_dictionary)
        median_path = Path(params.dictionaries.gene_median_dictionary)
        dictionaries = load_dictionaries(token_path, median_path)
        if special_tokens and not dictionaries.has_special_tokens:
            msg = (
                f"{token_path}: tokenize.special_tokens is true but this is a V1 dictionary "
                "(no <cls>/<eos>). Use the V2 (gc104M) pair or set tokenize.special_tokens: false."
            )
            raise InputError(msg)
        with io.atomic_output(out_dir) as tmp:
            tmp.mkdir()
            # Byte copies: the files stay identical to Geneformer's.
            shutil.copyfile(token_path, tmp / TOKEN_DICTIONARY_FILE)
            shutil.copyfile(median_path, tmp / GENE_MEDIAN_DICTIONARY_FILE)
        report["token_dictionary"] = token_path.as_posix()
        report["gene_median_dictionary"] = median_path.as_posix()
    else:
        msg = f"params.yaml: dictionaries.source={source!r}; use one of {SOURCES}."
        raise InputError(msg)
    report.update(
        {
            "layout": dictionaries.layout,
            "tokens": len(dictionaries.token_dictionary),
            "genes": len(dictionaries.gene_ids),
        }
    )
    io.write_json(report, Path(params.paths.reports) / "dictionaries.json")


if __name__ == "__main__":
    run_stage(main)
