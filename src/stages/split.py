"""Stage split: patient-level train/val/test split of the cells of the one count matrix.

Reads only ``obs`` of ``${paths.ensembl}``; writes one cell table per split,
``${paths.split}/{split}.parquet`` (obs, ``patient_id`` and ``matrix_row``), never the counts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rosmap_geneformer import counts, io
from rosmap_geneformer.data import metadata
from rosmap_geneformer.data.split import split_patients
from rosmap_geneformer.errors import InputError, run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import SPLITS, raw_paths, stage_arguments

logger = logging.getLogger("stage.split")


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    columns = params.data.columns.model_dump()
    raw = raw_paths(params)
    counts_path = Path(params.paths.ensembl)
    out_dir = Path(params.paths.split)

    obs = counts.read_obs(counts_path)
    library_to_donor = metadata.load_batch_mapping(
        raw["batch_mapping"], library_col=columns["library"], subject_col=columns["subject"]
    )
    patients = metadata.attach_patients(
        obs,
        library_to_donor,
        batch_col=columns["batch"],
        source=counts_path,
        mapping_source=raw["batch_mapping"],
    )
    donors = metadata.load_donors(raw["individual_metadata"], subject_col=columns["subject"])
    metadata.check_donors_known(patients.unique(), donors, source=raw["individual_metadata"])
    donors = donors.loc[sorted(patients.unique())]
    labels = metadata.ad_status(
        donors,
        definition=params.labels.ad_definition,
        columns=columns,
        source=raw["individual_metadata"],
    )
    result = split_patients(
        donors,
        labels=labels,
        fractions=params.split.fractions,
        balance=params.split.balance or (),
        max_trials=params.split.max_trials,
        seed=params.seed,
        min_donors_per_class=params.split.min_donors_per_class,
        source=str(raw["individual_metadata"]),
    )

    cell_split = patients.map(result.split_of()).to_numpy()
    cell_labels = patients.map(labels).fillna("unlabelled").to_numpy()
    report: dict = {"patients_total": len(donors), "cells_total": len(obs)}
    report["balance_pvalues"] = result.balance_pvalues
    report["balance_trial"] = result.trial
    # Read by the HTML report and `rosmap-geneformer summary`.
    report["warnings"] = result.warnings
    with io.atomic_output(out_dir) as tmp_dir:
        tmp_dir.mkdir()
        for split in SPLITS:
            mask = cell_split == split
            if not mask.any():
                msg = f"split {split!r} is empty: no cells from its donors {result.patients[split]} in {counts_path}."
                raise InputError(msg)
            table = counts.cell_table(obs, mask)
            table["patient_id"] = patients[mask].astype("category")
            counts.write_cells(table, tmp_dir / f"{split}.parquet")
            classes, n_cells = np.unique(cell_labels[mask], return_counts=True)
            split_labels = labels.reindex(result.patients[split]).fillna("unlabelled")
            report[split] = {
                "n_patients": len(result.patients[split]),
                "n_cells": int(mask.sum()),
                "cells_per_ad_status": dict(zip(classes.tolist(), n_cells.tolist(), strict=True)),
                "patients_per_ad_status": {
                    str(k): int(v) for k, v in split_labels.value_counts().sort_index().items()
                },
                "patients": result.patients[split],
            }
            logger.info("%s: %d patients, %d cells", split, report[split]["n_patients"], mask.sum())
    io.write_json(report, Path(params.paths.reports) / "split.json")


if __name__ == "__main__":
    run_stage(main)
