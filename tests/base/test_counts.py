"""The one count matrix: rows read by position, the streamed writer, cell tables."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from rosmap_geneformer import counts


def random_counts(
    n_obs: int, n_vars: int, *, seed: int = 0, density: float = 0.2
) -> sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    matrix = sparse.random(n_obs, n_vars, density=density, format="csr", random_state=rng)
    matrix.data = np.ceil(matrix.data * 9).astype(np.float32)
    matrix = matrix.astype(np.float32)
    matrix.sort_indices()
    return matrix


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, sparse.csr_matrix]:
    matrix = random_counts(300, 40)
    path = tmp_path_factory.mktemp("counts") / "m.h5ad"
    ad.AnnData(X=matrix, obs=pd.DataFrame(index=[f"c{i}" for i in range(300)])).write_h5ad(path)
    return path, matrix


@pytest.mark.parametrize("merge_gap", [0, 5, 1 << 16])
def test_selected_rows_come_back_in_the_asked_order(
    stored: tuple[Path, sparse.csr_matrix], merge_gap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, matrix = stored
    # merge_gap 0: one read per run of adjacent rows; large: one read for the whole chunk.
    monkeypatch.setattr(counts, "_MERGE_GAP", merge_gap)
    positions = np.array([299, 3, 4, 5, 150, 3, 0, 298, 17, 17, 200], dtype=np.int64)
    reader = counts.SelectedRows(path, positions)
    assert reader.n_obs == len(positions)
    whole = reader.read(0, reader.n_obs)
    assert (whole != matrix[positions]).nnz == 0
    parts = [reader.read(start, end) for start, end in reader.chunks(3)]
    assert (sparse.vstack(parts, format="csr") != matrix[positions]).nnz == 0
    data, indices, indptr = reader.read_csr(2, 6)
    np.testing.assert_array_equal(data, matrix[positions[2:6]].data)
    np.testing.assert_array_equal(indptr, matrix[positions[2:6]].indptr)
    np.testing.assert_array_equal(indices, matrix[positions[2:6]].indices)
    reader.close()


def test_selected_rows_refuse_rows_outside_the_matrix(
    stored: tuple[Path, sparse.csr_matrix],
) -> None:
    path, _ = stored
    with pytest.raises(ValueError, match=r"m\.h5ad: a cell table points at row 300.*dvc repro"):
        counts.SelectedRows(path, [0, 300])


def test_streamed_h5ad_bytes_do_not_depend_on_chunk_sizes(tmp_path: Path) -> None:
    matrix = random_counts(2000, 600, density=0.3)
    obs = pd.DataFrame({"n": np.arange(2000)}, index=[f"c{i}" for i in range(2000)])
    var = pd.DataFrame(index=[f"g{i}" for i in range(600)])
    digests = set()
    for step in (1, 37, 2000):
        path = tmp_path / f"m{step}.h5ad"
        with counts.streamed_h5ad(path, n_vars=600) as out:
            for start in range(0, 2000, step):
                out.append(matrix[start : start + step])
            out.obs, out.var, out.uns = obs, var, {"release": 93}
        written = ad.read_h5ad(path)
        assert (matrix != written.X).nnz == 0
        pd.testing.assert_frame_equal(written.obs, obs)
        assert written.uns["release"] == 93
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_streamed_h5ad_leaves_nothing_when_the_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "m.h5ad"
    with (
        pytest.raises(RuntimeError, match="set obs and var"),
        counts.streamed_h5ad(path, n_vars=3) as out,
    ):
        out.append(sparse.csr_matrix(np.ones((2, 3), dtype=np.float32)))
    assert not path.exists() and not list(tmp_path.iterdir())


def test_cell_tables_round_trip_with_dtypes_and_row_pointers(tmp_path: Path) -> None:
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(["L1", "L2", "L1", "L3"], categories=["L1", "L2", "L3", "L9"]),
            "n_counts": np.array([10, 20, 30, 40], dtype=np.float32),
            "donor": ["00000001", "00000002", "00000001", "00000003"],
        },
        index=["a", "b", "c", "d"],
    )
    table = counts.cell_table(obs, np.array([True, False, True, True]))
    assert table[counts.MATRIX_ROW].tolist() == [0, 2, 3]
    counts.write_cells(table, tmp_path / "t.parquet")
    back = counts.read_cells(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(back, table)
    assert back["donor"].iloc[0] == "00000001"  # ids stay strings
    with pytest.raises(ValueError, match="matrix_row"):
        counts.write_cells(obs, tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet: split cell table not found"):
        counts.read_cells(tmp_path / "missing.parquet", what="split cell table")
