"""Stage annotate@{split}: join cell types and donor metadata, derive AD status.

Reads the QC cell table ${paths.qc}/{split}.parquet and keeps the cells QC kept; writes the cell
table ${paths.annotated}/{split}.parquet (no counts).
"""

from __future__ import annotations

from pathlib import Path

from rosmap_geneformer import counts, io
from rosmap_geneformer.data import metadata
from rosmap_geneformer.data.qc import QC_FATE_COLUMNS
from rosmap_geneformer.errors import InputError, run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import raw_paths, stage_arguments


def main(argv: list[str] | None = None) -> None:
    args, params = stage_arguments(argv, description=__doc__, with_split=True)
    setup_logging()
    columns = params.data.columns.model_dump()
    raw = raw_paths(params)
    in_path = Path(params.paths.qc) / f"{args.split}.parquet"

    qc_cells = counts.read_cells(in_path, what="QC cell table")
    missing = [c for c in ("patient_id", "kept") if c not in qc_cells.columns]
    if missing:
        msg = f"{in_path}: the QC cell table lacks column(s) {missing}; rerun `dvc repro qc@{args.split}`."
        raise InputError(msg)
    kept = qc_cells[qc_cells["kept"].to_numpy(dtype=bool)].drop(columns=list(QC_FATE_COLUMNS))
    annotation = io.read_table(
        raw["cell_annotation"],
        required=[columns["cell"], columns["cell_type"]],
        what="cell annotation",
        ids=[columns["cell"]],
    )
    donors = metadata.load_donors(raw["individual_metadata"], subject_col=columns["subject"])
    metadata.check_donors_known(
        kept["patient_id"].unique(), donors, source=raw["individual_metadata"]
    )
    labels = metadata.ad_status(
        donors,
        definition=params.labels.ad_definition,
        columns=columns,
        source=raw["individual_metadata"],
    )
    annotated, report = metadata.annotate_cells(
        kept,
        annotation=annotation,
        donors=donors,
        labels=labels,
        columns=columns,
        losses=params.losses,
    )
    if annotated.empty:
        msg = (
            f"annotate@{args.split}: no cell of {in_path} has both a cell annotation in "
            f"{raw['cell_annotation']} (column {columns['cell']!r}) and an AD label. Check that "
            "cell names match obs_names and labels.ad_definition."
        )
        raise InputError(msg)
    counts.write_cells(annotated, Path(params.paths.annotated) / f"{args.split}.parquet")
    io.write_json(report, Path(params.paths.reports) / "annotate" / f"{args.split}.json")


if __name__ == "__main__":
    run_stage(main)
