"""`dvc repro` end to end on tiny demo data: outputs, no-op reruns and exact invalidation."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from dvc_repo import copy_repo, dvc, reproduced_template, stages_run, template_repro_output

from rosmap_geneformer import counts
from rosmap_geneformer.analysis import truth
from rosmap_geneformer.data.gene_map import read_gene_map

pytestmark = pytest.mark.pipeline

DATA_STAGES = {"demo_data", "gene_map", "convert_genes", "split"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ran = stages_run(template_repro_output(tmp_path_factory))
    listed = {
        line.split()[0]
        for line in dvc(
            "stage", "list", cwd=reproduced_template(tmp_path_factory)
        ).stdout.splitlines()
    }
    assert ran == listed, f"stages not run by the first `dvc repro`: {listed - ran}"
    return copy_repo(
        reproduced_template(tmp_path_factory), tmp_path_factory.mktemp("pipeline") / "repo"
    )


def test_outputs_follow_the_data_contract(repo: Path) -> None:
    matrix = ad.read_h5ad(repo / "data/interim/ensembl.h5ad", backed="r")
    assert "ensembl_id" in matrix.var.columns
    assert matrix.var_names.str.startswith("ENSG").all()
    splits = {}
    for split in ("train", "val", "test"):
        table = counts.read_cells(repo / "data/processed/sampled" / f"{split}.parquet")
        assert {"patient_id", "cell_type", "ad_status", "n_counts"} <= set(table.columns)
        # The sampled cells' counts are their rows of the one matrix, still raw counts.
        rows = counts.cell_rows(table, repo / "data/interim/ensembl.h5ad")
        x = rows.read(0, rows.n_obs)
        rows.close()
        assert list(matrix.obs_names[table[counts.MATRIX_ROW]]) == list(table.index)
        assert np.array_equal(x.data, np.round(x.data)), f"{split}: X must stay raw counts"
        assert set(table["ad_status"]) == {"AD", "control"}, f"{split} lacks an AD class"
        assert (table["n_counts"].to_numpy() >= np.asarray(x.sum(axis=1)).ravel()).all()
        ids = (repo / "data/processed/sampled" / f"{split}_cell_ids.txt").read_text().split()
        assert ids == table.index.tolist()
        splits[split] = table
    matrix.file.close()
    # No stage after convert_genes writes another copy of the counts.
    copies = sorted(p.relative_to(repo).as_posix() for p in (repo / "data").rglob("*.h5ad"))
    assert copies == [
        "data/interim/ensembl.h5ad",
        "data/processed/embeddings/test.h5ad",
        "data/raw/demo/counts.h5ad",
    ]
    patients = [set(t["patient_id"]) for t in splits.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])

    split_report = json.loads((repo / "reports/split.json").read_text())
    for split, table in splits.items():
        assert set(table["patient_id"]) <= set(split_report[split]["patients"])


def test_qc_and_gene_mapping_recover_the_planted_truth(repo: Path) -> None:
    tables = truth.read_truth(repo / "data/raw/demo/truth")
    cells = pd.concat(
        counts.read_cells(repo / "data/interim/qc" / f"{s}.parquet")
        for s in ("train", "val", "test")
    )
    qc = truth.qc_against_truth(cells, tables["cells"])
    assert qc["low_quality_removed_fraction"] >= 0.9
    doublet_share = qc["doublets_injected"] / len(cells)
    assert qc["scrublet_precision"] > 3 * doublet_share, "doublet calls no better than chance"
    mapping = truth.mapping_against_truth(
        tables["genes"], read_gene_map(repo / "data/reference/gene_map.tsv")
    )
    assert mapping["mappable_recovered_fraction"] >= 0.99
    assert mapping["unmappable_wrongly_mapped"] == 0
    report = json.loads((repo / "reports/qc/train.json").read_text())
    assert report["cells_in"] > report["cells_out"] > 0


def test_donor_methods_share_folds_and_never_fit_a_test_donor(repo: Path) -> None:
    folder = repo / "reports/donor/disease"
    summary = json.loads((folder / "summary.json").read_text())
    split = json.loads((repo / "reports/split.json").read_text())
    test_donors = set(split["test"]["patients"])
    cv_donors = set(split["train"]["patients"]) | set(split["val"]["patients"])
    methods = summary["methods"]
    assert set(methods) == {
        "finetuned_mean_p",
        "finetuned_fraction_called",
        "cell_classifier",
        "proportions",
        "pseudobulk",
        "pseudobulk_cell_type",
        "mil_base",
        "mil_finetuned",
    }
    oof = pd.read_csv(folder / "oof.tsv", sep="\t", dtype={"patient_id": str})
    # Every cross-validated method scored the same donors in the same (repeat, fold) cells, each
    # CV donor once per repeat, and never a test donor.
    cells = {
        name: set(map(tuple, part[["repeat", "fold", "patient_id"]].to_numpy().tolist()))
        for name, part in oof.groupby("method")
    }
    assert len(set(map(frozenset, cells.values()))) == 1
    assert set(oof["patient_id"]) == cv_donors
    assert not set(oof["patient_id"]) & test_donors
    assert (oof.groupby(["method", "repeat"])["patient_id"].value_counts() == 1).all()
    donors = pd.read_csv(folder / "donors.tsv", sep="\t", dtype={"patient_id": str})
    assert set(donors.loc[donors["set"] == "test", "patient_id"]) == test_donors
    # The fine-tuned model trained on the train donors: it scores val (its threshold) and test.
    finetuned = donors[donors["method"] == "finetuned_mean_p"]
    assert set(finetuned["set"]) == {"val", "test"}
    assert methods["finetuned_mean_p"]["cross_validated"] is False
    for name, entry in methods.items():
        assert 0.0 <= entry["test_auroc"] <= 1.0, name
        assert entry["test_auroc_ci_low"] <= entry["test_auroc"] <= entry["test_auroc_ci_high"]
        if entry["cross_validated"]:
            assert 0.0 <= entry["cv_auroc"] <= 1.0, name
        if name != "pseudobulk":
            assert "test_vs_pseudobulk_p_value" in entry
    attention = pd.read_csv(folder / "attention.tsv", sep="\t")
    assert set(attention["method"]) == {"mil_base", "mil_finetuned"}
    cells_attention = pd.read_csv(folder / "attention_cells.tsv", sep="\t")
    per_donor = cells_attention.groupby(["method", "patient_id"])["attention"].sum()
    assert np.allclose(per_donor, 1.0)
    for name in ("roc.png", "donor_scores.png", "attention.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (repo / "reports/index.html").read_text()
    assert "<code>reports/donor/disease/summary.json</code>" in page
    assert 'class="missing"' not in page.split('id="donor"')[1].split("</section>")[0]


def test_dvc_shows_the_headline_metrics_and_keeps_data_counts_as_plain_json(repo: Path) -> None:
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo).stdout)
    files = set(next(iter(shown.values()))["data"])
    for task in ("cell_type", "disease"):
        assert f"reports/eval/{task}/metrics.json" in files
        assert f"reports/baseline/{task}/metrics.json" in files
    assert {
        "reports/grn/metrics.json",
        "reports/embed/metrics.json",
        "reports/donor/disease/metrics.json",
    } <= files
    # The data stages' counts are reports, not metrics: present, but not in `dvc exp show`.
    for report in ("reports/genes/mapping.json", "reports/split.json", "reports/qc/train.json"):
        assert (repo / report).is_file()
        assert report not in files


def test_report_names_the_metric_files_it_read(repo: Path) -> None:
    page = (repo / "reports/index.html").read_text()
    for task in ("cell_type", "disease"):
        assert f"<code>reports/eval/{task}/metrics.json</code>" in page
    assert "<code>reports/genes/mapping.json</code>" in page
    assert 'class="missing"' not in page.split('id="metrics"')[1].split("</section>")[0]


def test_second_repro_is_a_no_op(repo: Path) -> None:
    proc = dvc("repro", cwd=repo)
    assert stages_run(proc.stdout) == set()
    assert "changed" not in dvc("status", cwd=repo).stdout


def test_qc_param_change_reruns_qc_and_downstream_only(repo: Path) -> None:
    params_path = repo / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["qc"]["min_genes"] += 25
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    # Up to the sampled cells: what follows them is plain DVC invalidation, and a full rerun of
    # the model stages would only cost minutes (test_reproducibility reruns everything).
    ran = stages_run(dvc("repro", "sample", cwd=repo).stdout)
    assert {"qc@train", "qc@val", "qc@test"} <= ran
    assert not (ran & DATA_STAGES), f"stages before qc reran: {ran & DATA_STAGES}"
    assert stages_run(dvc("repro", "sample", cwd=repo).stdout) == set()


def test_tune_perturb_and_grn_write_their_contracts(repo: Path) -> None:
    from rosmap_geneformer.training.tuning.outputs import load_best_params
    from rosmap_geneformer.training.tuning.space import SEARCHABLE

    params = yaml.safe_load((repo / "params.yaml").read_text())
    best = load_best_params(repo / "reports/tune/best_params.yaml")
    assert set(best["train"]) == set(SEARCHABLE)
    trials = pd.read_csv(repo / "reports/tune/trials.tsv", sep="\t")
    assert trials["number"].tolist() == list(range(params["tune"]["n_trials"]))
    assert trials.loc[0, "enqueued"] == 0, "the shipped defaults are trial 0"

    summary = json.loads((repo / "reports/perturb/summary.json").read_text())
    for kind in params["perturb"]["types"]:
        table = pd.read_csv(repo / "reports/perturb" / f"{kind}.tsv", sep="\t")
        assert {"gene", "symbol", "mean_shift", "p", "fdr", "n_cells"} <= set(table.columns)
        assert table["gene"].str.startswith("ENSG").all() and table["gene"].is_unique
        assert len(table) == summary["runs"][kind]["genes_tested"] > 0
        # Every gene is in >= min_cells perturbed cells; overexpression skips the cells where the
        # gene is already first, and counts them.
        shortfall = (params["perturb"]["min_cells"] - table["n_cells"]).clip(lower=0).sum()
        assert shortfall <= summary["runs"][kind]["skipped_already_first"]
        assert table["net_mean_shift"].is_monotonic_decreasing, "ranked by the net shift"
        assert table["fdr"].between(0, 1).all() and (table["fdr"] >= table["p"] - 1e-12).all()

    edges = pd.read_csv(repo / "data/processed/grn/edges.tsv", sep="\t")
    assert {"regulator_symbol", "target_symbol", "weight", "coexpression", "random"} <= set(edges)
    assert set(edges["regulator_symbol"]) <= set(params["grn"]["regulators"])
    assert (edges["regulator_id"] != edges["target_id"]).all()
    assert (repo / "data/processed/grn/network.graphml").read_text().startswith("<?xml")
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo).stdout)
    metrics = next(iter(shown.values()))["data"]
    network = metrics["reports/grn/metrics.json"]["data"]
    for method in ("deletion", "attention_mean", "attention_layer", "grnboost2", "random"):
        assert 0 <= network["all"][method]["auprc"] <= 1
        assert network["all"][method]["epr_low"] <= network["all"][method]["epr_high"]
    methods = pd.read_csv(repo / "reports/grn/methods.tsv", sep="\t").set_index("method")
    assert (methods["epr_low"] <= methods["epr_high"]).all()
    assert metrics["reports/tune/metrics.json"]["data"]["trials"]["total"] == 2
