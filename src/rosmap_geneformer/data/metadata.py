"""Donor and cell metadata: loading, joining and label derivation."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.errors import InputError
from rosmap_geneformer.io import read_table
from rosmap_geneformer.losses import check_loss
from rosmap_geneformer.params_schema import Losses

logger = logging.getLogger(__name__)

AD_LABEL = "AD"
CONTROL_LABEL = "control"
AD_DEFINITIONS = ("pathologic", "clinical")


def load_batch_mapping(path: str | Path, *, library_col: str, subject_col: str) -> pd.Series:
    """Library id -> donor id, from ``batch_mapping.tsv``.

    Every cell is read as a string (ids such as ``00000001`` keep their zeros).

    Raises
    ------
    InputError
        When a row has no library or no donor id, or a library is listed twice with different
        donors.
    """
    table = read_table(
        path, required=[], what="batch mapping", dtype=str, ids=[library_col, subject_col]
    )
    table = table[[library_col, subject_col]].drop_duplicates()
    clash = table[library_col][table[library_col].duplicated()]
    if len(clash):
        msg = (
            f"{path}: library id(s) {sorted(clash.unique())[:5]} in column {library_col!r} map to "
            "more than one donor. Each library must belong to one donor; fix the file."
        )
        raise InputError(msg)
    return table.set_index(library_col)[subject_col]


def load_donors(path: str | Path, *, subject_col: str) -> pd.DataFrame:
    """Donor metadata indexed by donor id, from ``individual_metadata.tsv``.

    Donor ids are read as strings, as written (``00000001`` stays ``"00000001"``, so it matches
    the batch mapping); the other columns are parsed by pandas (numbers stay numbers).

    Raises
    ------
    InputError
        When a row has no donor id, or a donor has two rows.
    """
    table = read_table(path, required=[], what="donor metadata", ids=[subject_col])
    dups = table[subject_col][table[subject_col].duplicated()]
    if len(dups):
        msg = (
            f"{path}: donor id(s) {sorted(dups.unique())[:5]} appear more than once in column "
            f"{subject_col!r}. Keep one row per donor."
        )
        raise InputError(msg)
    return table.set_index(subject_col).sort_index()


def ad_status(
    donors: pd.DataFrame, *, definition: str, columns: Mapping[str, str], source: str | Path
) -> pd.Series:
    """Derive each donor's AD label from a rule.

    Parameters
    ----------
    donors
        Donor metadata indexed by donor id.
    definition
        ``"pathologic"``: AD when the pathologic-diagnosis column is ``"yes"`` (NIA-Reagan 1-2),
        control when ``"no"``. ``"clinical"``: AD when ``cogdx`` is 4 or 5, control when it is 1,
        undefined otherwise (MCI and other dementias are left out).
    columns
        ``data.columns`` from params (keys ``pathologic_ad`` and ``cogdx``).
    source
        The metadata file, for error messages.

    Returns
    -------
    ``"AD"``, ``"control"`` or missing (NaN) per donor.
    """
    if definition not in AD_DEFINITIONS:
        msg = f"params.yaml: labels.ad_definition={definition!r}; use one of {AD_DEFINITIONS}."
        raise InputError(msg)
    key = "pathologic_ad" if definition == "pathologic" else "cogdx"
    column = columns[key]
    if column not in donors.columns:
        msg = (
            f"{source}: labels.ad_definition={definition!r} needs column {column!r}, which is "
            f"missing (columns: {list(donors.columns)}). Add it or set data.columns.{key}."
        )
        raise InputError(msg)
    values = donors[column]
    labels = pd.Series(np.nan, index=donors.index, dtype=object)
    if definition == "pathologic":
        text = values.astype(str).str.strip().str.lower()
        unknown = sorted(set(text[values.notna()]) - {"yes", "no"})
        if unknown:
            msg = f"{source}: column {column!r} has values {unknown}; expected 'yes' or 'no'."
            raise InputError(msg)
        labels[text == "yes"] = AD_LABEL
        labels[text == "no"] = CONTROL_LABEL
    else:
        codes = pd.to_numeric(values, errors="coerce")
        labels[codes.isin([4, 5])] = AD_LABEL
        labels[codes == 1] = CONTROL_LABEL
    return labels.rename("ad_status")


def attach_patients(
    obs: pd.DataFrame,
    library_to_donor: pd.Series,
    *,
    batch_col: str,
    source: str | Path,
    mapping_source: str | Path,
) -> pd.Series:
    """Donor id of every cell, through its library.

    Raises
    ------
    InputError
        When the batch column is missing, a cell has no library id, or a library has no donor in
        the batch mapping.
    """
    if batch_col not in obs.columns:
        msg = (
            f"{source}: obs lacks the library column {batch_col!r} (columns: "
            f"{list(obs.columns)}). Set data.columns.batch in params.yaml."
        )
        raise InputError(msg)
    libraries = obs[batch_col]
    blank = libraries.isna().to_numpy() | (libraries.astype(str).str.strip() == "").to_numpy()
    if blank.any():
        cells = list(obs.index[blank][:3])
        msg = (
            f"{source}: obs[{batch_col!r}] (the library id) is empty for {int(blank.sum())} of "
            f"{len(obs)} cell(s), e.g. {cells}; every cell needs its library: fill it in "
            "before convert_genes (or set data.columns.batch)."
        )
        raise InputError(msg)
    libraries = obs[batch_col].astype(str)
    orphan = sorted(set(libraries) - set(library_to_donor.index))
    if orphan:
        msg = (
            f"{mapping_source}: library id(s) {orphan[:5]} (of {len(orphan)}) from {source} "
            f"obs[{batch_col!r}] have no donor. Add them to the batch mapping."
        )
        raise InputError(msg)
    return libraries.map(library_to_donor).astype(str).rename("patient_id")


def check_donors_known(
    patients: pd.Series | pd.Index, donors: pd.DataFrame, *, source: str | Path
) -> None:
    """Refuse patients that have no row in the donor metadata."""
    missing = sorted(set(map(str, patients)) - set(donors.index))
    if missing:
        msg = (
            f"{source}: no donor metadata for patient(s) {missing[:5]} (of {len(missing)}). "
            "Add their rows, or drop their libraries from the batch mapping."
        )
        raise InputError(msg)


def annotate_cells(
    cells: pd.DataFrame,
    *,
    annotation: pd.DataFrame,
    donors: pd.DataFrame,
    labels: pd.Series,
    columns: Mapping[str, str],
    losses: Losses | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Join cell-type annotation and donor metadata; drop and count cells lacking either.

    Parameters
    ----------
    cells
        A cell table (index: cell names) with ``patient_id``.
    annotation
        The cell annotation table (cell name, cell type, fine cell type columns).
    donors
        Donor metadata indexed by donor id.
    labels
        Donor id -> AD label (see :func:`ad_status`); missing values mean undefined.
    columns
        ``data.columns`` from params.
    losses
        ``losses.unannotated_cells`` and ``losses.unlabelled_cells`` (the schema's defaults when
        ``None``): the shares of cells without a cell type, and of annotated cells whose donor has
        no AD label, above which the drop is a WARNING and a refusal.

    Returns
    -------
    The annotated cell table (the kept cells, in their order) and a report of counts.
    """
    losses = losses or Losses()
    cell_col, type_col = columns["cell"], columns["cell_type"]
    fine_col = columns.get("cell_type_fine")
    annotation = annotation.astype({cell_col: str}).set_index(cell_col)
    dup = annotation.index[annotation.index.duplicated()]
    if len(dup):
        msg = f"cell annotation: cell(s) {sorted(dup.unique())[:5]} are annotated more than once."
        raise InputError(msg)

    obs = cells.copy()
    names = pd.Index(cells.index)
    has_type = names.isin(annotation.index)
    cell_type = annotation[type_col].reindex(names)
    has_type &= cell_type.notna().to_numpy()
    status = obs["patient_id"].astype(str).map(labels)
    has_label = status.notna().to_numpy()
    keep = has_type & has_label
    checked = {
        "unannotated_cells": check_loss(
            int((~has_type).sum()),
            len(names),
            what="cells without a cell type in the cell annotation",
            key="unannotated_cells",
            limit=losses.unannotated_cells,
            source="annotate",
            hint=_name_examples(names[~has_type], annotation.index),
        ),
        "unlabelled_cells": check_loss(
            int((has_type & ~has_label).sum()),
            int(has_type.sum()),
            what="annotated cells whose donor has no AD label",
            key="unlabelled_cells",
            limit=losses.unlabelled_cells,
            source="annotate",
            hint="check labels.ad_definition and the donor metadata's label columns",
        ),
    }

    obs["cell_type"] = cell_type.to_numpy()
    if fine_col and fine_col in annotation.columns:
        obs["cell_type_fine"] = annotation[fine_col].reindex(names).to_numpy()
    obs["ad_status"] = status.to_numpy()
    donor_cols = [c for c in donors.columns if c not in obs.columns]
    donor_info = donors[donor_cols].reindex(obs["patient_id"].astype(str))
    for col in donor_cols:
        obs[col] = donor_info[col].to_numpy()

    out = obs[keep].copy()
    for col in ("cell_type", "ad_status", "cell_type_fine"):
        if col in out:
            out[col] = pd.Categorical(out[col].astype(str))
    report = {
        "cells_in": len(cells),
        "cells_out": len(out),
        "dropped_no_cell_annotation": int((~has_type).sum()),
        "dropped_no_label": int((has_type & ~has_label).sum()),
        "cells_per_cell_type": count_values(out["cell_type"]),
        "cells_per_ad_status": count_values(out["ad_status"]),
        "patients": int(out["patient_id"].nunique()),
        "losses": checked,
    }
    logger.info(
        "annotated %d of %d cells (%d without annotation, %d without label)",
        report["cells_out"],
        report["cells_in"],
        report["dropped_no_cell_annotation"],
        report["dropped_no_label"],
    )
    return out, report


def _name_examples(missing: pd.Index, annotated: pd.Index) -> str:
    """Examples of unannotated cell names beside annotated ones (a barcode suffix shows at once)."""
    if not len(missing):
        return ""
    return (
        f"unannotated cell names look like {list(missing[:2])}, the annotation's like "
        f"{list(annotated[:2])}; check data.columns.cell and the cell names"
    )


def count_values(values: pd.Series) -> dict[str, int]:
    """Counts per distinct value, keyed by the value as a string, in sorted order."""
    counts = values.astype(str).value_counts()
    return {str(k): int(counts[k]) for k in sorted(counts.index)}
