"""Stage sample: stratified undersampling of train and val; test is kept whole by default.

Reads the annotated cell tables; writes the sampled cell tables ${paths.sampled}/{split}.parquet
and their cell ids ({split}_cell_ids.txt). No counts are copied: later stages read the sampled
cells' rows of ${paths.ensembl}.
"""

from __future__ import annotations

from pathlib import Path

from rosmap_geneformer import counts, io
from rosmap_geneformer.data.metadata import count_values
from rosmap_geneformer.data.sampling import split_rng, undersample
from rosmap_geneformer.errors import InputError, run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import SPLITS, stage_arguments


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    in_dir = Path(params.paths.annotated)
    out_dir = Path(params.paths.sampled)
    sampled_splits = set(params.sample.splits)
    unknown = sampled_splits - set(SPLITS)
    if unknown:
        msg = f"params.yaml: sample.splits names {sorted(unknown)}; use some of {list(SPLITS)}."
        raise InputError(msg)

    report: dict = {}
    with io.atomic_output(out_dir) as tmp_dir:
        tmp_dir.mkdir()
        for split in SPLITS:
            path = in_dir / f"{split}.parquet"
            cells = counts.read_cells(path, what="annotated cell table")
            missing = [c for c in ("patient_id", "cell_type") if c not in cells.columns]
            if missing:
                msg = f"{path}: the annotated cell table lacks column(s) {missing}; rerun `dvc repro annotate@{split}`."
                raise InputError(msg)
            if split in sampled_splits:
                kept = undersample(
                    cells,
                    max_per_patient_class=params.sample.max_cells_per_patient_cell_type,
                    max_per_class=params.sample.max_cells_per_class,
                    rng=split_rng(params.seed, split),
                )
                sampled = cells.iloc[kept].copy()
            else:
                sampled = cells
            counts.write_cells(sampled, tmp_dir / f"{split}.parquet")
            io.write_lines(sampled.index, tmp_dir / f"{split}_cell_ids.txt")
            report[split] = {
                "sampled": split in sampled_splits,
                "cells_in": len(cells),
                "cells_out": len(sampled),
                "cells_per_cell_type": count_values(sampled["cell_type"]),
                "cells_per_ad_status": count_values(sampled["ad_status"])
                if "ad_status" in sampled
                else {},
            }
    io.write_json(report, Path(params.paths.reports) / "sample.json")


if __name__ == "__main__":
    run_stage(main)
