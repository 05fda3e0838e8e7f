from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from rosmap_geneformer import io


def _adata(values: np.ndarray) -> ad.AnnData:
    obs = pd.DataFrame(index=[f"L1_{i}-1" for i in range(values.shape[0])])
    return ad.AnnData(X=sparse.csr_matrix(values.astype(np.float32)), obs=obs)


def test_atomic_output_leaves_nothing_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), io.atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_output_replaces_directories(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    target.mkdir()
    (target / "stale").write_text("x")
    with io.atomic_output(target) as tmp:
        tmp.mkdir()
        (tmp / "fresh").write_text("y")
    assert [p.name for p in target.iterdir()] == ["fresh"]


def test_h5ad_bytes_are_deterministic(tmp_path: Path) -> None:
    adata = _adata(np.random.default_rng(0).poisson(1.0, (50, 20)))
    io.write_h5ad(adata, tmp_path / "a.h5ad")
    io.write_h5ad(adata, tmp_path / "b.h5ad")
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.h5ad", "b.h5ad")]
    assert digest[0] == digest[1]


def test_raw_counts_pass_and_normalised_matrices_are_refused() -> None:
    counts = np.random.default_rng(0).poisson(2.0, (30, 10))
    io.check_raw_counts(_adata(counts), source="counts.h5ad")
    with pytest.raises(ValueError, match=r"counts\.h5ad.*non-integer.*raw integer"):
        io.check_raw_counts(_adata(np.log1p(counts)), source="counts.h5ad")
    with pytest.raises(ValueError, match="negative"):
        io.check_raw_counts(_adata(counts - 1.0), source="counts.h5ad")


def test_duplicate_cell_names_are_refused() -> None:
    adata = _adata(np.ones((3, 2)))
    adata.obs_names = ["a", "b", "a"]
    with pytest.raises(ValueError, match=r"x\.h5ad: 1 duplicate cell name.*'a'"):
        io.check_unique_obs_names(adata, source="x.h5ad")


def test_read_table_names_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    pd.DataFrame({"a": [1]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"t\.tsv: thing lacks column\(s\) \['b'\]"):
        io.read_table(path, required=["a", "b"], what="thing")
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        io.read_table(tmp_path / "missing.tsv", required=["a"], what="thing")
