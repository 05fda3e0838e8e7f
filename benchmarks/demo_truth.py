"""Score the demo pipeline's QC and gene mapping against the generator's planted truth.

Run after `dvc repro` (or `make demo`) from the project root:

    python benchmarks/demo_truth.py

Writes reports/benchmarks/demo_truth.json and prints it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from rosmap_geneformer import genes, io, truth
from rosmap_geneformer.params import SPLITS, get, load_params


def main() -> None:
    params = load_params()
    tables = truth.read_truth(Path(get(params, "paths.raw")) / "demo" / "truth")
    qc_dir = Path(get(params, "paths.qc"))
    cells = pd.concat(
        [pd.read_csv(qc_dir / f"{s}_cells.tsv", sep="\t", index_col=0) for s in SPLITS]
    )
    result = {
        "qc": truth.qc_against_truth(cells, tables["cells"]),
        "gene_mapping": truth.mapping_against_truth(
            tables["genes"], genes.read_gene_map(get(params, "paths.gene_map"))
        ),
    }
    io.write_json(result, Path(get(params, "paths.reports")) / "benchmarks" / "demo_truth.json")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
