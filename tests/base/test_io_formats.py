"""Formats recognised: ids stay strings, the wrong delimiter, broken h5ad files and pickles.

Every refusal is an :class:`InputError` (or :class:`MissingInputError`) whose one line names the
file and the fix; the files are real (AnnData written with anndata, cut short, real pickles).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from rosmap_geneformer import io
from rosmap_geneformer.analysis.grn.scoring import load_truth
from rosmap_geneformer.counts import H5adRows, read_cell_table, read_obs, read_var
from rosmap_geneformer.data import metadata
from rosmap_geneformer.data.gene_map import read_gene_map
from rosmap_geneformer.errors import InputError, MissingInputError
from rosmap_geneformer.geneformer.dictionaries import (
    build_dictionaries,
    describe_content,
    load_dictionaries,
    save_dictionaries,
)

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 12345\n"
)


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------------------
# Tables: ids as strings, empty ids, delimiter, LFS pointers, empty files
# --------------------------------------------------------------------------------------------
def test_donor_ids_with_leading_zeros_stay_strings(tmp_path: Path) -> None:
    donors_tsv = tmp_path / "individual_metadata.tsv"
    donors_tsv.write_text(
        "subject\tmsex\tage_death\tPathologic_diagnosis_of_AD\n"
        "00000001\t1\t85.5\tyes\n"
        "00000002\t0\t90\tno\n"
        "0123\t1\t77\tno\n"
    )
    mapping_tsv = tmp_path / "batch_mapping.tsv"
    mapping_tsv.write_text("dataset\tsubject\n007\t00000001\n008\t00000002\n009\t0123\n")

    donors = metadata.load_donors(donors_tsv, subject_col="subject")
    assert list(donors.index) == ["00000001", "00000002", "0123"]
    assert donors["age_death"].dtype.kind == "f"
    assert donors["msex"].dtype.kind == "i"

    mapping = metadata.load_batch_mapping(mapping_tsv, library_col="dataset", subject_col="subject")
    assert mapping.to_dict() == {"007": "00000001", "008": "00000002", "009": "0123"}
    obs = pd.DataFrame({"batch": ["007", "009"]}, index=["007_A-1", "009_B-1"])
    patients = metadata.attach_patients(
        obs, mapping, batch_col="batch", source="c.h5ad", mapping_source=mapping_tsv
    )
    assert list(patients) == ["00000001", "0123"]
    metadata.check_donors_known(patients.unique(), donors, source=donors_tsv)


def test_csv_given_where_a_tsv_is_expected_is_named(tmp_path: Path) -> None:
    path = tmp_path / "individual_metadata.tsv"
    path.write_text("subject,msex,age_death\n00000001,1,85\n")
    with pytest.raises(InputError) as error:
        metadata.load_donors(path, subject_col="subject")
    text = _one_line(error)
    assert text.startswith(f"{path}: looks comma-separated (CSV)")
    assert "tab-separated (TSV)" in text
    assert "donor metadata" in text
    assert "name it .csv" in text
    assert "lacks column" not in text

    # The same content named .csv is read as CSV, ids as strings.
    as_csv = tmp_path / "individual_metadata.csv"
    as_csv.write_text(path.read_text())
    assert list(metadata.load_donors(as_csv, subject_col="subject").index) == ["00000001"]


def test_tsv_given_where_a_csv_is_expected_is_named(tmp_path: Path) -> None:
    path = tmp_path / "truth.csv"
    path.write_text("tf\ttarget\nA\tB\n")
    with pytest.raises(InputError, match=r"truth\.csv: looks tab-separated \(TSV\)") as error:
        load_truth(path)
    assert "name it .tsv" in _one_line(error)


def test_csv_gene_map_and_compressed_csv_are_named(tmp_path: Path) -> None:
    gene_map = tmp_path / "gene_map.tsv"
    gene_map.write_text("symbol,ensembl_id,match_kind,release\nA,ENSG1,symbol,93\n")
    with pytest.raises(
        InputError, match=r"gene_map\.tsv: looks comma-separated.*gene map"
    ) as error:
        read_gene_map(gene_map)
    assert "name it .csv" not in _one_line(error)  # the gene map is always read as TSV

    packed = tmp_path / "batch_mapping.tsv.gz"
    pd.DataFrame({"dataset": ["L1"], "subject": ["D1"]}).to_csv(packed, index=False)
    with pytest.raises(InputError, match=r"batch_mapping\.tsv\.gz: looks comma-separated"):
        metadata.load_batch_mapping(packed, library_col="dataset", subject_col="subject")


def test_empty_ids_are_counted_not_reported_as_missing_libraries(tmp_path: Path) -> None:
    mapping_tsv = tmp_path / "batch_mapping.tsv"
    mapping_tsv.write_text("dataset\tsubject\nL1\tD1\n\tD2\nL3\t\n L4 \t D4\n")
    with pytest.raises(InputError) as error:
        metadata.load_batch_mapping(mapping_tsv, library_col="dataset", subject_col="subject")
    text = _one_line(error)
    assert text.startswith(f"{mapping_tsv}: column 'dataset' of the batch mapping is empty")
    assert "1 of 4 row(s) (file lines [3])" in text
    assert "fill them in or delete those rows" in text

    donors_tsv = tmp_path / "individual_metadata.tsv"
    donors_tsv.write_text("subject\tmsex\nD1\t1\nNA\t0\n\t1\n")
    with pytest.raises(InputError, match=r"individual_metadata\.tsv: column 'subject'.*2 of 3"):
        metadata.load_donors(donors_tsv, subject_col="subject")

    mapping = pd.Series({"L1": "D1"})
    obs = pd.DataFrame(
        {"batch": pd.Categorical(["L1", None, None])}, index=["L1_A-1", "x_B-1", "x_C-1"]
    )
    with pytest.raises(InputError) as error:
        metadata.attach_patients(
            obs, mapping, batch_col="batch", source="counts.h5ad", mapping_source=mapping_tsv
        )
    text = _one_line(error)
    assert text.startswith("counts.h5ad: obs['batch'] (the library id) is empty for 2 of 3")
    assert "batch_mapping" not in text  # not reported as a library missing from the mapping


def test_lfs_pointer_and_empty_tables_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "individual_metadata.tsv"
    path.write_text(LFS_POINTER)
    with pytest.raises(InputError) as error:
        metadata.load_donors(path, subject_col="subject")
    assert _one_line(error) == (
        f"{path} is a Git LFS pointer, not the donor metadata; run `git lfs pull` "
        "(or `dvc pull`) to fetch the data."
    )

    path.write_text("")
    with pytest.raises(
        InputError, match=r"individual_metadata\.tsv: the donor metadata file is empty \(0 bytes\)"
    ):
        metadata.load_donors(path, subject_col="subject")
    path.write_text("\n\n")
    with pytest.raises(
        InputError, match=r"individual_metadata\.tsv: the donor metadata file has no header"
    ):
        metadata.load_donors(path, subject_col="subject")
    with pytest.raises(MissingInputError, match=r"nope\.tsv: donor metadata file not found"):
        metadata.load_donors(tmp_path / "nope.tsv", subject_col="subject")


def test_ragged_and_binary_tables_are_named(tmp_path: Path) -> None:
    path = tmp_path / "batch_mapping.tsv"
    path.write_text("dataset\tsubject\nL1\tD1\nL2\tD2\textra\n")
    with pytest.raises(
        InputError,
        match=r"batch_mapping\.tsv: cannot read the batch mapping as tab-separated.*line 3",
    ):
        metadata.load_batch_mapping(path, library_col="dataset", subject_col="subject")
    path.write_bytes(b"dataset\tsubject\n\xff\xfe\x00\x01\tD1\n")
    with pytest.raises(
        InputError, match=r"batch_mapping\.tsv: the batch mapping is not UTF-8 text"
    ):
        metadata.load_batch_mapping(path, library_col="dataset", subject_col="subject")


def test_tables_that_are_fine_still_read(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    path.write_text("a\tb\n1,5\tx\n")  # a comma inside a field of a real TSV is fine
    frame = io.read_table(path, required=["a", "b"], what="thing", ids=["b"])
    assert frame["a"].tolist() == ["1,5"]
    single = tmp_path / "single.tsv"
    single.write_text("gene\nA\nB\n")
    assert io.read_table(single, required=["gene"], what="list")["gene"].tolist() == ["A", "B"]


# --------------------------------------------------------------------------------------------
# h5ad: truncated, not HDF5, LFS pointer, no cells or genes
# --------------------------------------------------------------------------------------------
def _write_counts(path: Path, n_obs: int = 30, n_vars: int = 12) -> Path:
    rng = np.random.default_rng(0)
    x = sparse.csr_matrix(rng.poisson(1.0, size=(n_obs, n_vars)).astype(np.float32))
    adata = ad.AnnData(
        X=x,
        obs=pd.DataFrame({"batch": ["L1"] * n_obs}, index=[f"L1_{i}-1" for i in range(n_obs)]),
        var=pd.DataFrame(index=[f"G{j}" for j in range(n_vars)]),
    )
    adata.write_h5ad(path)
    return path


def test_truncated_h5ad_is_refused_by_name_in_every_reader(tmp_path: Path) -> None:
    whole = _write_counts(tmp_path / "whole.h5ad")
    cut = tmp_path / "counts.h5ad"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    for read in (H5adRows, read_cell_table, read_obs, read_var, io.read_h5ad, io.check_h5ad_file):
        with pytest.raises(InputError) as error:
            read(cut)
        text = _one_line(error)
        assert text.startswith(f"{cut}: not a readable .h5ad (truncated or not HDF5: ")
        assert "truncated file" in text
        assert text.endswith("re-create it or `dvc pull`.")


def test_non_hdf5_lfs_and_empty_h5ad_files_are_refused(tmp_path: Path) -> None:
    text_file = tmp_path / "counts.h5ad"
    text_file.write_text("barcode,gene,count\n")
    with pytest.raises(
        InputError,
        match=r"counts\.h5ad: not a readable \.h5ad \(not HDF5, it starts with b'barcode",
    ):
        H5adRows(text_file)
    text_file.write_text(LFS_POINTER)
    with pytest.raises(
        InputError,
        match=r"counts\.h5ad is a Git LFS pointer, not the input h5ad; run `git lfs pull`",
    ):
        H5adRows(text_file)
    text_file.write_bytes(b"")
    with pytest.raises(InputError, match=r"counts\.h5ad: the h5ad file is empty \(0 bytes\)"):
        read_obs(text_file)
    with pytest.raises(MissingInputError, match=r"nope\.h5ad: input h5ad file not found"):
        H5adRows(tmp_path / "nope.h5ad")


def test_hdf5_without_anndata_groups_is_refused(tmp_path: Path) -> None:
    import h5py

    path = tmp_path / "other.h5ad"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("matrix", data=np.zeros((2, 2)))
    with pytest.raises(
        InputError, match=r"other\.h5ad: an HDF5 file without obs and var, so not an AnnData"
    ):
        read_cell_table(path)


@pytest.mark.parametrize(("n_obs", "n_vars", "empty"), [(0, 12, "cells"), (30, 0, "genes")])
def test_matrix_without_cells_or_genes_is_refused_when_first_read(
    tmp_path: Path, n_obs: int, n_vars: int, empty: str
) -> None:
    path = _write_counts(tmp_path / "counts.h5ad", n_obs=n_obs, n_vars=n_vars)
    with pytest.raises(InputError) as error:
        H5adRows(path)
    assert _one_line(error) == (
        f"{path}: the count matrix has no {empty} ({n_obs} cells x {n_vars} genes); re-export "
        "the counts with cells in rows and genes in columns, or `dvc pull`."
    )


def test_convert_genes_refuses_an_empty_or_truncated_counts_file(tmp_path: Path) -> None:
    from rosmap_geneformer.data.convert_genes import convert_genes_file

    gene_map = pd.DataFrame(
        {
            "symbol": ["G0"],
            "ensembl_id": ["ENSG00000000003"],
            "match_kind": ["symbol"],
            "release": ["93"],
        }
    )
    empty = _write_counts(tmp_path / "empty.h5ad", n_obs=0)
    with pytest.raises(
        InputError, match=r"empty\.h5ad: the count matrix has no cells \(0 cells x 12 genes\)"
    ):
        convert_genes_file(empty, tmp_path / "out.h5ad", gene_map)
    whole = _write_counts(tmp_path / "whole.h5ad")
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"cut\.h5ad: not a readable \.h5ad \(truncated"):
        convert_genes_file(cut, tmp_path / "out.h5ad", gene_map)
    assert not (tmp_path / "out.h5ad").exists()


# --------------------------------------------------------------------------------------------
# Dictionary pickles: swapped, wrong kind, not a pickle, LFS pointer
# --------------------------------------------------------------------------------------------
@pytest.fixture
def dictionary_files(tmp_path: Path) -> dict[str, Path]:
    medians = {f"ENSG{i:011d}": 0.5 + i for i in range(5)}
    return save_dictionaries(build_dictionaries(medians), tmp_path / "dicts")


def test_swapped_dictionary_files_are_named(dictionary_files: dict[str, Path]) -> None:
    tokens, medians = (
        dictionary_files["token_dictionary"],
        dictionary_files["gene_median_dictionary"],
    )
    with pytest.raises(InputError) as error:
        load_dictionaries(medians, tokens)
    assert _one_line(error) == (
        f"{medians} holds a dict of 5 str -> float, like a gene median dictionary, and {tokens} "
        "holds a dict of 7 str -> int, like a token dictionary: the token and gene median "
        "dictionaries are swapped; exchange the two paths (params.yaml: "
        "dictionaries.token_dictionary / dictionaries.gene_median_dictionary, or the CLI flags)."
    )
    # The same file twice: the one in the wrong place is named, with what was expected there.
    with pytest.raises(InputError) as error:
        load_dictionaries(tokens, tokens)
    text = _one_line(error)
    assert text.startswith(f"{tokens} holds a dict of 7 str -> int, like a token dictionary, but")
    assert "the gene median dictionary is expected there (a dict of Ensembl id (str) -> " in text
    with pytest.raises(InputError, match="the token dictionary is expected there"):
        load_dictionaries(medians, medians)


@pytest.mark.parametrize(
    ("content", "described"),
    [
        (["ENSG1", "ENSG2"], "a list of 2 str"),
        (
            pd.DataFrame({"gene": ["A"], "median": [1.0]}),
            "a pandas DataFrame of 1 rows x 2 columns ['gene', 'median']",
        ),
        (
            {"TP53": "ENSG00000141510"},
            "a dict of 1 str -> str, like a gene name -> Ensembl id dictionary",
        ),
        ({}, "an empty dict"),
        (np.arange(3), "a numpy array of shape (3,) (int64)"),
    ],
)
def test_wrong_kind_of_pickle_says_what_it_holds(
    tmp_path: Path, dictionary_files: dict[str, Path], content: object, described: str
) -> None:
    assert describe_content(content) == described
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps(content))
    with pytest.raises(InputError) as error:
        load_dictionaries(wrong, dictionary_files["gene_median_dictionary"])
    assert _one_line(error).startswith(
        f"{wrong} holds {described}, but the token dictionary is expected there (a dict of "
        "Ensembl id / special token (str) -> token id (int)); give the right pickle"
    )


def test_broken_dictionary_files_are_named(
    tmp_path: Path, dictionary_files: dict[str, Path]
) -> None:
    tokens = dictionary_files["token_dictionary"]
    lfs = tmp_path / "gene_median_dictionary.pkl"
    lfs.write_text(LFS_POINTER)
    with pytest.raises(InputError) as error:
        load_dictionaries(tokens, lfs)
    assert _one_line(error) == (
        f"{lfs} is a Git LFS pointer, not the gene median dictionary; run `git lfs pull` "
        "(or `dvc pull`) to fetch the data."
    )
    garbage = tmp_path / "garbage.pkl"
    garbage.write_text("ENSG1\t0.5\n")
    with pytest.raises(InputError) as error:
        load_dictionaries(tokens, garbage)
    text = _one_line(error)
    assert text.startswith(
        f"{garbage}: cannot unpickle the gene median dictionary (UnpicklingError"
    )
    assert text.endswith(
        "expected a pickle of a dict of Ensembl id (str) -> non-zero median (float): re-create "
        "it or `dvc pull`."
    )
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(tokens.read_bytes()[:-10])
    with pytest.raises(InputError, match=r"cut\.pkl: cannot unpickle the token dictionary"):
        load_dictionaries(cut, dictionary_files["gene_median_dictionary"])
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.pkl: the token dictionary file is empty"):
        load_dictionaries(empty, dictionary_files["gene_median_dictionary"])


def test_real_geneformer_dictionaries_are_described() -> None:
    import os

    folder = os.environ.get("GENEFORMER_DICTIONARY_DIR")
    if not folder:
        pytest.skip("set GENEFORMER_DICTIONARY_DIR to run with gc30M")
    tokens = Path(folder) / "token_dictionary_gc30M.pkl"
    medians = Path(folder) / "gene_median_dictionary_gc30M.pkl"
    with pytest.raises(InputError) as error:
        load_dictionaries(medians, tokens)
    text = _one_line(error)
    assert "holds a dict of 25,424 str -> float, like a gene median dictionary" in text
    assert "holds a dict of 25,426 str -> int, like a token dictionary" in text
    names = Path(folder) / "gene_name_id_dict_gc30M.pkl"
    with pytest.raises(
        InputError, match="like a gene name -> Ensembl id dictionary, but the gene median"
    ):
        load_dictionaries(tokens, names)
