"""Score the demo's QC, gene mapping, perturbation and donor-level methods against planted truth.

The perturbation part: where the planted AD genes of the perturbed cell type rank in
``reports/perturb/<type>.tsv``, each counted from the end its direction predicts
(``rosmap_geneformer.analysis.truth.perturbation_against_truth``). The donor part (``donor``,
when ``reports/donor/disease/donors.tsv`` exists and the truth has ``donors.tsv``): per method and
set (cv, test, all), AUROC against the planted AD status, AUROC without the resilient AD donors,
where the resilient donors' scores rank, the Spearman correlation of score and planted AD gene
effect among AD donors and the share of resilient donors called AD
(``donors_against_truth``); ``donor_attention``, from ``reports/donor/disease/attention.tsv``:
whether the attention models' per-cell-type enrichment follows the planted effect and signal of
each cell type (``attention_against_truth``). The GRN is scored by the ``grn`` stage itself
(``reports/grn/metrics.json``). Not timed; the machine context is recorded
(:mod:`harness`) because the tokens, and so everything after them, follow this CPU's numpy
argsort (its dispatch is in ``machine.sort_dispatch``).

Run after `dvc repro` (or `make demo`) from the project root:

    python benchmarks/demo_truth.py

Writes reports/benchmarks/demo_truth.json and prints it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import harness


def scores() -> dict[str, Any]:
    """The demo's scores against its planted truth (all library imports are here)."""
    import pandas as pd

    from rosmap_geneformer import counts
    from rosmap_geneformer.analysis import truth
    from rosmap_geneformer.data import gene_map
    from rosmap_geneformer.params import SPLITS, get, load_params

    params = load_params()
    tables = truth.read_truth(Path(get(params, "paths.raw")) / "demo" / "truth")
    qc_dir = Path(get(params, "paths.qc"))
    cells = pd.concat([counts.read_cells(qc_dir / f"{s}.parquet") for s in SPLITS])
    result = {
        "qc": truth.qc_against_truth(cells, tables["cells"]),
        "gene_mapping": truth.mapping_against_truth(
            tables["genes"], gene_map.read_gene_map(get(params, "paths.gene_map"))
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
    donor_reports = Path(get(params, "paths.reports")) / "donor" / "disease"
    if "donors" in tables and (donor_reports / "donors.tsv").exists():
        result["donor"] = truth.donors_against_truth(
            pd.read_csv(donor_reports / "donors.tsv", sep="\t", dtype={"patient_id": str}),
            tables["donors"],
        )
    if "donors" in tables and (donor_reports / "attention.tsv").exists():
        result["donor_attention"] = truth.attention_against_truth(
            pd.read_csv(donor_reports / "attention.tsv", sep="\t"),
            tables["donors"],
            truth_ad=tables["ad_genes"],
        )
    return result


def main(argv: list[str] | None = None) -> None:
    """Score the demo, write the JSON and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, default=harness.ROOT / "reports/benchmarks/demo_truth.json"
    )
    args = parser.parse_args(argv)
    report = harness.start_report("demo_truth", **scores())
    harness.finish_report(report, args.output)
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2, default=str))


if __name__ == "__main__":
    main()
