"""Stratified, seeded undersampling of cells."""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pandas as pd

from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)


def split_rng(seed: int, split: str) -> np.random.Generator:
    """A generator that depends on the seed and the split name, not on the order splits run in."""
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


def _cap(groups: pd.Series, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask keeping at most ``cap`` random members of each group."""
    keep = np.ones(len(groups), dtype=bool)
    if cap is None:
        return keep
    codes, uniques = pd.factorize(groups, sort=True)
    for code in range(len(uniques)):
        members = np.flatnonzero(codes == code)
        if len(members) > cap:
            dropped = rng.choice(members, size=len(members) - cap, replace=False)
            keep[dropped] = False
    return keep


def undersample(
    obs: pd.DataFrame,
    *,
    patient_col: str = "patient_id",
    class_col: str = "cell_type",
    max_per_patient_class: int | None,
    max_per_class: int | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Indices of the cells kept by two caps, in their original order.

    First at most ``max_per_patient_class`` cells of each (patient, class), so that no donor
    dominates a class; then at most ``max_per_class`` cells per class. Cells are drawn uniformly
    at random within each group. ``None`` disables a cap.

    Parameters
    ----------
    obs
        Cell metadata.
    patient_col, class_col
        The columns that define the groups.
    max_per_patient_class, max_per_class
        The caps.
    rng
        Random generator (see :func:`split_rng`).
    """
    for cap_name, cap in (
        ("max_per_patient_class", max_per_patient_class),
        ("max_per_class", max_per_class),
    ):
        if cap is not None and cap < 1:
            msg = f"params.yaml: sample cap {cap_name}={cap} must be a positive number or null."
            raise InputError(msg)
    pair = obs[patient_col].astype(str) + "\x1f" + obs[class_col].astype(str)
    first = _cap(pair, max_per_patient_class, rng)
    second = np.zeros(len(obs), dtype=bool)
    second[np.flatnonzero(first)[_cap(obs[class_col].astype(str)[first], max_per_class, rng)]] = (
        True
    )
    kept = np.flatnonzero(second)
    logger.info("kept %d of %d cells", len(kept), len(obs))
    return kept
