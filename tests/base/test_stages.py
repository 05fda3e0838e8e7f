"""Stage scripts on tiny inputs in a temporary directory: errors name the file and leave no output."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import sparse

from rosmap_geneformer import counts, io

STAGES = Path(__file__).resolve().parents[2] / "src" / "stages"


def load_stage(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", STAGES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_inputs(root: Path, *, n_donors: int = 10, drop_donor: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    raw = root / "data/raw/demo"
    raw.mkdir(parents=True)
    donors = [f"D{i}" for i in range(n_donors)]
    libraries = [f"L{i}" for i in range(n_donors)]
    cells = [f"{lib}_{j:04d}-1" for lib in libraries for j in range(20)]
    obs = pd.DataFrame({"batch": [c.split("_")[0] for c in cells]}, index=cells)
    counts = sparse.csr_matrix(rng.poisson(1.0, (len(cells), 30)).astype(np.float32))
    var = pd.DataFrame({"ensembl_id": [f"ENSG{i:011d}" for i in range(30)]})
    var.index = var["ensembl_id"].to_numpy()
    io.write_h5ad(ad.AnnData(X=counts, obs=obs, var=var), root / "data/interim/ensembl.h5ad")
    pd.DataFrame({"dataset": libraries, "subject": donors}).to_csv(
        raw / "batch_mapping.tsv", sep="\t", index=False
    )
    meta = pd.DataFrame(
        {
            "subject": donors,
            "msex": [i % 2 for i in range(n_donors)],
            "age_death": ["90+"] * n_donors,
            "Pathologic_diagnosis_of_AD": ["yes", "no"] * (n_donors // 2),
        }
    )
    if drop_donor:
        meta = meta[meta["subject"] != drop_donor]
    meta.to_csv(raw / "individual_metadata.tsv", sep="\t", index=False)
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    params["paths"] = {k: str(root / v) for k, v in params["paths"].items()}
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    return params_path


def test_split_stage_writes_disjoint_patient_splits(tmp_path: Path) -> None:
    params_path = _write_inputs(tmp_path)
    load_stage("split").main(["--params", str(params_path)])
    seen: set[str] = set()
    rows: list[int] = []
    matrix = ad.read_h5ad(tmp_path / "data/interim/ensembl.h5ad")
    for split in ("train", "val", "test"):
        table = counts.read_cells(tmp_path / "data/interim/split" / f"{split}.parquet")
        patients = set(table["patient_id"])
        assert patients and not (patients & seen)
        seen |= patients
        # Cell tables point at their cells' rows of the one matrix; no counts are copied.
        assert list(matrix.obs_names[table[counts.MATRIX_ROW]]) == list(table.index)
        assert (table["batch"] == matrix.obs.loc[table.index, "batch"]).all()
        rows += table[counts.MATRIX_ROW].tolist()
    assert sorted(rows) == list(range(matrix.n_obs))
    assert not list((tmp_path / "data/interim/split").glob("*.h5ad"))
    report = json.loads((tmp_path / "reports/split.json").read_text())
    assert report["cells_total"] == 200
    assert sum(report[s]["n_cells"] for s in ("train", "val", "test")) == 200


def test_split_stage_missing_donor_metadata_fails_cleanly(tmp_path: Path) -> None:
    params_path = _write_inputs(tmp_path, drop_donor="D3")
    with pytest.raises(ValueError, match=r"individual_metadata\.tsv: no donor metadata.*'D3'"):
        load_stage("split").main(["--params", str(params_path)])
    assert not (tmp_path / "data/interim/split").exists()
    assert not (tmp_path / "reports/split.json").exists()


def test_split_stage_refuses_too_few_donors(tmp_path: Path) -> None:
    params_path = _write_inputs(tmp_path, n_donors=4)
    with pytest.raises(ValueError, match="would have none"):
        load_stage("split").main(["--params", str(params_path)])
    assert not (tmp_path / "data/interim/split").exists()
