"""Stage annotate@{split}: join cell types and donor metadata, derive AD status."""

from __future__ import annotations

from pathlib import Path

from rosmap_geneformer import io, metadata
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import get, raw_paths, stage_arguments


def main(argv: list[str] | None = None) -> None:
    args, params = stage_arguments(argv, description=__doc__, with_split=True)
    setup_logging()
    columns = get(params, "data.columns")
    raw = raw_paths(params)
    in_path = Path(get(params, "paths.qc")) / f"{args.split}.h5ad"

    adata = io.read_h5ad(in_path)
    io.check_obs_columns(adata, ["patient_id"], source=in_path)
    annotation = io.read_table(
        raw["cell_annotation"],
        required=[columns["cell"], columns["cell_type"]],
        what="cell annotation",
        dtype={columns["cell"]: str},
    )
    donors = metadata.load_donors(raw["individual_metadata"], subject_col=columns["subject"])
    metadata.check_donors_known(
        adata.obs["patient_id"].unique(), donors, source=raw["individual_metadata"]
    )
    labels = metadata.ad_status(
        donors,
        definition=get(params, "labels.ad_definition"),
        columns=columns,
        source=raw["individual_metadata"],
    )
    annotated, report = metadata.annotate_cells(
        adata, annotation=annotation, donors=donors, labels=labels, columns=columns
    )
    if annotated.n_obs == 0:
        msg = (
            f"annotate@{args.split}: no cell of {in_path} has both a cell annotation in "
            f"{raw['cell_annotation']} (column {columns['cell']!r}) and an AD label. Check that "
            "cell names match obs_names and labels.ad_definition."
        )
        raise ValueError(msg)
    io.write_h5ad(annotated, Path(get(params, "paths.annotated")) / f"{args.split}.h5ad")
    io.write_json(report, Path(get(params, "paths.reports")) / "annotate" / f"{args.split}.json")


if __name__ == "__main__":
    main()
