from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from builders import LENIENT_LOSSES
from rosmap_geneformer.data import metadata

COLUMNS = {
    "cell": "cell",
    "cell_type": "cell_type",
    "cell_type_fine": "cell_type_high_resolution",
    "pathologic_ad": "Pathologic_diagnosis_of_AD",
    "cogdx": "cogdx",
}


def _donors() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "Pathologic_diagnosis_of_AD": ["yes", "no", "yes", "no"],
            "cogdx": [4, 1, 2, 5],
            "msex": [0, 1, 1, 0],
        },
        index=pd.Index(["D1", "D2", "D3", "D4"], name="subject"),
    )


def test_pathologic_and_clinical_definitions() -> None:
    donors = _donors()
    pathologic = metadata.ad_status(
        donors, definition="pathologic", columns=COLUMNS, source="m.tsv"
    )
    clinical = metadata.ad_status(donors, definition="clinical", columns=COLUMNS, source="m.tsv")
    assert pathologic.tolist() == ["AD", "control", "AD", "control"]
    assert clinical.iloc[[0, 1, 3]].tolist() == ["AD", "control", "AD"]
    assert pd.isna(clinical.iloc[2]), "MCI (cogdx 2) is neither AD nor control"


def test_unknown_definition_and_missing_column_are_refused() -> None:
    with pytest.raises(ValueError, match="labels.ad_definition"):
        metadata.ad_status(_donors(), definition="braak", columns=COLUMNS, source="m.tsv")
    with pytest.raises(ValueError, match=r"m\.tsv.*cogdx"):
        metadata.ad_status(
            _donors().drop(columns="cogdx"), definition="clinical", columns=COLUMNS, source="m.tsv"
        )


def test_unexpected_diagnosis_values_are_refused() -> None:
    donors = _donors()
    donors.loc["D1", "Pathologic_diagnosis_of_AD"] = "maybe"
    with pytest.raises(ValueError, match="maybe"):
        metadata.ad_status(donors, definition="pathologic", columns=COLUMNS, source="m.tsv")


def _cells() -> pd.DataFrame:
    names = [f"L1_{i:04d}-1" for i in range(6)]
    return pd.DataFrame(
        {
            "batch": ["L1"] * 6,
            "patient_id": ["D1", "D1", "D2", "D2", "D3", "D3"],
            "matrix_row": np.arange(6, dtype=np.int64),
        },
        index=names,
    )


def test_annotate_joins_and_counts_drops() -> None:
    cells = _cells()
    annotation = pd.DataFrame(
        {
            "cell": cells.index[:5],
            "cell_type": ["Exc", "Mic", "Ast", "Exc", "Oli"],
            "cell_type_high_resolution": ["Exc L2-3", "Mic P2RY12", "Ast GRM3", "Exc L4", "Oli"],
        }
    )
    labels = pd.Series({"D1": "AD", "D2": np.nan, "D3": "control"}, dtype=object)
    out, report = metadata.annotate_cells(
        cells,
        annotation=annotation,
        donors=_donors(),
        labels=labels,
        columns=COLUMNS,
        losses=LENIENT_LOSSES,
    )
    assert out.index.tolist() == [cells.index[i] for i in (0, 1, 4)]
    assert out["cell_type"].tolist() == ["Exc", "Mic", "Oli"]
    assert out["ad_status"].tolist() == ["AD", "AD", "control"]
    assert out["msex"].tolist() == [0, 0, 1]
    assert report["dropped_no_cell_annotation"] == 1
    assert report["dropped_no_label"] == 2
    assert report["cells_in"] == 6 and report["cells_out"] == 3
    # Each kept cell still points at its own row of the count matrix.
    assert out["matrix_row"].tolist() == [0, 1, 4]


def test_orphan_library_names_the_mapping_file(tmp_path: Path) -> None:
    mapping_path = tmp_path / "batch_mapping.tsv"
    pd.DataFrame({"dataset": ["L2"], "subject": ["D1"]}).to_csv(mapping_path, sep="\t", index=False)
    mapping = metadata.load_batch_mapping(
        mapping_path, library_col="dataset", subject_col="subject"
    )
    with pytest.raises(ValueError, match=r"batch_mapping\.tsv.*L1"):
        metadata.attach_patients(
            _cells(), mapping, batch_col="batch", source="c.h5ad", mapping_source=mapping_path
        )
    with pytest.raises(ValueError, match=r"c\.h5ad.*'library'.*data\.columns\.batch"):
        metadata.attach_patients(
            _cells(), mapping, batch_col="library", source="c.h5ad", mapping_source=mapping_path
        )


def test_missing_columns_and_donors_are_named(tmp_path: Path) -> None:
    path = tmp_path / "individual_metadata.tsv"
    pd.DataFrame({"donor": ["D1"]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"individual_metadata\.tsv.*'subject'"):
        metadata.load_donors(path, subject_col="subject")
    with pytest.raises(ValueError, match=r"no donor metadata for patient\(s\) \['D9'\]"):
        metadata.check_donors_known(["D1", "D9"], _donors(), source=path)
