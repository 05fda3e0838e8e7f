"""Tests for rosmap_geneformer.data.demo: the demo data set and its truth."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import sparse

from rosmap_geneformer import io
from rosmap_geneformer.data.demo.dataset import (
    DemoData,
    generate_demo,
    generate_demo_from_params,
    write_demo,
)
from rosmap_geneformer.data.demo.genes import GENE_KINDS
from rosmap_geneformer.data.demo.simulation import CELL_TYPES
from rosmap_geneformer.data.gene_map import load_bundled_annotation

TINY = {
    "n_donors": 8,
    "cells_per_donor": 150,
    "libraries_per_donor": [1, 2],
    "n_genes": 800,
    "fraction_ad": 0.5,
    "low_quality_fraction": 0.08,
    "doublet_rate": 0.06,
    "n_ad_genes": 12,
    "n_tf_programs": 3,
    "targets_per_tf": 6,
    "n_previous_symbols": 3,
    "n_alias_symbols": 3,
    "n_duplicate_genes": 2,
    "n_unmappable": 3,
}
RAW_COLUMNS = {
    "individual_metadata": [
        "subject",
        "msex",
        "age_death",
        "pmi",
        "race",
        "Pathologic_diagnosis_of_AD",
        "cogdx",
        "niareagansc",
        "braaksc",
        "ceradsc",
        "apoe_genotype",
    ],
    "batch_mapping": ["dataset", "subject"],
    "cell_annotation": ["cell", "cell_type", "cell_type_high_resolution"],
}
TRUTH_COLUMNS = {
    "truth/cells.tsv": [
        "cell",
        "library",
        "subject",
        "cell_type",
        "is_doublet",
        "is_low_quality",
        "low_quality_kind",
    ],
    "truth/genes.tsv": ["var_name", "ensembl_id", "kind"],
    "truth/ad_genes.tsv": ["gene", "ensembl_id", "cell_types", "log2_fold_change", "direction"],
    "truth/grn.tsv": ["tf", "tf_ensembl_id", "target", "target_ensembl_id", "weight", "cell_types"],
}
OBS_NAME = re.compile(r"^(L\d{3})_[ACGT]{16}-1$")


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _symbols(text: str) -> set[str]:
    return {s.strip() for s in text.split(",") if s.strip()}


def _log_normalised(x: sparse.csr_matrix) -> sparse.csr_matrix:
    totals = np.asarray(x.sum(axis=1)).ravel()
    out = sparse.csr_matrix(sparse.diags(1e4 / totals) @ x)
    out.data = np.log1p(out.data)
    return out


@pytest.fixture(scope="module")
def demo() -> DemoData:
    return generate_demo(**TINY, seed=7)


@pytest.fixture(scope="module")
def written(demo: DemoData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo(demo, out)
    return out


@pytest.fixture(scope="module")
def clean(demo: DemoData) -> tuple[sparse.csr_matrix, pd.DataFrame]:
    """Log-normalised counts and truth rows of the cells that are neither doublets nor low quality."""
    cells = demo.truth_cells
    keep = ~(cells["is_doublet"] | cells["is_low_quality"]).to_numpy()
    meta = demo.individual_metadata.set_index("subject")
    rows = cells[keep].reset_index(drop=True)
    rows["is_ad"] = rows["subject"].map(meta["Pathologic_diagnosis_of_AD"]).eq("yes")
    return _log_normalised(demo.adata.X[keep]), rows


def test_same_seed_gives_identical_bytes(written: Path, tmp_path: Path) -> None:
    again = generate_demo(**TINY, seed=7)
    write_demo(again, tmp_path / "again")
    assert _digests(written) == _digests(tmp_path / "again")

    other = generate_demo(**TINY, seed=8)
    write_demo(other, tmp_path / "other")
    first, second = _digests(written), _digests(tmp_path / "other")
    for name in ("counts.h5ad", "individual_metadata.tsv", "truth/cells.tsv", "truth/genes.tsv"):
        assert first[name] != second[name], name


def test_file_layout_and_columns(written: Path) -> None:
    expected = {
        "counts.h5ad",
        "individual_metadata.tsv",
        "batch_mapping.tsv",
        "cell_annotation.tsv",
        *TRUTH_COLUMNS,
        "truth/params.json",
    }
    assert set(_digests(written)) == expected
    for stem, required in RAW_COLUMNS.items():
        table = io.read_table(written / f"{stem}.tsv", required=required, what=stem)
        assert list(table.columns) == required
    for name, required in TRUTH_COLUMNS.items():
        io.read_table(written / name, required=required, what=name)
    params = json.loads((written / "truth/params.json").read_text())
    assert params["seed"] == 7
    assert params["n_genes"] == TINY["n_genes"]


def test_custom_columns_and_file_names(tmp_path: Path) -> None:
    columns = {"batch": "library_id", "library": "lib", "subject": "donor", "cell": "barcode"}
    small = generate_demo(**{**TINY, "n_donors": 4, "cells_per_donor": 30}, seed=1, columns=columns)
    paths = write_demo(small, tmp_path, file_names={"counts": "raw.h5ad"})
    assert paths["counts"] == tmp_path / "raw.h5ad"
    adata = io.read_h5ad(paths["counts"])
    assert list(adata.obs.columns) == ["library_id"]
    mapping = pd.read_csv(paths["batch_mapping"], sep="\t")
    assert list(mapping.columns) == ["lib", "donor"]
    assert "donor" in pd.read_csv(paths["individual_metadata"], sep="\t").columns
    assert pd.read_csv(paths["cell_annotation"], sep="\t").columns[0] == "barcode"


def test_counts_are_integer_float32_csr(written: Path) -> None:
    adata = io.read_h5ad(written / "counts.h5ad")
    assert sparse.issparse(adata.X)
    assert adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    io.check_raw_counts(adata, source="counts.h5ad")
    io.check_unique_obs_names(adata, source="counts.h5ad")
    assert adata.shape[1] == TINY["n_genes"]
    assert list(adata.obs.columns) == ["batch"]
    assert adata.var.shape[1] == 0
    libraries = [OBS_NAME.match(name) for name in adata.obs_names]
    assert all(libraries)
    assert [m.group(1) for m in libraries] == adata.obs["batch"].astype(str).tolist()


def test_libraries_map_to_donors(demo: DemoData) -> None:
    mapping = demo.batch_mapping
    assert mapping["dataset"].is_unique
    assert set(mapping["dataset"]) == set(demo.adata.obs["batch"].astype(str))
    meta = demo.individual_metadata
    assert meta["subject"].is_unique
    assert set(mapping["subject"]) == set(meta["subject"])
    assert set(mapping.groupby("subject").size()) <= set(TINY["libraries_per_donor"])
    assert (meta["Pathologic_diagnosis_of_AD"] == "yes").sum() == TINY["n_donors"] // 2


def test_donor_metadata_codes(demo: DemoData) -> None:
    meta = demo.individual_metadata
    is_ad = meta["Pathologic_diagnosis_of_AD"].eq("yes")
    assert set(meta["Pathologic_diagnosis_of_AD"]) <= {"yes", "no"}
    assert set(meta["msex"]) <= {0, 1}
    assert meta["age_death"].str.fullmatch(r"\(\d+,\d+\]|90\+").all()
    assert meta["pmi"].between(0, 100).all()
    assert meta["cogdx"].between(1, 6).all()
    assert meta.loc[is_ad, "niareagansc"].isin([1, 2]).all()
    assert meta.loc[~is_ad, "niareagansc"].isin([3, 4]).all()
    assert meta["braaksc"].between(0, 6).all()
    assert meta["ceradsc"].between(1, 4).all()
    assert set(meta["apoe_genotype"]) <= {22, 23, 24, 33, 34, 44}


def test_truth_cells_and_annotation(demo: DemoData) -> None:
    cells = demo.truth_cells
    assert cells["cell"].tolist() == demo.adata.obs_names.tolist()
    assert abs(cells["is_doublet"].mean() - TINY["doublet_rate"]) < 0.03
    assert abs(cells["is_low_quality"].mean() - TINY["low_quality_fraction"]) < 0.03
    assert not (cells["is_doublet"] & cells["is_low_quality"]).any()
    assert set(cells.loc[cells["is_low_quality"], "low_quality_kind"]) == {"few_genes", "high_mito"}
    assert (cells.loc[~cells["is_low_quality"], "low_quality_kind"] == "").all()

    annotation = demo.cell_annotation
    passed = cells.loc[~(cells["is_doublet"] | cells["is_low_quality"]), "cell"]
    assert annotation["cell"].tolist() == passed.tolist()
    assert set(annotation["cell_type"]) == set(CELL_TYPES)
    fine = annotation["cell_type_high_resolution"]
    expected_major = fine.str.split(" ").str[0].replace({"End": "Vas", "Per": "Vas"})
    assert (expected_major == annotation["cell_type"]).all()


def test_low_quality_cells_fail_default_qc(demo: DemoData) -> None:
    x = demo.adata.X
    n_genes = np.diff(x.indptr)
    n_counts = np.asarray(x.sum(axis=1)).ravel()
    is_mt = demo.adata.var_names.str.startswith("MT-")
    pct_mito = 100 * np.asarray(x[:, is_mt].sum(axis=1)).ravel() / n_counts
    kind = demo.truth_cells["low_quality_kind"].to_numpy()
    normal = ~(demo.truth_cells["is_doublet"] | demo.truth_cells["is_low_quality"]).to_numpy()

    assert (n_genes[kind == "few_genes"] < 150).all()
    assert (n_counts[kind == "few_genes"] < 400).all()
    assert (pct_mito[kind == "high_mito"] > 25).all()
    assert (n_genes[normal] >= 200).all()
    assert (n_counts[normal] >= 400).all()
    assert (pct_mito[normal] < 10).all()
    assert np.median(pct_mito[normal]) == pytest.approx(2.0, abs=0.7)
    # Doublets sum two cells, so they are larger than the typical cell.
    assert np.median(n_counts[demo.truth_cells["is_doublet"].to_numpy()]) > np.median(
        n_counts[normal]
    )


def test_truth_genes(demo: DemoData) -> None:
    truth = demo.truth_genes
    table = load_bundled_annotation(93)
    assert truth["var_name"].tolist() == demo.adata.var_names.tolist()
    assert set(truth["kind"]) == set(GENE_KINDS)
    counts = truth["kind"].value_counts()
    assert counts["previous_symbol"] == TINY["n_previous_symbols"]
    assert counts["alias_symbol"] == TINY["n_alias_symbols"]
    assert counts["duplicate_suffix"] == TINY["n_duplicate_genes"]
    assert counts["unmappable"] == TINY["n_unmappable"]

    mt = truth[truth["var_name"].str.startswith("MT-")]
    assert len(mt) == 13
    for marker in ("SYT1", "GAD1", "PLP1", "AQP4", "P2RY12", "PDGFRA", "CLDN5", "PDGFRB", "MOG"):
        assert marker in set(truth["var_name"])

    named = truth[truth["kind"] == "gene_name"]
    assert (table.loc[named["ensembl_id"], "gene_name"].to_numpy() == named["var_name"]).all()
    assert named["ensembl_id"].is_unique

    all_names = set(table["gene_name"]) | set(table["approved_symbol"])
    for kind, column in (
        ("previous_symbol", "previous_symbols"),
        ("alias_symbol", "alias_symbols"),
    ):
        for row in truth[truth["kind"] == kind].itertuples():
            assert row.var_name not in all_names
            assert row.var_name in _symbols(table.at[row.ensembl_id, column])
            assert table[column].map(lambda s, v=row.var_name: v in _symbols(s)).sum() == 1

    everything = all_names | {
        s for col in ("previous_symbols", "alias_symbols") for v in table[col] for s in _symbols(v)
    }
    unmappable = truth[truth["kind"] == "unmappable"]
    assert (unmappable["ensembl_id"].fillna("") == "").all()
    assert not set(unmappable["var_name"]) & everything

    ids_by_name = dict(zip(named["var_name"], named["ensembl_id"], strict=True))
    for row in truth[truth["kind"] == "duplicate_suffix"].itertuples():
        assert row.var_name.endswith("-1")
        assert ids_by_name[row.var_name[:-2]] == row.ensembl_id
        assert row.var_name not in everything


def test_ad_genes_shift_in_ad_donors(
    demo: DemoData, clean: tuple[sparse.csr_matrix, pd.DataFrame]
) -> None:
    x, cells = clean
    index = {name: i for i, name in enumerate(demo.adata.var_names)}
    ad_genes = demo.truth_ad_genes
    assert len(ad_genes) == TINY["n_ad_genes"]
    assert set(ad_genes["direction"]) == {"up", "down"}
    assert (
        np.sign(ad_genes["log2_fold_change"]) == ad_genes["direction"].map({"up": 1, "down": -1})
    ).all()
    shifts = []
    for row in ad_genes.itertuples():
        in_types = cells["cell_type"].isin(row.cell_types.split(",")).to_numpy()
        values = x[:, index[row.gene]].toarray().ravel()
        ad = values[in_types & cells["is_ad"].to_numpy()].mean()
        control = values[in_types & ~cells["is_ad"].to_numpy()].mean()
        assert np.sign(ad - control) == np.sign(row.log2_fold_change), row.gene
        shifts.append(abs(ad - control))
    # log1p(CP10k) units: a log2 fold change of 1-1.5 shows as a mean shift well above noise.
    assert np.mean(shifts) > 0.4


def test_tf_targets_correlate_with_their_tf(
    demo: DemoData, clean: tuple[sparse.csr_matrix, pd.DataFrame]
) -> None:
    x, cells = clean
    index = {name: i for i, name in enumerate(demo.adata.var_names)}
    grn = demo.truth_grn
    assert grn["tf"].nunique() == TINY["n_tf_programs"]
    assert (grn.groupby("tf").size() == TINY["targets_per_tf"]).all()
    assert (grn["weight"] > 0).all()
    for tf, edges in grn.groupby("tf"):
        active = cells["cell_type"].isin(edges["cell_types"].iloc[0].split(",")).to_numpy()
        tf_values = x[active][:, index[tf]].toarray().ravel()
        # A program is a switch: on in half of the cells of its types, the TF nearly silent in
        # the others.
        assert 0.35 < (tf_values > 0).mean() < 0.75, tf
        correlations = np.array(
            [
                np.corrcoef(tf_values, x[active][:, index[t]].toarray().ravel())[0, 1]
                for t in edges["target"]
            ]
        )
        assert (correlations > 0).mean() >= 0.8, tf
        assert correlations.mean() > 0.1, tf


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="demo.n_genes"):
        generate_demo(**{**TINY, "n_genes": 60}, seed=0)
    with pytest.raises(ValueError, match="demo.doublet_rate"):
        generate_demo(**{**TINY, "doublet_rate": 0.7}, seed=0)
    with pytest.raises(ValueError, match="n_cell"):
        generate_demo_from_params({**TINY, "n_cell": 3}, seed=0)


def test_stage_writes_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).resolve().parents[2]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["demo"] = {**TINY, "n_donors": 4, "cells_per_donor": 30}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(root / "src" / "stages"))
    sys.modules.pop("demo_data", None)
    import demo_data

    demo_data.main([])
    out = tmp_path / params["paths"]["raw"] / "demo"
    assert (out / params["raw"]["counts"]).is_file()
    assert (out / "truth" / "genes.tsv").is_file()
    assert not list(out.parent.glob(".tmp-*"))
