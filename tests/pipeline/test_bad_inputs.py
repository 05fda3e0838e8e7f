"""A user's mistakes, one per case, each against the stage that first meets it.

Every case starts from a copy of the reproduced tiny pipeline, makes one mistake (a params value,
a raw file, a dictionary, a name that is not in the data), runs the stage script in this process as
``python src/stages/<stage>.py`` would, and checks that it refuses with exit status 2, one
``<stage>.py: error:`` line that names the file or key and the fix, and no traceback on screen.
The README's reliability section gives the tally.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import pandas as pd
import pytest
import yaml
from dvc_repo import copy_repo, deep_update, reproduced_template

from builders import load_stage
from rosmap_geneformer.errors import EXIT_BAD_INPUT, run_stage

ROOT = Path(__file__).resolve().parents[2]
STAGES = ROOT / "src" / "stages"
RAW = "data/raw/demo"


@dataclass(frozen=True)
class Mistake:
    """One mistake: the stage that meets it, what to change, and what the refusal must say."""

    name: str
    stage: str
    says: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    edit: Callable[[Path], None] | None = None  # edits the case's copy of data/raw/demo
    args: tuple[str, ...] = ()
    params_file: Callable[[Path], Path] | None = None  # writes a params file itself
    prepare: Callable[[Path, Path], dict[str, Any]] | None = None  # (project, case) -> params


# ------------------------------------------------------------------------------------------
# Edits of the raw files (the case's own copy of data/raw/demo)


def _table(raw: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(raw / name, sep="\t", dtype=str, keep_default_na=False)


def _write_table(frame: pd.DataFrame, raw: Path, name: str, sep: str = "\t") -> None:
    frame.to_csv(raw / name, sep=sep, index=False)


def _counts(raw: Path) -> ad.AnnData:
    return ad.read_h5ad(raw / "counts.h5ad")


def _truncate_counts(raw: Path) -> None:
    data = (raw / "counts.h5ad").read_bytes()
    (raw / "counts.h5ad").write_bytes(data[: len(data) // 3])


def _lfs_pointer(raw: Path) -> None:
    (raw / "counts.h5ad").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123456\n"
    )


def _no_cells(raw: Path) -> None:
    adata = _counts(raw)
    adata[:0].copy().write_h5ad(raw / "counts.h5ad")


def _mouse_case(raw: Path) -> None:
    adata = _counts(raw)
    adata.var_names = [name.capitalize() for name in adata.var_names]
    adata.write_h5ad(raw / "counts.h5ad")


def _genome_prefix(raw: Path) -> None:
    adata = _counts(raw)
    adata.var_names = [f"GRCh38_{name}" for name in adata.var_names]
    adata.write_h5ad(raw / "counts.h5ad")


def _fractional_counts(raw: Path) -> None:
    adata = _counts(raw)
    adata.X = adata.X * 0.5
    adata.write_h5ad(raw / "counts.h5ad")


def _duplicate_cell_names(raw: Path) -> None:
    adata = _counts(raw)
    names = adata.obs_names.to_numpy().copy()
    names[1] = names[0]
    adata.obs_names = names
    adata.write_h5ad(raw / "counts.h5ad")


def _batch_mapping_as_csv(raw: Path) -> None:
    _write_table(_table(raw, "batch_mapping.tsv"), raw, "batch_mapping.tsv", sep=",")


def _library_id_missing(raw: Path) -> None:
    table = _table(raw, "batch_mapping.tsv")
    table.loc[0, "dataset"] = ""
    _write_table(table, raw, "batch_mapping.tsv")


def _donor_missing(raw: Path) -> None:
    table = _table(raw, "individual_metadata.tsv")
    _write_table(table.iloc[1:], raw, "individual_metadata.tsv")


def _label_column_missing(raw: Path) -> None:
    table = _table(raw, "individual_metadata.tsv")
    _write_table(table.drop(columns="Pathologic_diagnosis_of_AD"), raw, "individual_metadata.tsv")


def _metadata_as_csv(raw: Path) -> None:
    _write_table(_table(raw, "individual_metadata.tsv"), raw, "individual_metadata.tsv", sep=",")


def _most_cells_unannotated(raw: Path) -> None:
    table = _table(raw, "cell_annotation.tsv")
    _write_table(table.iloc[: len(table) // 3], raw, "cell_annotation.tsv")


def _barcode_suffix_lost(raw: Path) -> None:
    table = _table(raw, "cell_annotation.tsv")
    table["cell"] = table["cell"].str.replace("-1", "", regex=False)
    _write_table(table, raw, "cell_annotation.tsv")


def _annotation_column_renamed(raw: Path) -> None:
    table = _table(raw, "cell_annotation.tsv")
    _write_table(table.rename(columns={"cell_type": "celltype"}), raw, "cell_annotation.tsv")


def _annotation_twice(raw: Path) -> None:
    table = _table(raw, "cell_annotation.tsv")
    _write_table(pd.concat([table, table.iloc[:3]]), raw, "cell_annotation.tsv")


def _empty_annotation(raw: Path) -> None:
    (raw / "cell_annotation.tsv").write_text("")


# ------------------------------------------------------------------------------------------
# Edits of the dictionaries (written next to the case, pointed at by paths.dictionaries)


def _dictionaries(
    change: Callable[[dict, dict], tuple[Any, Any]],
) -> Callable[[Path, Path], dict[str, Any]]:
    """A ``prepare`` hook: the project's dictionaries, changed, in the case's own folder."""

    def prepare(project: Path, case: Path) -> dict[str, Any]:
        source = project / "models" / "dictionaries"
        target = case / "dictionaries"
        target.mkdir()
        tokens = pickle.loads((source / "token_dictionary.pkl").read_bytes())
        medians = pickle.loads((source / "gene_median_dictionary.pkl").read_bytes())
        tokens, medians = change(tokens, medians)
        (target / "token_dictionary.pkl").write_bytes(pickle.dumps(tokens))
        (target / "gene_median_dictionary.pkl").write_bytes(pickle.dumps(medians))
        return {"paths": {"dictionaries": str(target)}}

    return prepare


MISTAKES: list[Mistake] = [
    # --- params.yaml ---------------------------------------------------------------------
    Mistake(
        "unknown key",
        "qc",
        ("unknown key 'qc.min_cells'", "did you mean qc.min_genes?"),
        params={"qc": {"min_cells": 3}},
        args=("--split", "train"),
    ),
    Mistake(
        "misspelt section",
        "sample",
        ("unknown key 'sampel'", "did you mean sample?"),
        params={"sampel": {"splits": ["train"]}},
    ),
    Mistake(
        "misspelt nested key",
        "split",
        ("unknown key 'split.fraction'", "did you mean split.fractions?"),
        params={"split": {"fraction": {"train": 0.6}}},
    ),
    Mistake(
        "boolean for a count",
        "qc",
        ("qc.scrublet.n_prin_comps = True", "expected an integer, got the boolean true"),
        params={"qc": {"scrublet": {"n_prin_comps": True}}},
        args=("--split", "train"),
    ),
    Mistake(
        "percentage for a fraction",
        "qc",
        ("qc.scrublet.expected_doublet_rate = '5%'", "write a fraction (0.05)"),
        params={"qc": {"scrublet": {"expected_doublet_rate": "5%"}}},
        args=("--split", "train"),
    ),
    Mistake(
        "text for a number",
        "qc",
        ("qc.max_pct_mito = 'ten'", "expected a number"),
        params={"qc": {"max_pct_mito": "ten"}},
        args=("--split", "train"),
    ),
    Mistake(
        "negative threshold",
        "qc",
        ("qc.min_genes = -1", "greater than or equal to 0"),
        params={"qc": {"min_genes": -1}},
        args=("--split", "train"),
    ),
    Mistake(
        "choice misspelt",
        "split",
        ("labels.ad_definition = 'clinicall'", "'pathologic' or 'clinical'"),
        params={"labels": {"ad_definition": "clinicall"}},
    ),
    Mistake(
        "loss limits reversed",
        "convert_genes",
        ("losses.unmapped_genes", "must not exceed stop"),
        params={"losses": {"unmapped_genes": {"warn": 0.5, "stop": 0.1}}},
    ),
    Mistake(
        "loss limit above 1",
        "convert_genes",
        ("losses.unmapped_counts.stop = 2", "less than or equal to 1"),
        params={"losses": {"unmapped_counts": {"warn": 0.01, "stop": 2}}},
    ),
    Mistake(
        "unknown task",
        "train",
        ("no task 'diseas' under tasks", "cell_type", "disease"),
        args=("--task", "diseas"),
    ),
    Mistake(
        "task without a label",
        "train",
        ("tasks.disease.label = None", "valid string"),
        params={"tasks": {"disease": {"label": None}}},
        args=("--task", "disease"),
    ),
    Mistake(
        "invalid YAML",
        "split",
        ("line", "not valid YAML"),
        params_file=lambda case: _text(case, "seed: 0\nsplit:\n  max_trials: 3\n max: 1\n"),
    ),
    Mistake(
        "params file missing",
        "split",
        ("parameter file not found",),
        params_file=lambda case: case / "nowhere.yaml",
    ),
    Mistake(
        "fractions that do not sum to one",
        "split",
        ("split.fractions",),
        params={"split": {"fractions": {"train": 0.6, "val": 0.2, "test": 0.1}}},
    ),
    Mistake(
        "a search space with an unknown hyperparameter",
        "tune",
        ("tune.space", "learning_rat"),
        params={"tune": {"space": {"learning_rat": {"low": 1e-4, "high": 1e-3}}}},
        args=("--task", "disease"),
    ),
    # --- raw files -----------------------------------------------------------------------
    Mistake(
        "counts file missing",
        "convert_genes",
        ("counts.h5ad", "not found"),
        edit=lambda raw: (raw / "counts.h5ad").unlink(),
    ),
    Mistake(
        "counts file truncated",
        "convert_genes",
        ("counts.h5ad", "truncated"),
        edit=_truncate_counts,
    ),
    Mistake(
        "counts file is a Git LFS pointer",
        "convert_genes",
        ("counts.h5ad", "Git LFS pointer", "git lfs pull"),
        edit=_lfs_pointer,
    ),
    Mistake(
        "counts file with no cell", "convert_genes", ("counts.h5ad", "0 cells"), edit=_no_cells
    ),
    Mistake(
        "mouse-case gene symbols",
        "convert_genes",
        ("counts.h5ad", "losses.unmapped_genes.stop", "mouse-case"),
        edit=_mouse_case,
    ),
    Mistake(
        "genome prefix on gene names",
        "convert_genes",
        ("counts.h5ad", "genome prefix", "strip it"),
        edit=_genome_prefix,
    ),
    Mistake(
        "normalised values instead of counts",
        "convert_genes",
        ("counts.h5ad", "raw"),
        edit=_fractional_counts,
    ),
    Mistake(
        "duplicate cell names",
        "convert_genes",
        ("counts.h5ad", "duplicate"),
        edit=_duplicate_cell_names,
    ),
    Mistake(
        "library column misnamed",
        "convert_genes",
        ("counts.h5ad", "'library'", "data.columns"),
        params={"data": {"columns": {"batch": "library"}}},
    ),
    Mistake(
        "batch mapping saved as CSV",
        "split",
        ("batch_mapping.tsv", "comma-separated"),
        edit=_batch_mapping_as_csv,
    ),
    Mistake(
        "donor metadata saved as CSV",
        "split",
        ("individual_metadata.tsv", "comma-separated"),
        edit=_metadata_as_csv,
    ),
    Mistake(
        "library id missing",
        "split",
        ("batch_mapping.tsv", "dataset", "empty"),
        edit=_library_id_missing,
    ),
    Mistake(
        "donor missing from the metadata",
        "split",
        ("individual_metadata.tsv", "no donor metadata"),
        edit=_donor_missing,
    ),
    Mistake(
        "AD label column missing",
        "split",
        ("Pathologic_diagnosis_of_AD", "data.columns.pathologic_ad"),
        edit=_label_column_missing,
    ),
    Mistake(
        "clinical labels without a cogdx column",
        "split",
        ("cogdx_score", "data.columns.cogdx"),
        params={
            "labels": {"ad_definition": "clinical"},
            "data": {"columns": {"cogdx": "cogdx_score"}},
        },
    ),
    Mistake(
        "two thirds of the cells unannotated",
        "annotate",
        ("losses.unannotated_cells.stop", "cells without a cell type"),
        edit=_most_cells_unannotated,
        args=("--split", "train"),
    ),
    Mistake(
        "barcode suffix lost in the annotation",
        "annotate",
        ("unannotated cell names look like", "-1"),
        edit=_barcode_suffix_lost,
        args=("--split", "train"),
    ),
    Mistake(
        "annotation column renamed",
        "annotate",
        ("cell_annotation.tsv", "cell_type", "data.columns"),
        edit=_annotation_column_renamed,
        args=("--split", "train"),
    ),
    Mistake(
        "cells annotated twice",
        "annotate",
        ("annotated more than once",),
        edit=_annotation_twice,
        args=("--split", "train"),
    ),
    Mistake(
        "empty annotation file",
        "annotate",
        ("cell_annotation.tsv", "empty"),
        edit=_empty_annotation,
        args=("--split", "train"),
    ),
    Mistake(
        "QC thresholds that keep nothing",
        "qc",
        ("kept no cell", "min_genes=100000"),
        params={"qc": {"min_genes": 100000}},
        args=("--split", "train"),
    ),
    # --- dictionaries ---------------------------------------------------------------------
    Mistake(
        "dictionaries swapped",
        "tokenize_split",
        ("swapped", "token_dictionary.pkl", "gene_median_dictionary.pkl"),
        prepare=_dictionaries(lambda tokens, medians: (medians, tokens)),
        args=("--split", "train"),
    ),
    Mistake(
        "a list pickled as the token dictionary",
        "tokenize_split",
        ("token_dictionary.pkl", "holds a list", "token dictionary is expected"),
        prepare=_dictionaries(lambda tokens, medians: (sorted(tokens), medians)),
        args=("--split", "train"),
    ),
    Mistake(
        "Geneformer dictionaries that are not there",
        "dictionaries",
        ("nowhere/token_dictionary_gc30M.pkl", "not found"),
        params={
            "dictionaries": {
                "source": "geneformer",
                "token_dictionary": "nowhere/token_dictionary_gc30M.pkl",
                "gene_median_dictionary": "nowhere/gene_median_dictionary_gc30M.pkl",
            }
        },
    ),
    Mistake(
        "an obs column to copy that does not exist",
        "tokenize_split",
        ("donor", "tokenize.columns"),
        params={"tokenize": {"columns": ["cell_id", "donor"]}},
        args=("--split", "train"),
    ),
    # --- names in params that are not in the data --------------------------------------
    Mistake(
        "a misspelt cell type of a task",
        "train",
        ("tasks.disease.cell_types", "'Micro'", "available: Ast, Exc", "Mic"),
        params={"tasks": {"disease": {"cell_types": ["Exc", "Micro"]}}},
        args=("--task", "disease"),
    ),
    Mistake(
        "a positive class that is not a class",
        "train",
        ("tasks.disease.positive_class", "'ad'", "available: AD, control"),
        params={"tasks": {"disease": {"positive_class": "ad"}}},
        args=("--task", "disease"),
    ),
    Mistake(
        "a label column that is not in the data",
        "train",
        ("tasks.disease.label", "'ad_stat'", "ad_status"),
        params={"tasks": {"disease": {"label": "ad_stat"}}},
        args=("--task", "disease"),
    ),
    Mistake(
        "no regulator in the data",
        "grn",
        ("grn.regulators", "'FOO1'", "available:"),
        params={"grn": {"regulators": ["FOO1", "BAR2"]}},
    ),
    Mistake(
        "a misspelt cell type for the network",
        "grn",
        ("grn.cell_types", "'Astro'", "available:"),
        params={"grn": {"cell_types": ["Astro"]}},
    ),
    Mistake(
        "the demo's truth network on real data",
        "grn",
        ("grn.truth", "the demo's planted network", "data.source is rosmap"),
        params={"data": {"source": "rosmap"}, "grn": {"regulators": ["SOX9"]}},
    ),
    Mistake(
        "a TF list file that is not there",
        "grn",
        ("grn.tf_list", "my_tfs.txt not found", "lambert2018"),
        params={"grn": {"tf_list": "my_tfs.txt"}},
    ),
    Mistake(
        "a misspelt method to compare",
        "grn",
        ("grn.compare", "grnbost2"),
        params={"grn": {"compare": ["attention", "grnbost2"]}},
    ),
    Mistake(
        "a network model folder that is not there",
        "grn",
        ("models/nowhere",),
        params={"grn": {"model": "models/nowhere"}},
    ),
    Mistake(
        "no threads for the model stages",
        "embed",
        ("compute.threads", "positive integer or 'auto'"),
        params={"compute": {"threads": 0}},
    ),
    Mistake(
        "a misspelt cell type to perturb",
        "perturb",
        ("perturb.cell_type", "'Micro'", "available:"),
        params={"perturb": {"cell_type": "Micro"}},
    ),
    Mistake(
        "a misspelt start state",
        "perturb",
        ("perturb.start_state", "'ADD'", "available: AD, control"),
        params={"perturb": {"start_state": "ADD"}},
    ),
    Mistake(
        "a state column that is not in the data",
        "perturb",
        ("perturb.state_key", "'status'", "tokenize.columns"),
        params={"perturb": {"state_key": "status"}},
    ),
    Mistake(
        "perturbing the model of an unknown task",
        "perturb",
        ("perturb.task", "'diseas'", "disease"),
        params={"perturb": {"task": "diseas"}},
    ),
    Mistake(
        "a balance column that is not in the metadata",
        "split",
        ("split.balance", "sex"),
        params={"split": {"balance": ["sex"]}},
    ),
    # --- models ---------------------------------------------------------------------------
    Mistake(
        "evaluating before training",
        "evaluate",
        ("nowhere/disease", "dvc repro train@disease"),
        params={"paths": {"finetuned": "nowhere"}},
        args=("--task", "disease"),
    ),
    Mistake(
        "donor-level methods before training",
        "donor",
        ("nowhere/disease", "dvc repro train@disease"),
        params={"paths": {"finetuned": "nowhere"}},
        args=("--task", "disease"),
    ),
    Mistake(
        "donor-level methods for a cell-level task",
        "donor",
        ("tasks.cell_type needs patient_level: true",),
        args=("--task", "cell_type"),
    ),
    Mistake(
        "more donor folds than donors of a class",
        "donor",
        ("donor.cv.n_splits=50", "lower donor.cv.n_splits"),
        params={"donor": {"cv": {"n_splits": 50}}},
        args=("--task", "disease"),
    ),
    Mistake(
        "a checkpoint base model without a checkpoint",
        "base_model",
        ("base_model.checkpoint",),
        params={"base_model": {"source": "checkpoint", "checkpoint": None}},
    ),
    Mistake(
        "a checkpoint folder that is not there",
        "base_model",
        ("models/Geneformer-V1-10M", "not a local folder", "dvc add"),
        params={"base_model": {"source": "checkpoint", "checkpoint": "models/Geneformer-V1-10M"}},
    ),
]


def _text(case: Path, text: str) -> Path:
    path = case / "params.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cases = tmp_path_factory.mktemp("bad_inputs")
    return copy_repo(reproduced_template(tmp_path_factory), cases / "repo")


def _case_params(project: Path, case: Path, mistake: Mistake) -> Path:
    if mistake.params_file is not None:
        return mistake.params_file(case)
    params = yaml.safe_load((project / "params.yaml").read_text())
    if mistake.edit is not None:
        raw = case / "raw" / "demo"
        shutil.copytree(project / RAW, raw, ignore=shutil.ignore_patterns("truth"))
        mistake.edit(raw)
        params["paths"]["raw"] = str(case / "raw")
    if mistake.prepare is not None:
        deep_update(params, mistake.prepare(project, case))
    deep_update(params, mistake.params)
    return _text(case, yaml.safe_dump(params))


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_a_mistake_is_refused_with_one_line_and_exit_2(
    mistake: Mistake,
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = _case_params(project, tmp_path, mistake)
    monkeypatch.chdir(project)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    stage = load_stage(STAGES / f"{mistake.stage}.py")
    with pytest.raises(SystemExit) as stopped:
        run_stage(stage.main, [*mistake.args, "--params", str(params)])
    err = capsys.readouterr().err
    refusals = [line for line in err.splitlines() if f"{mistake.stage}.py: error: " in line]
    assert stopped.value.code == EXIT_BAD_INPUT, err
    assert len(refusals) == 1, err
    assert "Traceback" not in err
    for fragment in mistake.says:
        assert fragment in refusals[0], refusals[0]


def test_the_tally_of_mistakes() -> None:
    """The README quotes this number; keep them in step."""
    assert len({m.name for m in MISTAKES}) == len(MISTAKES)
    readme = (ROOT / "README.md").read_text()
    assert f"{len(MISTAKES)} distinct mistakes" in readme
