"""Score the demo pipeline's QC, gene mapping and perturbation ranking against the planted truth.

The perturbation part: where the planted AD genes of the perturbed cell type rank in
``reports/perturb/<type>.tsv``, each counted from the end its direction predicts
(:func:`rosmap_geneformer.analysis.truth.perturbation_against_truth`). The GRN is scored by the ``grn``
stage itself (``reports/grn/metrics.json``).

Run after `dvc repro` (or `make demo`) from the project root:

    python benchmarks/demo_truth.py

Writes reports/benchmarks/demo_truth.json and prints it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from rosmap_geneformer import counts, io
from rosmap_geneformer.analysis import truth
from rosmap_geneformer.data import genes
from rosmap_geneformer.params import SPLITS, get, load_params


def main() -> None:
    params = load_params()
    tables = truth.read_truth(Path(get(params, "paths.raw")) / "demo" / "truth")
    qc_dir = Path(get(params, "paths.qc"))
    cells = pd.concat([counts.read_cells(qc_dir / f"{s}.parquet") for s in SPLITS])
    result = {
        "qc": truth.qc_against_truth(cells, tables["cells"]),
        "gene_mapping": truth.mapping_against_truth(
            tables["genes"], genes.read_gene_map(get(params, "paths.gene_map"))
        ),
    }
    perturb = get(params, "perturb")
    cell_types = None if perturb["cell_type"] is None else [perturb["cell_type"]]
    reports = Path(get(params, "paths.reports")) / "perturb"
    result["perturbation"] = {
        kind: truth.perturbation_against_truth(
            pd.read_csv(reports / f"{kind}.tsv", sep="\t"),
            tables["ad_genes"],
            perturb_type=kind,
            cell_types=cell_types,
        )
        for kind in perturb["types"]
        if (reports / f"{kind}.tsv").exists()
    }
    io.write_json(result, Path(get(params, "paths.reports")) / "benchmarks" / "demo_truth.json")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
