"""Logging set-up for stage scripts and the command line (the library itself only logs)."""

from __future__ import annotations

import logging
import os


def setup_logging(level: int | str | None = None) -> None:
    """Configure the root logger once: time, level, logger name, message.

    Parameters
    ----------
    level
        A logging level; defaults to ``$ROSMAP_LOG_LEVEL`` or ``INFO``.
    """
    level = level or os.environ.get("ROSMAP_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("numba", "h5py", "matplotlib", "urllib3", "fsspec", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
