"""The ROSMAP-shaped scale generator: layout, sparsity, determinism, and the pipeline reads it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import sparse

from builders import LENIENT_LOSSES
from rosmap_geneformer import counts
from rosmap_geneformer.data import metadata
from rosmap_geneformer.data.convert_genes import convert_genes_file
from rosmap_geneformer.data.gene_map import make_gene_map, map_symbols
from rosmap_geneformer.data.synthetic_scale import (
    CELL_TYPES,
    FILE_NAMES,
    N_FEATURES_10X,
    feature_table,
    generate_rosmap_shaped,
)

ROOT = Path(__file__).resolve().parents[2]
N_CELLS = 3000
ARGS = {"n_cells": N_CELLS, "cells_per_library": 1000, "seed": 7}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def columns() -> dict[str, str]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return params["data"]["columns"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("scale") / "raw"
    return out, generate_rosmap_shaped(out, **ARGS)


@pytest.fixture(scope="module")
def gene_map() -> pd.DataFrame:
    return make_gene_map(source="bundled", release=93)


def test_features_are_10x_like_unique_symbols_with_mt_genes_last() -> None:
    features = feature_table()
    assert len(features) == N_FEATURES_10X
    assert features.index.is_unique
    assert features["ensembl_id"].is_unique
    mt = features.index.str.startswith("MT-")
    assert mt.sum() == 13
    assert mt[-13:].all()
    assert (features["gene_biotype"] == "protein_coding").mean() > 0.55


def test_counts_are_raw_integer_csr_with_rosmap_sparsity(generated: tuple[Path, dict]) -> None:
    out, summary = generated
    adata = ad.read_h5ad(out / FILE_NAMES["counts"])
    assert adata.shape == (N_CELLS, N_FEATURES_10X)
    x = adata.X
    assert sparse.issparse(x)
    assert x.format == "csr"
    assert x.has_canonical_format
    assert x.nnz == summary["nnz"]
    assert (x.data >= 1).all()
    assert np.array_equal(x.data, np.round(x.data))
    # Mostly 1-3 counts, with a heavy tail (MALAT1, markers).
    assert np.mean(x.data <= 3) > 0.8
    assert x.data.max() > 100

    annotated = pd.read_csv(out / FILE_NAMES["cell_annotation"], sep="\t")["cell"]
    passed = adata.obs_names.isin(annotated)
    genes_per_cell = np.diff(x.indptr)
    assert 1800 < genes_per_cell[passed].mean() < 2200
    assert genes_per_cell[passed].std() / genes_per_cell[passed].mean() > 0.2  # varies per cell
    # Low-quality barcodes for QC to remove: few genes, or a high MT- fraction.
    mt = adata.var_names.str.startswith("MT-")
    totals = np.asarray(x.sum(axis=1)).ravel()
    pct_mt = 100 * np.asarray(x[:, mt].sum(axis=1)).ravel() / totals
    assert np.median(pct_mt[passed]) < 5
    assert 0 < np.sum(genes_per_cell < 200) < 0.05 * N_CELLS
    assert 0 < np.sum(pct_mt > 10) < 0.05 * N_CELLS

    pattern = re.compile(r"^(L\d{4})_[ACGT]{16}-1$")
    libraries = [pattern.match(name).group(1) for name in adata.obs_names]
    assert adata.obs_names.is_unique
    assert libraries == adata.obs["batch"].astype(str).tolist()


def test_raw_files_have_the_columns_the_pipeline_reads(
    generated: tuple[Path, dict], columns: dict[str, str]
) -> None:
    out, summary = generated
    obs = counts.read_obs(out / FILE_NAMES["counts"])
    mapping = metadata.load_batch_mapping(
        out / FILE_NAMES["batch_mapping"],
        library_col=columns["library"],
        subject_col=columns["subject"],
    )
    patients = metadata.attach_patients(
        obs, mapping, batch_col=columns["batch"], source="counts", mapping_source="mapping"
    )
    donors = metadata.load_donors(
        out / FILE_NAMES["individual_metadata"], subject_col=columns["subject"]
    )
    metadata.check_donors_known(patients.unique(), donors, source="individual_metadata")
    for key in ("sex", "age", "pathologic_ad", "cogdx"):
        assert columns[key] in donors.columns
    assert {"pmi", "race"} <= set(donors.columns)
    labels = metadata.ad_status(donors, definition="pathologic", columns=columns, source="meta")
    assert labels.value_counts().to_dict() == {"AD": 5, "control": 5}
    assert summary["donors"] == 10
    assert mapping.index.nunique() == summary["libraries"]

    annotation = pd.read_csv(out / FILE_NAMES["cell_annotation"], sep="\t")
    assert list(annotation.columns) == [
        columns["cell"],
        columns["cell_type"],
        columns["cell_type_fine"],
    ]
    assert annotation[columns["cell"]].isin(obs.index).all()
    assert 0.92 < len(annotation) / N_CELLS < 0.98
    assert set(annotation[columns["cell_type"]]) == set(CELL_TYPES)
    assert summary["cells_normal"] == len(annotation)


def test_same_seed_gives_the_same_bytes(generated: tuple[Path, dict], tmp_path: Path) -> None:
    first, _ = generated
    generate_rosmap_shaped(tmp_path, **ARGS)
    for name in FILE_NAMES.values():
        assert _md5(tmp_path / name) == _md5(first / name), name


def test_convert_genes_maps_nearly_every_feature(
    generated: tuple[Path, dict], gene_map: pd.DataFrame, tmp_path: Path
) -> None:
    out, _ = generated
    var_names = counts.read_var(out / FILE_NAMES["counts"]).index
    mapping = map_symbols(var_names, gene_map)
    mapped = mapping["ensembl_id"] != ""
    assert mapped.mean() > 0.999
    assert mapped[var_names.str.startswith("MT-")].all()

    # The stage's own streamed conversion, on fewer features: convert_genes spends about half a
    # millisecond per mapped gene on its bookkeeping, 17 s for all 33,538.
    small = tmp_path / "small"
    generate_rosmap_shaped(
        small, n_cells=300, cells_per_library=100, genes_per_cell=300, n_features=1500, seed=1
    )
    result = convert_genes_file(
        small / FILE_NAMES["counts"],
        tmp_path / "ensembl.h5ad",
        gene_map,
        chunk_size=128,
        losses=LENIENT_LOSSES,
    )
    assert result.report["fraction_genes_mapped"] > 0.99
    converted = ad.read_h5ad(tmp_path / "ensembl.h5ad")
    raw = ad.read_h5ad(small / FILE_NAMES["counts"])
    assert converted.n_obs == 300
    np.testing.assert_allclose(converted.obs["n_counts"], np.asarray(raw.X.sum(axis=1)).ravel())
    assert converted.var["gene_symbol"].str.startswith("MT-").sum() == 13
