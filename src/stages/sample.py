"""Stage sample: stratified undersampling of train and val; test is kept whole by default."""

from __future__ import annotations

from pathlib import Path

from rosmap_geneformer import io
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.metadata import count_values
from rosmap_geneformer.params import SPLITS, get, stage_arguments
from rosmap_geneformer.sampling import split_rng, undersample


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    in_dir = Path(get(params, "paths.annotated"))
    out_dir = Path(get(params, "paths.sampled"))
    sampled_splits = set(get(params, "sample.splits"))
    unknown = sampled_splits - set(SPLITS)
    if unknown:
        msg = f"params.yaml: sample.splits names {sorted(unknown)}; use some of {list(SPLITS)}."
        raise ValueError(msg)

    report: dict = {}
    with io.atomic_output(out_dir) as tmp_dir:
        tmp_dir.mkdir()
        for split in SPLITS:
            adata = io.read_h5ad(in_dir / f"{split}.h5ad")
            io.check_obs_columns(
                adata, ["patient_id", "cell_type"], source=in_dir / f"{split}.h5ad"
            )
            if split in sampled_splits:
                kept = undersample(
                    adata.obs,
                    max_per_patient_class=get(params, "sample.max_cells_per_patient_cell_type"),
                    max_per_class=get(params, "sample.max_cells_per_class"),
                    rng=split_rng(int(get(params, "seed")), split),
                )
                sampled = adata[kept].copy()
            else:
                sampled = adata
            io.write_h5ad(sampled, tmp_dir / f"{split}.h5ad")
            io.write_lines(sampled.obs_names, tmp_dir / f"{split}_cell_ids.txt")
            report[split] = {
                "sampled": split in sampled_splits,
                "cells_in": int(adata.n_obs),
                "cells_out": int(sampled.n_obs),
                "cells_per_cell_type": count_values(sampled.obs["cell_type"]),
                "cells_per_ad_status": count_values(sampled.obs["ad_status"])
                if "ad_status" in sampled.obs
                else {},
            }
    io.write_json(report, Path(get(params, "paths.reports")) / "sample.json")


if __name__ == "__main__":
    main()
