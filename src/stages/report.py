"""Stage report: one self-contained reports/index.html from the stage outputs."""

from __future__ import annotations

import logging
from pathlib import Path

from rosmap_geneformer import io
from rosmap_geneformer.analysis.report import ReportBuilder
from rosmap_geneformer.errors import run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import stage_arguments

logger = logging.getLogger("stage.report")


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    builder = ReportBuilder(paths=params.paths.model_dump(), tasks=sorted(params.tasks))
    page = builder.build()
    out = Path(params.paths.reports) / "index.html"
    with io.atomic_output(out) as tmp:
        tmp.write_text(page)
    logger.info("wrote %s (%d files read)", out, len(builder.files_read))


if __name__ == "__main__":
    run_stage(main)
