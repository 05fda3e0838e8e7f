"""QC: per-cell metrics, filters, Scrublet per library from the one matrix, cell table, report."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType
from unittest import mock

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import sparse

from builders import LENIENT_LOSSES
from rosmap_geneformer import counts
from rosmap_geneformer.data import qc
from rosmap_geneformer.data.doublets import scrublet_parts
from rosmap_geneformer.data.qc_report import write_reports

STAGES = Path(__file__).resolve().parents[2] / "src" / "stages"
N_MT = 5
# Thresholds for the synthetic cells (about 1,500 counts and 190 genes each).
SETTINGS = qc.QCSettings(min_genes=100, min_counts=300, max_pct_mito=10.0, seed=0)
NO_SCRUBLET = qc.QCSettings(min_genes=100, min_counts=300, max_pct_mito=10.0, scrublet=False)


def make_adata(
    *,
    libraries: tuple[str, ...] = ("L2", "L0", "L1"),
    cells: int = 150,
    n_genes: int = 300,
    seed: int = 0,
    doublet_rate: float = 0.06,
    few_genes_rate: float = 0.04,
    high_mito_rate: float = 0.04,
    n_mt: int = N_MT,
    shuffle: bool = True,
) -> ad.AnnData:
    """Raw NB counts of 4 cell types per library, with injected doublets and low-quality cells.

    Libraries are deliberately unsorted and their cells interleaved (``shuffle``), so that the
    merge order is tested. ``obs["kind"]`` is the truth: singlet, doublet, few_genes, high_mito.
    """
    rng = np.random.default_rng(seed)
    n_types = 4
    base = rng.gamma(0.6, 1.0, n_genes)
    profiles = []
    for _ in range(n_types):
        profile = base.copy()
        markers = rng.choice(np.arange(n_mt, n_genes), 25, replace=False)
        profile[markers] *= rng.uniform(8, 20, 25)
        profile[:n_mt] = 0.4
        profiles.append(profile / profile.sum())
    profiles = np.array(profiles)
    blocks, frames = [], []
    for library in libraries:
        types = rng.integers(0, n_types, cells)
        mu = profiles[types] * rng.lognormal(np.log(1500), 0.3, cells)[:, None]
        kind = np.full(cells, "singlet", dtype=object)
        order = rng.permutation(cells)
        n_dbl, n_few, n_mito = (
            round(r * cells) for r in (doublet_rate, few_genes_rate, high_mito_rate)
        )
        for i in order[:n_dbl]:
            other = (types[i] + 1 + rng.integers(0, n_types - 1)) % n_types
            mu[i] += profiles[other] * rng.lognormal(np.log(1500), 0.3)
            kind[i] = "doublet"
        for i in order[n_dbl : n_dbl + n_few]:
            mu[i] = profiles[types[i]] * rng.uniform(60, 200)
            kind[i] = "few_genes"
        for i in order[n_dbl + n_few : n_dbl + n_few + n_mito]:
            mito = profiles[types[i]].copy()
            mito[:n_mt] *= 80
            mu[i] = mito / mito.sum() * 1500
            kind[i] = "high_mito"
        counts = rng.negative_binomial(5, 5 / (5 + mu)).astype(np.float32)
        blocks.append(counts)
        frames.append(
            pd.DataFrame(
                {"batch": library, "kind": kind, "cell_type": [f"T{t}" for t in types]},
                index=[f"{library}_C{j:04d}-1" for j in range(cells)],
            )
        )
    x = np.vstack(blocks)
    obs = pd.concat(frames)
    obs["kind"] = pd.Categorical(
        obs["kind"], categories=["singlet", "doublet", "few_genes", "high_mito", "unused"]
    )
    obs["cell_type"] = obs["cell_type"].astype("category")
    obs["batch"] = obs["batch"].astype("category")
    obs["n_counts"] = x.sum(axis=1) + 7.0  # upstream total over more genes: must be kept as is
    obs["donor_age"] = rng.uniform(70, 95, len(obs))
    symbols = [f"MT-G{i}" for i in range(n_mt)] + [f"GENE{i}" for i in range(n_mt, n_genes)]
    var = pd.DataFrame(
        {"ensembl_id": [f"ENSG{i:011d}" for i in range(n_genes)], "gene_symbol": symbols},
        index=[f"ENSG{i:011d}" for i in range(n_genes)],
    )
    adata = ad.AnnData(X=sparse.csr_matrix(x), obs=obs, var=var)
    adata.uns["source"] = {"release": 93}
    if shuffle:
        adata = adata[rng.permutation(adata.n_obs)].copy()
    return adata


def expected_pass(adata: ad.AnnData, settings: qc.QCSettings) -> tuple[np.ndarray, pd.DataFrame]:
    """Direct numpy computation of the metrics and the cells passing the filters."""
    dense = adata.X.toarray().astype(np.float64)
    mt = adata.var["gene_symbol"].str.startswith("MT-").to_numpy()
    total = dense.sum(axis=1)
    frame = pd.DataFrame(
        {
            "n_genes": (dense > 0).sum(axis=1),
            "total_counts": total,
            "pct_counts_mt": np.where(
                total > 0, 100 * dense[:, mt].sum(axis=1) / np.maximum(total, 1), 0.0
            ),
        },
        index=adata.obs_names,
    )
    passed = (
        (frame["n_genes"] >= settings.min_genes)
        & (frame["total_counts"] >= settings.min_counts)
        & (frame["pct_counts_mt"] <= settings.max_pct_mito)
    ).to_numpy()
    return passed, frame


def sorted_order(adata: ad.AnnData) -> pd.Index:
    """Cell names in the order the output must have: libraries sorted, input order within."""
    libs = adata.obs["batch"].astype(str)
    return pd.Index(
        [name for lib in sorted(libs.unique()) for name in adata.obs_names[libs == lib]]
    )


def write_split(adata: ad.AnnData, path: Path) -> pd.DataFrame:
    """Write ``adata`` as the count matrix and return the cell table of all its cells."""
    adata.write_h5ad(path)
    return counts.cell_table(adata.obs, np.ones(adata.n_obs, dtype=bool))


def run(
    adata: ad.AnnData, path: Path, settings: qc.QCSettings = SETTINGS, **options: object
) -> qc.QCResult:
    """QC of every cell of ``adata``, written as the matrix at ``path``."""
    options.setdefault("batch_key", "batch")
    return qc.run_qc(
        write_split(adata, path), path, settings=settings, **options, losses=LENIENT_LOSSES
    )


def kept_cells(result: qc.QCResult) -> pd.DataFrame:
    return result.cells[result.cells["kept"]]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("qc")
    adata = make_adata()
    path = root / "train.h5ad"
    result = run(adata, path, split="train", source=root / "train.parquet")
    return {"root": root, "adata": adata, "path": path, "result": result}


def test_metrics_match_numpy() -> None:
    adata = make_adata(libraries=("L0",), cells=40, shuffle=False)
    x = adata.X.tolil()
    x[0, :] = 0  # a cell without counts gets pct 0, not NaN
    x = x.tocsr()
    x.data[x.indptr[1]] = 0  # a stored zero is not a detected gene
    adata.X = x
    assert x.nnz > np.count_nonzero(x.data)
    _, want = expected_pass(adata, SETTINGS)
    mito = qc.mito_genes(adata.var)
    assert mito.sum() == N_MT
    got = qc.compute_qc_metrics(adata.X, mito, index=adata.obs_names)
    np.testing.assert_array_equal(got["n_genes"], want["n_genes"])
    np.testing.assert_allclose(got["total_counts"], want["total_counts"])
    np.testing.assert_allclose(got["pct_counts_mt"], want["pct_counts_mt"])
    assert got.loc[adata.obs_names[0], "pct_counts_mt"] == 0
    none = qc.compute_qc_metrics(adata.X, np.zeros(adata.n_vars, bool))
    assert (none["pct_counts_mt"] == 0).all()


def test_filters_remove_exactly_what_they_should(tmp_path: Path) -> None:
    adata = make_adata(seed=1)
    result = run(adata, tmp_path / "in.h5ad", NO_SCRUBLET, split="val")
    passed, metrics = expected_pass(adata, NO_SCRUBLET)
    out = kept_cells(result)
    assert set(out.index) == set(adata.obs_names[passed])
    report = result.report
    fails = {
        "min_genes": metrics["n_genes"] < NO_SCRUBLET.min_genes,
        "min_counts": metrics["total_counts"] < NO_SCRUBLET.min_counts,
        "max_pct_mito": metrics["pct_counts_mt"] > NO_SCRUBLET.max_pct_mito,
    }
    for name, mask in fails.items():
        assert report[f"fail_{name}"] == mask.sum() > 0
    assert report["removed_by_filters"] == (~passed).sum()
    assert sum(report["removed_sequential"].values()) == (~passed).sum()
    assert report["removed_sequential"]["min_genes"] == fails["min_genes"].sum()
    assert report["cells_in"] == adata.n_obs
    assert report["cells_out"] == passed.sum() == len(out)
    assert report["doublets_predicted"] == 0
    assert report["libraries_scrubbed"] == 0
    # Every injected low-quality cell is caught; no singlet is.
    kind = adata.obs["kind"].to_numpy()
    assert not passed[np.isin(kind, ["few_genes", "high_mito"])].any()
    assert passed[kind == "singlet"].all()
    per_library = pd.DataFrame(report["per_library"])
    assert per_library["cells_in"].sum() == adata.n_obs
    assert per_library["cells_out"].sum() == len(out)
    np.testing.assert_allclose(out["n_genes"], metrics.loc[out.index, "n_genes"])
    np.testing.assert_allclose(out["pct_counts_mt"], metrics.loc[out.index, "pct_counts_mt"])


def test_cell_table_keeps_every_cell_its_columns_rows_and_library_order(data: dict) -> None:
    adata, table = data["adata"], data["result"].cells
    # Every input cell, libraries sorted, input order within a library; no counts copied.
    assert list(table.index) == list(sorted_order(adata))
    rows = table[counts.MATRIX_ROW].to_numpy()
    np.testing.assert_array_equal(adata.obs_names[rows], table.index)
    for column in adata.obs.columns:
        assert table[column].dtype == adata.obs[column].dtype, column
        pd.testing.assert_series_equal(
            table[column], adata.obs.loc[table.index, column], check_names=False
        )
    assert list(table["kind"].cat.categories) == list(adata.obs["kind"].cat.categories)
    for column in (*qc.QC_COLUMNS, *qc.QC_FATE_COLUMNS):
        assert column in table.columns
    kept = table["kept"].to_numpy()
    assert not table.loc[kept, "predicted_doublet"].any()
    assert data["result"].report["cells_out"] == kept.sum()


def test_scrublet_flags_injected_doublets(data: dict) -> None:
    cells = data["result"].cells
    scored = cells[cells["doublet_score"].notna()]
    doublet = scored["kind"] == "doublet"
    assert (
        scored.loc[doublet, "doublet_score"].mean()
        > 2 * scored.loc[~doublet, "doublet_score"].mean()
    )
    called = scored["predicted_doublet"]
    recall = (called & doublet).sum() / doublet.sum()
    precision = (called & doublet).sum() / max(called.sum(), 1)
    assert recall > 0.5 and precision > 0.5, (recall, precision)
    report = data["result"].report
    assert report["doublets_predicted"] == called.sum()
    assert report["libraries_scrubbed"] == 3
    for row in report["per_library"]:
        # The cap: an automatic threshold never calls more than 2 x expected rate of a library.
        assert (
            row["doublets_predicted"]
            <= 2 * 0.045 * (row["cells_in"] - row["removed_by_filters"]) + 1
        )


def test_library_by_library_equals_each_library_alone(data: dict, tmp_path: Path) -> None:
    adata, table = data["adata"], data["result"].cells
    for library in ("L0", "L2"):
        alone = adata[adata.obs["batch"] == library].copy()
        single = run(alone, tmp_path / f"{library}.h5ad").cells
        part = table[table["batch"] == library]
        assert list(single.index) == list(part.index)
        np.testing.assert_array_equal(single["doublet_score"], part["doublet_score"])
        np.testing.assert_array_equal(single["kept"], part["kept"])


def test_cell_table_is_byte_deterministic_and_independent_of_workers(data: dict) -> None:
    root, result = data["root"], data["result"]
    table = counts.cell_table(data["adata"].obs, np.ones(data["adata"].n_obs, dtype=bool))
    # Two worker processes, one BLAS thread each, against one process with the default threads.
    again = qc.run_qc(
        table,
        data["path"],
        batch_key="batch",
        settings=SETTINGS,
        split="train",
        workers=2,
        losses=LENIENT_LOSSES,
    )
    write_reports(result, report=root / "a.json", plots=root / "a", cells=root / "a.parquet")
    write_reports(again, report=root / "b.json", plots=root / "b", cells=root / "b.parquet")
    assert (root / "a.parquet").read_bytes() == (root / "b.parquet").read_bytes()
    assert (root / "a.json").read_bytes() == (root / "b.json").read_bytes()
    assert again.report == result.report


def test_missing_batch_column_names_file_column_and_fix(data: dict) -> None:
    table = counts.cell_table(data["adata"].obs, np.ones(data["adata"].n_obs, dtype=bool))
    with pytest.raises(
        ValueError,
        match=r"train\.parquet: the cell table lacks the library column 'library'.*data\.columns\.batch",
    ):
        qc.run_qc(
            table,
            data["path"],
            batch_key="library",
            settings=SETTINGS,
            source=data["root"] / "train.parquet",
            losses=LENIENT_LOSSES,
        )


def test_non_raw_counts_are_refused(tmp_path: Path) -> None:
    adata = make_adata(libraries=("L0",), cells=30)
    adata.X = adata.X.log1p()
    with pytest.raises(ValueError, match=r"lognorm\.h5ad: X holds non-integer values"):
        run(adata, tmp_path / "lognorm.h5ad")


def test_all_cells_filtered_is_a_clear_error(data: dict, tmp_path: Path) -> None:
    strict = qc.QCSettings(min_genes=100_000, min_counts=300, max_pct_mito=10.0, scrublet=False)
    table = counts.cell_table(data["adata"].obs, np.ones(data["adata"].n_obs, dtype=bool))
    with pytest.raises(
        ValueError, match=r"split 'test' kept no cell of 450: min_genes=100000, min_counts=300"
    ):
        qc.run_qc(
            table,
            data["path"],
            batch_key="batch",
            settings=strict,
            split="test",
            losses=LENIENT_LOSSES,
        )


def test_small_libraries_skip_scrublet_and_missing_mito_is_reported(tmp_path: Path) -> None:
    adata = make_adata(libraries=("A", "B"), cells=60, n_mt=0, high_mito_rate=0.0)
    result = run(adata, tmp_path / "in.h5ad")
    report = result.report
    assert report["libraries_scrublet_skipped"] == 2 and report["libraries_scrubbed"] == 0
    assert report["cells_scrublet_skipped"] == report["cells_out"]
    assert report["mito_genes"] == 0 and "MT-" in report["mito_warning"]
    assert report["fail_max_pct_mito"] == 0
    out = kept_cells(result)
    assert out["doublet_score"].isna().all() and not out["predicted_doublet"].any()
    assert (out["pct_counts_mt"] == 0).all()
    write_reports(
        result, report=tmp_path / "r.json", plots=tmp_path / "plots", cells=tmp_path / "c.parquet"
    )
    written = json.loads((tmp_path / "r.json").read_text())
    assert [row["doublet_threshold"] for row in written["per_library"]] == [None, None]
    cells = counts.read_cells(tmp_path / "c.parquet")
    assert len(cells) == report["cells_in"] and cells["kept"].sum() == report["cells_out"]


def load_stage(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", STAGES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_script_end_to_end(data: dict, tmp_path: Path) -> None:
    split_dir = tmp_path / "data/interim/split"
    table = counts.cell_table(data["adata"].obs, np.ones(data["adata"].n_obs, dtype=bool))
    counts.write_cells(table, split_dir / "val.parquet")
    params = {
        "seed": 0,
        "paths": {
            "ensembl": str(data["path"]),
            "split": str(split_dir),
            "qc": str(tmp_path / "data/interim/qc"),
            "reports": str(tmp_path / "reports"),
        },
        "data": {"columns": {"batch": "batch"}},
        "compute": {"chunk_size": 50, "workers": 1, "scheduler": None},
        "qc": {
            "min_genes": 100,
            "min_counts": 300,
            "max_pct_mito": 10.0,
            "scrublet": {
                "enabled": True,
                "expected_doublet_rate": 0.045,
                "n_prin_comps": 20,
                "min_cells_per_library": 100,
            },
        },
    }
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    load_stage("qc").main(["--params", str(params_path), "--split", "val"])
    out = counts.read_cells(tmp_path / "data/interim/qc/val.parquet")
    pd.testing.assert_frame_equal(out, data["result"].cells)
    report = json.loads((tmp_path / "reports/qc/val.json").read_text())
    assert report["cells_out"] == data["result"].report["cells_out"]
    assert report["split"] == "val"
    for name in ("qc_distributions.png", "doublet_scores.png", "libraries.tsv"):
        assert (tmp_path / "reports/qc/val" / name).stat().st_size > 0
    libraries = pd.read_csv(tmp_path / "reports/qc/val/libraries.tsv", sep="\t")
    assert list(libraries["library"]) == ["L0", "L1", "L2"]
    assert not list((tmp_path / "data/interim/qc").glob("*.h5ad"))


def test_large_libraries_are_scored_in_bounded_parts(tmp_path: Path) -> None:
    adata = make_adata(libraries=("L0",), cells=450, seed=3)
    whole = run(adata, tmp_path / "whole.h5ad")
    capped = qc.QCSettings(
        min_genes=100, min_counts=300, max_pct_mito=10.0, seed=0, max_cells_per_run=200
    )
    parts = run(adata, tmp_path / "parts.h5ad", capped)
    (row,) = parts.report["per_library"]
    n_passed = row["cells_in"] - row["removed_by_filters"]
    assert row["scrublet_runs"] == -(-n_passed // 200) == 3
    assert parts.report["libraries_scrublet_split"] == 1
    assert whole.report["per_library"][0]["scrublet_runs"] == 1
    # Each part is its own Scrublet run; the injected doublets are still found.
    cells = parts.cells[parts.cells["doublet_score"].notna()]
    doublet = cells["kind"] == "doublet"
    recall = (cells["predicted_doublet"] & doublet).sum() / doublet.sum()
    assert recall > 0.5, recall
    # The parts are seeded by seed and library only, and cover every passing cell once.
    passing = np.flatnonzero(~whole.cells[[f"fail_{n}" for n in qc.FILTERS]].any(axis=1))
    split = scrublet_parts(passing, 200, seed=0, library="L0")
    assert sorted(np.concatenate(split).tolist()) == passing.tolist()
    assert all(len(p) <= 200 for p in split)
    again = scrublet_parts(passing, 200, seed=0, library="L0")
    assert all(np.array_equal(a, b) for a, b in zip(split, again, strict=True))
    # A cap at or above the library size changes nothing.
    roomy = qc.QCSettings(
        min_genes=100, min_counts=300, max_pct_mito=10.0, seed=0, max_cells_per_run=1000
    )
    same = run(adata, tmp_path / "same.h5ad", roomy)
    np.testing.assert_array_equal(same.cells["doublet_score"], whole.cells["doublet_score"])
    with pytest.raises(ValueError, match=r"qc\.scrublet\.max_cells_per_run=150"):
        qc.QCSettings(max_cells_per_run=150)


@pytest.mark.slow
def test_qc_on_a_local_dask_cluster_equals_one_process(tmp_path: Path) -> None:
    from distributed import LocalCluster

    adata = make_adata(libraries=("L2", "L0", "L1", "L3"), cells=120)
    local = run(adata, tmp_path / "m.h5ad", split="train")
    table = counts.cell_table(adata.obs, np.ones(adata.n_obs, dtype=bool))
    # distributed's nannies set OMP_NUM_THREADS=1 (and more) in *this* process's environment and
    # leave it there; later tests' subprocesses (torch stages) would inherit it: restore it.
    with (
        mock.patch.dict(os.environ),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
    ):
        remote = qc.run_qc(
            table,
            tmp_path / "m.h5ad",
            batch_key="batch",
            settings=SETTINGS,
            split="train",
            scheduler=cluster.scheduler_address,
            losses=LENIENT_LOSSES,
        )
    assert remote.report == local.report
    write_reports(
        local, report=tmp_path / "a.json", plots=tmp_path / "a", cells=tmp_path / "a.parquet"
    )
    write_reports(
        remote, report=tmp_path / "b.json", plots=tmp_path / "b", cells=tmp_path / "b.parquet"
    )
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
