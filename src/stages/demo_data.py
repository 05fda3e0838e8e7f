"""Stage demo_data: simulate the ROSMAP-like demo data set with its truth (data/raw/demo/)."""

from __future__ import annotations

import logging
from pathlib import Path

from rosmap_geneformer import io
from rosmap_geneformer.data.demo.dataset import generate_demo_from_params, write_demo
from rosmap_geneformer.errors import run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import stage_arguments

logger = logging.getLogger("stage.demo_data")


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    out_dir = Path(params.paths.raw) / "demo"
    demo = generate_demo_from_params(
        params.demo.values(), seed=params.seed, columns=params.data.columns.model_dump()
    )
    # The whole folder appears at once, so DVC never caches a half-written data set.
    with io.atomic_output(out_dir) as tmp_dir:
        write_demo(demo, tmp_dir, file_names=params.raw.model_dump())
    logger.info("wrote %s", out_dir)


if __name__ == "__main__":
    run_stage(main)
