"""Stage demo_data: simulate the ROSMAP-like demo data set with its truth (data/raw/demo/)."""

from __future__ import annotations

import logging
from pathlib import Path

from rosmap_geneformer import io
from rosmap_geneformer.data import synthetic
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import get, stage_arguments

logger = logging.getLogger("stage.demo_data")


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    out_dir = Path(get(params, "paths.raw")) / "demo"
    demo = synthetic.generate_demo_from_params(
        get(params, "demo"), seed=int(get(params, "seed")), columns=get(params, "data.columns")
    )
    # The whole folder appears at once, so DVC never caches a half-written data set.
    with io.atomic_output(out_dir) as tmp_dir:
        synthetic.write_demo(demo, tmp_dir, file_names=get(params, "raw"))
    logger.info("wrote %s", out_dir)


if __name__ == "__main__":
    main()
