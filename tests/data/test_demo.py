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
from rosmap_geneformer.analysis.truth import read_truth
from rosmap_geneformer.data.demo import dataset
from rosmap_geneformer.data.demo.dataset import (
    DemoData,
    generate_demo,
    generate_demo_from_params,
    write_demo,
)
from rosmap_geneformer.data.demo.genes import GENE_KINDS
from rosmap_geneformer.data.demo.simulation import CELL_TYPES, effect_column, plant_ad_effects
from rosmap_geneformer.data.gene_map import load_bundled_annotation
from rosmap_geneformer.errors import InputError

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
    "truth/grn.tsv": [
        "tf",
        "tf_ensembl_id",
        "target",
        "target_ensembl_id",
        "weight",
        "cell_types",
        "case",
    ],
    "truth/grn_decoys.tsv": ["tf", "tf_ensembl_id", "target", "target_ensembl_id", "via", "case"],
    "truth/donors.tsv": [
        "subject",
        "ad_status",
        "resilient",
        "severity",
        *(f"effect_{c}" for c in CELL_TYPES),
        "ad_gene_effect",
    ],
}
# The same data set with AD effects that vary between donors and cell types.
VARIED = {"resilient_fraction": 0.5, "cell_type_effect_sd": 0.5}
# The raw and truth tables that do not depend on how strongly AD donors are affected.
UNAFFECTED_TABLES = (
    "individual_metadata",
    "batch_mapping",
    "cell_annotation",
    "truth_cells",
    "truth_genes",
    "truth_ad_genes",
    "truth_grn",
    "truth_grn_decoys",
)
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
def varied() -> DemoData:
    return generate_demo(**TINY, **VARIED, seed=7)


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


def _ad_gene_shift(demo: DemoData) -> pd.Series:
    """Per AD donor, the mean shift of its AD genes from the controls' cells of the same type, in
    the direction of the planted change (log1p CP10k of the clean cells)."""
    cells = demo.truth_cells
    keep = ~(cells["is_doublet"] | cells["is_low_quality"]).to_numpy()
    x, rows = _log_normalised(demo.adata.X[keep]), cells[keep].reset_index(drop=True)
    index = {name: i for i, name in enumerate(demo.adata.var_names)}
    status = demo.truth_donors.set_index("subject")["ad_status"]
    control = rows["subject"].map(status).eq("control").to_numpy()
    shifts = {}
    for subject in status.index[status == "AD"]:
        own = rows["subject"].eq(subject).to_numpy()
        values = []
        for gene in demo.truth_ad_genes.itertuples():
            expression = x[:, index[gene.gene]].toarray().ravel()
            for cell_type in gene.cell_types.split(","):
                in_type = rows["cell_type"].eq(cell_type).to_numpy()
                if (own & in_type).any():
                    shift = expression[own & in_type].mean() - expression[control & in_type].mean()
                    values.append(np.sign(gene.log2_fold_change) * shift)
        shifts[subject] = float(np.mean(values))
    return pd.Series(shifts)


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
    assert grn.loc[grn["case"] != "cascade", "tf"].nunique() == TINY["n_tf_programs"]
    drawn = grn[grn["case"].isin(["program", "cell_type_specific"])]
    assert (drawn.groupby("tf").size() == TINY["targets_per_tf"]).all()
    assert (grn["weight"] > 0).all()
    for tf, edges in grn[grn["case"] == "program"].groupby("tf"):
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


def test_misleading_cases_are_planted_and_labelled(
    demo: DemoData, clean: tuple[sparse.csr_matrix, pd.DataFrame]
) -> None:
    x, cells = clean
    index = {name: i for i, name in enumerate(demo.adata.var_names)}
    grn, decoys = demo.truth_grn, demo.truth_grn_decoys
    # TINY has SOX9, OLIG2 and SPI1: the cascade and the cell-type-specific edges, not the
    # shared targets (RUNX1 is the 6th program).
    assert set(grn["case"]) == {"program", "cell_type_specific", "mediator", "cascade"}
    mediator = grn.loc[grn["case"] == "mediator"]
    assert mediator[["tf", "target"]].values.tolist() == [["SOX9", "NFIB"]]
    cascade = grn[grn["case"] == "cascade"]
    assert (cascade["tf"] == "NFIB").all() and len(cascade) == 4
    assert decoys[["tf", "target", "via", "case"]].values.tolist() == [
        ["SOX9", t, "NFIB", "indirect"] for t in cascade["target"]
    ]
    planted = set(grn[["tf", "target"]].itertuples(index=False, name=None))
    assert not set(decoys[["tf", "target"]].itertuples(index=False, name=None)) & planted

    def log_cp10k(gene: str, rows: np.ndarray) -> np.ndarray:
        values = x[rows][:, index[gene]].toarray().ravel()
        return np.log1p(1e4 * values / np.asarray(x[rows].sum(axis=1)).ravel())

    # An indirect target follows its TF through the mediator.
    ast = cells["cell_type"].eq("Ast").to_numpy()
    indirect = [
        np.corrcoef(log_cp10k("SOX9", ast), log_cp10k(t, ast))[0, 1] for t in decoys["target"]
    ]
    assert np.mean(indirect) > 0.2
    # A cell-type-specific target of OLIG2 follows it in OPC, not in Oli.
    specific = grn[(grn["case"] == "cell_type_specific")]
    assert (specific["tf"] == "OLIG2").all() and (specific["cell_types"] == "OPC").all()
    for kind, expected in (("OPC", True), ("Oli", False)):
        rows = cells["cell_type"].eq(kind).to_numpy()
        rho = np.nanmean(
            [
                np.corrcoef(log_cp10k("OLIG2", rows), log_cp10k(t, rows))[0, 1]
                for t in specific["target"]
            ]
        )
        assert (rho > 0.2) == expected, (kind, rho)


def test_truth_donors(demo: DemoData, written: Path) -> None:
    donors = demo.truth_donors
    meta = demo.individual_metadata.set_index("subject")
    assert donors["subject"].tolist() == sorted(meta.index)
    is_ad = donors["subject"].map(meta["Pathologic_diagnosis_of_AD"]).eq("yes").to_numpy()
    assert (donors["ad_status"].eq("AD").to_numpy() == is_ad).all()
    effects = donors[[effect_column(c) for c in CELL_TYPES]].to_numpy()
    assert (donors.loc[~is_ad, ["severity", "ad_gene_effect"]] == 0).all().all()
    assert (effects[~is_ad] == 0).all()
    assert donors.loc[is_ad, "severity"].between(0.6, 1.4).all()
    # At the default options no donor is resilient and every cell type carries the severity.
    assert not donors["resilient"].any()
    assert (effects == donors["severity"].to_numpy()[:, None]).all()
    # The planted AD gene effect: the mean |log2 FC| x effect over (gene, cell type) pairs.
    pairs = [
        abs(g.log2_fold_change)
        for g in demo.truth_ad_genes.itertuples()
        for _ in g.cell_types.split(",")
    ]
    expected = np.mean(pairs) * donors["severity"].to_numpy()
    np.testing.assert_allclose(donors["ad_gene_effect"], expected, atol=2e-6)
    # Written and read back as it is.
    read = read_truth(written / "truth")["donors"]
    pd.testing.assert_frame_equal(read, donors, check_dtype=False)


def test_ad_effect_options_at_zero_leave_the_data_as_before(
    demo: DemoData, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every factor is exactly 1: resilience and cell-type multipliers change nothing.
    donors = pd.DataFrame(
        {"is_ad": [True, True, False], "severity": [0.7, 1.3, 0.0], "subject": ["a", "b", "c"]}
    )
    planted = plant_ad_effects(
        np.random.default_rng(3), donors, resilient_fraction=0.0, cell_type_effect_sd=0.0
    )
    assert (planted["resilience"] == 1.0).all()
    assert not planted["resilient"].any()
    for cell_type in CELL_TYPES:
        assert planted[effect_column(cell_type)].tolist() == [0.7, 1.3, 0.0]

    # The same data set when the resilience and multipliers are never drawn: the second generator
    # leaves the main stream alone.
    def severity_only(
        rng: np.random.Generator, donors: pd.DataFrame, **options: float
    ) -> pd.DataFrame:
        out = donors.assign(resilient=False, resilience=1.0)
        for cell_type in CELL_TYPES:
            out[effect_column(cell_type)] = donors["severity"]
        return out

    monkeypatch.setattr(dataset, "plant_ad_effects", severity_only)
    legacy = generate_demo(**TINY, seed=7)
    assert (demo.adata.X != legacy.adata.X).nnz == 0
    for name in (*UNAFFECTED_TABLES, "truth_donors"):
        pd.testing.assert_frame_equal(getattr(demo, name), getattr(legacy, name), obj=name)


def test_ad_effects_vary_between_donors_and_cell_types(demo: DemoData, varied: DemoData) -> None:
    before = demo.truth_donors.set_index("subject")
    after = varied.truth_donors.set_index("subject")
    is_ad = after["ad_status"].eq("AD")
    # round(0.5 x 4 AD donors) resilient, keeping 5-30 % of their severity; the others all of it.
    assert after["resilient"].sum() == 2
    assert not after.loc[~is_ad, "resilient"].any()
    resilient = after["resilient"]
    kept = after.loc[resilient, "severity"] / before.loc[resilient, "severity"]
    assert kept.between(0.05, 0.3).all()
    strong = is_ad & ~resilient
    np.testing.assert_allclose(after.loc[strong, "severity"], before.loc[strong, "severity"])
    # Each AD donor's cell types are hit to different degrees; controls not at all.
    effects = after[[effect_column(c) for c in CELL_TYPES]]
    assert (effects[is_ad].max(axis=1) > 1.5 * effects[is_ad].min(axis=1)).all()
    assert (effects[~is_ad] == 0).all().all()
    assert (after.loc[~is_ad, ["severity", "ad_gene_effect"]] == 0).all().all()

    # Only the AD donors' counts change: cells, donors and controls' counts stay the same.
    for name in UNAFFECTED_TABLES:
        pd.testing.assert_frame_equal(getattr(demo, name), getattr(varied, name), obj=name)
    ad_cells = demo.truth_cells["subject"].map(after["ad_status"]).eq("AD").to_numpy()
    assert (demo.adata.X[~ad_cells] != varied.adata.X[~ad_cells]).nnz == 0
    assert (demo.adata.X[ad_cells] != varied.adata.X[ad_cells]).nnz > 0

    # The counts follow the planted effect: resilient donors' AD genes barely move, and each AD
    # donor's shift moves the way its planted AD gene effect does (same cells, same noise).
    # Measured: shifts 1.19 -> 0.39 and 1.03 -> 0.33 for the resilient donors, which keep 25 %
    # and 18 % of their severity.
    shift_before, shift_after = _ad_gene_shift(demo), _ad_gene_shift(varied)
    assert (shift_after[resilient[is_ad]] < 0.5 * shift_before[resilient[is_ad]]).all()
    assert (shift_after[resilient[is_ad]] < 0.45).all()
    assert (shift_after[strong] > 0.5).all()
    change = np.sign(after.loc[is_ad, "ad_gene_effect"] - before.loc[is_ad, "ad_gene_effect"])
    assert (np.sign(shift_after - shift_before) == change[shift_after.index]).all()


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="demo.n_genes"):
        generate_demo(**{**TINY, "n_genes": 60}, seed=0)
    with pytest.raises(ValueError, match="demo.doublet_rate"):
        generate_demo(**{**TINY, "doublet_rate": 0.7}, seed=0)
    with pytest.raises(InputError, match=r"demo.resilient_fraction=1.5: must lie in \[0, 1\]"):
        generate_demo(**{**TINY, "resilient_fraction": 1.5}, seed=0)
    with pytest.raises(InputError, match="demo.cell_type_effect_sd=-0.1"):
        generate_demo(**{**TINY, "cell_type_effect_sd": -0.1}, seed=0)
    with pytest.raises(ValueError, match="n_cell"):
        generate_demo_from_params({**TINY, "n_cell": 3}, seed=0)


def test_params_pass_the_ad_effect_options() -> None:
    small = generate_demo_from_params(
        {**TINY, "n_donors": 4, "cells_per_donor": 30, **VARIED}, seed=1
    )
    assert small.params["resilient_fraction"] == VARIED["resilient_fraction"]
    assert small.params["cell_type_effect_sd"] == VARIED["cell_type_effect_sd"]
    assert small.truth_donors["resilient"].sum() == 1  # round(0.5 x 2 AD donors)


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
