"""Tests of rosmap_geneformer.geneformer.tokenizer (with the encoding, cells and dataset_writer
modules it drives) and rosmap_geneformer.geneformer.dictionaries.

The fast tokenizer is compared token for token with two independent oracles in
``tests/geneformer/tokenizer_reference.py`` on data built to have many exact ties (few distinct
medians and counts) and many near-ties whose order depends on the floating-point path. Exact ties
come in ascending token id (``ties="token"``); against Geneformer's own order (numpy's default
argsort, ``ties="numpy"``) the output is the same up to the order within groups of equal values
(``compare_up_to_ties``). ``test_tie_order.py`` checks the tie rule across CPUs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from tokenizer_reference import (
    compare_up_to_ties,
    reference_tokenize,
    scipy_expression_tokenize,
)

from builders import LENIENT_LOSSES
from rosmap_geneformer.geneformer.dictionaries import (
    GeneDictionaries,
    build_dictionaries,
    compute_nonzero_medians,
    load_dictionaries,
    save_dictionaries,
    validate_dictionaries,
)
from rosmap_geneformer.geneformer.tokenizer import tokenize_anndata, tokenize_h5ad

COLUMNS = ["cell_id", "patient_id", "cell_type", "ad_status"]
DICT_ENV = "GENEFORMER_DICTIONARY_DIR"


# --------------------------------------------------------------------------------------------
# Fixtures: tie-heavy synthetic data and dictionaries
# --------------------------------------------------------------------------------------------
def _gene_ids(n: int) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(1, n + 1)]


def _dictionaries(genes: list[str], *, layout: str, seed: int = 0) -> GeneDictionaries:
    """Few distinct medians so that equal counts give exact ties and other pairs near-ties."""
    rng = np.random.default_rng(seed)
    medians = {g: float(rng.choice([0.5, 1.0, 1.5, 2.0, 3.0])) for g in genes}
    if layout == "V2":
        return build_dictionaries(medians, special_tokens=True)
    tokens: dict = {"<pad>": 0, "<mask>": 1}
    tokens.update({g: np.int16(i + 2) for i, g in enumerate(sorted(genes))})
    median_dict = {g: np.float64(medians[g]) for g in sorted(genes)}
    return GeneDictionaries(tokens, median_dict, validate_dictionaries(tokens, median_dict))


def _adata(
    *,
    n_cells: int = 160,
    vocabulary: list[str],
    seed: int = 0,
    filter_pass: bool = False,
    dense: bool = False,
) -> ad.AnnData:
    """Raw counts with tie-heavy values, a few cells of every size, and awkward gene ids."""
    rng = np.random.default_rng(seed)
    n_genes = 320
    genes = list(vocabulary[: n_genes - 20])
    genes[5] = genes[5].lower()  # matched after upper-casing, as Geneformer does
    genes[7] = genes[6]  # a duplicated id: both copies get the same token
    genes += [f"ENSG9{i:010d}" for i in range(20)]  # not in the vocabulary
    x = np.zeros((n_cells, n_genes), dtype=np.float32)
    for i in range(n_cells):
        k = [0, 3, 12, 15, 17, 40, 150, 260][i % 8]  # empty, insertion-sort sizes, large
        cols = rng.choice(n_genes, size=k, replace=False)
        x[i, cols] = rng.choice([1, 1, 1, 2, 2, 3, 4, 6], size=k)
    x[1] = 0
    x[1, -3:] = 5  # only genes outside the vocabulary: dropped as empty
    n_counts = (x.sum(axis=1) + rng.integers(1, 400, n_cells)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "n_counts": n_counts,
            "patient_id": [f"D{i % 5}" for i in range(n_cells)],
            "cell_type": pd.Categorical(rng.choice(["Exc", "Inh", "Oli"], n_cells)),
            "ad_status": pd.Categorical(rng.choice(["AD", "control"], n_cells)),
        },
        index=[f"L1_{i:05d}-1" for i in range(n_cells)],
    )
    if filter_pass:
        obs["filter_pass"] = rng.choice([1, 1, 1, 0], n_cells)
        obs.loc[obs.index[2], "n_counts"] = 0  # allowed: the cell is filtered out
        obs.loc[obs.index[2], "filter_pass"] = 0
    var = pd.DataFrame({"ensembl_id": genes}, index=[f"g{i}" for i in range(n_genes)])
    matrix = x if dense else sparse.csr_matrix(x)
    return ad.AnnData(X=matrix, obs=obs, var=var)


@pytest.fixture(scope="module")
def vocabulary() -> list[str]:
    return _gene_ids(400)


def _load(path: Path) -> datasets.Dataset:
    return datasets.load_from_disk(str(path))


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# --------------------------------------------------------------------------------------------
# Token-exactness
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["V1", "V2"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("filter_pass", [False, True], ids=["all", "filter_pass"])
def test_matches_reference_token_for_token(
    tmp_path: Path, vocabulary: list[str], layout: str, dense: bool, filter_pass: bool
) -> None:
    dicts = _dictionaries(vocabulary, layout=layout)
    adata = _adata(vocabulary=vocabulary, dense=dense, filter_pass=filter_pass, seed=3)
    size, special = (100, False) if layout == "V1" else (102, True)
    adata.write_h5ad(tmp_path / "in.h5ad")
    report = tokenize_h5ad(
        tmp_path / "in.h5ad",
        tmp_path / "out.dataset",
        dictionaries=dicts,
        model_input_size=size,
        special_tokens=special,
        columns=COLUMNS,
        chunk_size=37,  # chunks cross cell-size patterns and filter_pass runs
        losses=LENIENT_LOSSES,
    )
    expected = reference_tokenize(
        adata,
        dicts.token_dictionary,
        dicts.gene_median_dictionary,
        model_input_size=size,
        special_tokens=special,
        columns=COLUMNS,
    )
    ds = _load(tmp_path / "out.dataset")
    assert len(ds) == len(expected) == report["cells"]["tokenized"]
    assert ds["input_ids"] == [e["input_ids"] for e in expected]
    # Geneformer's order (numpy's default argsort): the same up to the order of exact ties.
    geneformer = reference_tokenize(
        adata,
        dicts.token_dictionary,
        dicts.gene_median_dictionary,
        model_input_size=size,
        special_tokens=special,
        ties="numpy",
    )
    agreement = compare_up_to_ties(ds["input_ids"], geneformer, special_tokens=special)
    assert agreement["identical"] > 0
    assert agreement["cells_with_ties"] > 0
    assert ds["length"] == [e["length"] for e in expected]
    for column in COLUMNS:
        assert ds[column] == [str(e[column]) for e in expected]
    # The data really exercises truncation and exact ties.
    assert report["cells"]["truncated"] > 0
    assert max(ds["length"]) == size
    if special:
        assert all(ids[0] == 2 and ids[-1] == 3 for ids in ds["input_ids"])
    if not dense:
        assert ds["input_ids"] == scipy_expression_tokenize(
            adata,
            dicts.token_dictionary,
            dicts.gene_median_dictionary,
            model_input_size=size,
            special_tokens=special,
        )


def test_storage_decides_the_arithmetic(tmp_path: Path, vocabulary: list[str]) -> None:
    """Sparse X gets scipy's reciprocal products, dense X true division, as in Geneformer."""
    dicts = _dictionaries(vocabulary, layout="V1")
    sparse_data = _adata(vocabulary=vocabulary, seed=5)
    dense_data = _adata(vocabulary=vocabulary, seed=5, dense=True)
    kwargs = {"model_input_size": 2048, "special_tokens": False}
    ref_sparse = reference_tokenize(
        sparse_data, dicts.token_dictionary, dicts.gene_median_dictionary, **kwargs
    )
    ref_dense = reference_tokenize(
        dense_data, dicts.token_dictionary, dicts.gene_median_dictionary, **kwargs
    )
    # The two paths rank some near-ties differently on this data, so the test can tell them apart.
    differ = sum(
        a["input_ids"] != b["input_ids"] for a, b in zip(ref_sparse, ref_dense, strict=True)
    )
    assert differ > 0
    for adata, ref, name in ((sparse_data, ref_sparse, "s"), (dense_data, ref_dense, "d")):
        tokenize_anndata(
            adata,
            tmp_path / f"{name}.dataset",
            dictionaries=dicts,
            columns=[],
            **kwargs,
            losses=LENIENT_LOSSES,
        )
        assert _load(tmp_path / f"{name}.dataset")["input_ids"] == [r["input_ids"] for r in ref]


def test_unsorted_and_duplicate_csr_entries_follow_scipy(
    tmp_path: Path, vocabulary: list[str]
) -> None:
    dicts = _dictionaries(vocabulary, layout="V1")
    adata = _adata(vocabulary=vocabulary, seed=7)
    csr = adata.X.tocsr()
    # Reverse the stored order of every other row and duplicate one stored entry.
    data, indices, indptr = csr.data.copy(), csr.indices.copy(), csr.indptr.copy()
    for i in range(0, csr.shape[0], 2):
        lo, hi = indptr[i], indptr[i + 1]
        data[lo:hi], indices[lo:hi] = data[lo:hi][::-1].copy(), indices[lo:hi][::-1].copy()
    row = 6
    lo = indptr[row]
    data = np.insert(data, lo, data[lo])
    indices = np.insert(indices, lo, indices[lo])
    indptr[row + 1 :] += 1
    adata.X = sparse.csr_matrix((data, indices, indptr), shape=csr.shape)
    assert not adata.X.has_canonical_format
    tokenize_anndata(
        adata,
        tmp_path / "o.dataset",
        dictionaries=dicts,
        model_input_size=64,
        columns=[],
        losses=LENIENT_LOSSES,
    )
    expected = scipy_expression_tokenize(
        adata,
        dicts.token_dictionary,
        dicts.gene_median_dictionary,
        model_input_size=64,
        special_tokens=False,
    )
    assert _load(tmp_path / "o.dataset")["input_ids"] == expected


def test_explicit_zeros_are_ranked_last_like_geneformer(
    tmp_path: Path, vocabulary: list[str]
) -> None:
    dicts = _dictionaries(vocabulary, layout="V1")
    x = sparse.csr_matrix(
        (
            np.array([3, 0, 1, 0, 0], dtype=np.float32),
            np.array([0, 1, 2, 0, 4]),
            np.array([0, 3, 5]),
        ),
        shape=(2, 5),
    )
    adata = ad.AnnData(
        X=x,
        obs=pd.DataFrame({"n_counts": np.array([10, 10], dtype=np.float32)}, index=["a", "b"]),
        var=pd.DataFrame({"ensembl_id": vocabulary[:5]}, index=list("vwxyz")),
    )
    report = tokenize_anndata(
        adata, tmp_path / "o.dataset", dictionaries=dicts, columns=[], losses=LENIENT_LOSSES
    )
    expected = scipy_expression_tokenize(
        adata,
        dicts.token_dictionary,
        dicts.gene_median_dictionary,
        model_input_size=2048,
        special_tokens=False,
    )
    ds = _load(tmp_path / "o.dataset")
    assert ds["input_ids"] == expected
    assert ds["length"] == [3, 2]  # cell b stores only zeros, so it is not empty
    assert report["counts"]["explicit_zeros_ranked"] == 3


@pytest.mark.skipif(not os.environ.get(DICT_ENV), reason=f"set {DICT_ENV} to run with gc30M")
def test_matches_reference_with_real_gc30m_dictionaries(tmp_path: Path) -> None:
    folder = Path(os.environ[DICT_ENV])
    dicts = load_dictionaries(
        folder / "token_dictionary_gc30M.pkl", folder / "gene_median_dictionary_gc30M.pkl"
    )
    assert dicts.layout == "V1"
    medians = dicts.gene_median_dictionary
    by_value: dict = {}
    for gene, value in medians.items():
        by_value.setdefault(value, []).append(gene)
    tied = [g for genes in by_value.values() if len(genes) > 1 for g in genes]
    rng = np.random.default_rng(11)
    others = list(rng.choice([g for g in medians if g not in set(tied)], 300, replace=False))
    vocabulary = tied + others
    adata = _adata(vocabulary=vocabulary, seed=11, filter_pass=True)
    # Cells expressing every tied-median gene with the same count: exact ties with real medians.
    counts = adata.X.tolil()
    counts[10:20, : len(tied)] = 2
    adata.X = counts.tocsr()
    adata.obs["n_counts"] = (np.asarray(adata.X.sum(axis=1)).ravel() + 50).astype(np.float32)
    adata.write_h5ad(tmp_path / "in.h5ad")
    tokenize_h5ad(
        tmp_path / "in.h5ad",
        tmp_path / "o.dataset",
        dictionaries=dicts,
        model_input_size=2048,
        columns=COLUMNS,
        chunk_size=50,
        losses=LENIENT_LOSSES,
    )
    expected = reference_tokenize(
        adata, dicts.token_dictionary, medians, model_input_size=2048, special_tokens=False
    )
    ds = _load(tmp_path / "o.dataset")
    assert ds.features["input_ids"] == datasets.List(datasets.Value("int16"))
    assert ds["input_ids"] == [e["input_ids"] for e in expected]
    geneformer = reference_tokenize(
        adata,
        dicts.token_dictionary,
        medians,
        model_input_size=2048,
        special_tokens=False,
        ties="numpy",
    )
    agreement = compare_up_to_ties(ds["input_ids"], geneformer, special_tokens=False)
    assert agreement["cells_with_ties"] >= 10  # the cells given every tied-median gene


# --------------------------------------------------------------------------------------------
# Output format, determinism, multiprocessing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("layout", "dtype"), [("V1", "int16"), ("V2", "int32")])
def test_dataset_is_what_datasets_writes(
    tmp_path: Path, vocabulary: list[str], layout: str, dtype: str
) -> None:
    dicts = _dictionaries(vocabulary, layout=layout)
    adata = _adata(vocabulary=vocabulary, seed=1)
    tokenize_anndata(
        adata,
        tmp_path / "ours.dataset",
        dictionaries=dicts,
        model_input_size=64,
        special_tokens=layout == "V2",
        columns=COLUMNS,
        losses=LENIENT_LOSSES,
    )
    ds = _load(tmp_path / "ours.dataset")
    assert list(ds.features) == ["input_ids", *COLUMNS, "length"]
    assert ds.features["input_ids"] == datasets.List(datasets.Value(dtype))
    assert ds.features["length"] == datasets.Value("int64")
    assert ds.features["cell_type"] == datasets.Value("string")
    # datasets' own save_to_disk of the same rows gives the same metadata and data.
    ds.save_to_disk(str(tmp_path / "theirs.dataset"))
    ours, theirs = tmp_path / "ours.dataset", tmp_path / "theirs.dataset"
    assert (ours / "dataset_info.json").read_bytes() == (theirs / "dataset_info.json").read_bytes()
    state = json.loads((ours / "state.json").read_text())
    assert state["_data_files"] == [{"filename": "data-00000-of-00001.arrow"}]
    assert _load(theirs).data.table.equals(ds.data.table)
    # Geneformer-style readers: torch-formatted batches work.
    ds.set_format("torch", columns=["input_ids"])
    assert ds[0]["input_ids"].ndim == 1


def test_output_is_byte_deterministic_across_runs_and_nproc(
    tmp_path: Path, vocabulary: list[str]
) -> None:
    dicts = _dictionaries(vocabulary, layout="V2")
    _adata(vocabulary=vocabulary, seed=2, filter_pass=True).write_h5ad(tmp_path / "in.h5ad")
    digests = []
    for run, nproc in enumerate([1, 1, 2]):
        out = tmp_path / f"o{run}.dataset"
        tokenize_h5ad(
            tmp_path / "in.h5ad",
            out,
            dictionaries=dicts,
            model_input_size=80,
            special_tokens=True,
            columns=COLUMNS,
            chunk_size=25,
            nproc=nproc,
            losses=LENIENT_LOSSES,
        )
        digests.append(_digest(out))
    assert digests[0] == digests[1] == digests[2]


def test_shards_roll_over_and_load(
    tmp_path: Path, vocabulary: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rosmap_geneformer.geneformer import dataset_writer

    dicts = _dictionaries(vocabulary, layout="V1")
    adata = _adata(vocabulary=vocabulary, seed=4)
    tokenize_anndata(
        adata, tmp_path / "one.dataset", dictionaries=dicts, chunk_size=20, losses=LENIENT_LOSSES
    )
    monkeypatch.setattr(dataset_writer, "MAX_SHARD_BYTES", 5_000)
    tokenize_anndata(
        adata, tmp_path / "many.dataset", dictionaries=dicts, chunk_size=20, losses=LENIENT_LOSSES
    )
    shards = sorted(p.name for p in (tmp_path / "many.dataset").glob("*.arrow"))
    assert len(shards) > 1
    assert shards[0].endswith(f"-of-{len(shards):05d}.arrow")
    assert _load(tmp_path / "many.dataset")[:] == _load(tmp_path / "one.dataset")[:]


def test_report_counts_and_coverage(tmp_path: Path, vocabulary: list[str]) -> None:
    dicts = _dictionaries(vocabulary, layout="V1")
    adata = _adata(vocabulary=vocabulary, seed=6, filter_pass=True)
    report = tokenize_anndata(
        adata,
        tmp_path / "o.dataset",
        dictionaries=dicts,
        model_input_size=100,
        losses=LENIENT_LOSSES,
    )
    cells = report["cells"]
    passing = int((adata.obs["filter_pass"] == 1).sum())
    assert cells["input"] == adata.n_obs
    assert cells["filtered_out"] == adata.n_obs - passing
    assert cells["tokenized"] + cells["dropped_empty"] == passing
    assert cells["dropped_empty"] > 0
    assert report["genes"]["genes_in_vocabulary"] == 300  # 320 genes, 20 unknown
    assert report["genes"]["duplicate_id_columns"] == 2
    assert report["genes"]["ids_matched_after_upper_casing"] == 1
    x = adata.X.toarray()[adata.obs["filter_pass"].to_numpy() == 1]
    assert report["counts"]["in_x"] == pytest.approx(x.sum())
    assert report["counts"]["fraction_in_vocabulary"] == pytest.approx(
        x[:, :300].sum() / x.sum(), abs=1e-6
    )
    assert report["length"]["max"] == 100
    assert sum(report["length"]["histogram"].values()) == cells["tokenized"]


# --------------------------------------------------------------------------------------------
# Bad input: a clear error or a counted drop, never a silently wrong result
# --------------------------------------------------------------------------------------------
def _run(adata: ad.AnnData, path: Path, dicts: GeneDictionaries, **kwargs) -> dict:
    return tokenize_anndata(
        adata, path / "o.dataset", dictionaries=dicts, columns=[], **kwargs, losses=LENIENT_LOSSES
    )


def test_refuses_log_normalised_counts(tmp_path: Path, vocabulary: list[str]) -> None:
    adata = _adata(vocabulary=vocabulary)
    adata.X = sparse.csr_matrix(np.log1p(adata.X.toarray()))
    with pytest.raises(ValueError, match="non-integer"):
        _run(adata, tmp_path, _dictionaries(vocabulary, layout="V1"))
    assert not (tmp_path / "o.dataset").exists()


def test_refuses_negative_counts(tmp_path: Path, vocabulary: list[str]) -> None:
    adata = _adata(vocabulary=vocabulary)
    adata.X.data[0] = -1
    with pytest.raises(ValueError, match="negative"):
        _run(adata, tmp_path, _dictionaries(vocabulary, layout="V1"))


def test_refuses_missing_ensembl_id(tmp_path: Path, vocabulary: list[str]) -> None:
    adata = _adata(vocabulary=vocabulary)
    del adata.var["ensembl_id"]
    with pytest.raises(ValueError, match=r"var lacks column 'ensembl_id'"):
        _run(adata, tmp_path, _dictionaries(vocabulary, layout="V1"))


def test_refuses_missing_n_counts(tmp_path: Path, vocabulary: list[str]) -> None:
    adata = _adata(vocabulary=vocabulary)
    del adata.obs["n_counts"]
    with pytest.raises(ValueError, match=r"obs lacks column 'n_counts'"):
        _run(adata, tmp_path, _dictionaries(vocabulary, layout="V1"))


@pytest.mark.parametrize("bad", [0.0, -3.0, np.nan])
def test_refuses_non_positive_n_counts(tmp_path: Path, vocabulary: list[str], bad: float) -> None:
    adata = _adata(vocabulary=vocabulary)
    adata.obs.loc[adata.obs.index[4], "n_counts"] = bad
    with pytest.raises(ValueError, match=r"zero, negative or missing for 1 cell\(s\).*L1_00004-1"):
        _run(adata, tmp_path, _dictionaries(vocabulary, layout="V1"))


def test_refuses_n_counts_below_the_counts_in_x(tmp_path: Path, vocabulary: list[str]) -> None:
    adata = _adata(vocabulary=vocabulary)
    adata.obs["n_counts"] = (np.asarray(adata.X.sum(axis=1)).ravel() / 2 + 1).astype(np.float32)
    with pytest.raises(ValueError, match="smaller than the sum of X"):
        _run(adata, tmp_path, _dictionaries(vocabulary, layout="V1"))


def test_reports_no_overlap_with_the_vocabulary(tmp_path: Path, vocabulary: list[str]) -> None:
    adata = _adata(vocabulary=vocabulary)
    adata.var["ensembl_id"] = [f"{g}.5" for g in adata.var["ensembl_id"]]
    with pytest.raises(ValueError, match="overlap 0 of 320"):
        _run(adata, tmp_path, _dictionaries(vocabulary, layout="V1"))


def test_refuses_a_token_gene_without_median(tmp_path: Path, vocabulary: list[str]) -> None:
    dicts = _dictionaries(vocabulary, layout="V1")
    medians = dict(dicts.gene_median_dictionary)
    del medians[vocabulary[0]]
    with pytest.raises(ValueError, match="no entry in the gene median dictionary"):
        validate_dictionaries(dicts.token_dictionary, medians)
    # Even when the pair was not validated, tokenization names the gene instead of a KeyError.
    broken = GeneDictionaries(dicts.token_dictionary, medians, "V1")
    with pytest.raises(ValueError, match=vocabulary[0]):
        _run(_adata(vocabulary=vocabulary), tmp_path, broken)


def test_refuses_special_tokens_without_cls_eos(tmp_path: Path, vocabulary: list[str]) -> None:
    with pytest.raises(ValueError, match="no <cls>/<eos>"):
        _run(
            _adata(vocabulary=vocabulary),
            tmp_path,
            _dictionaries(vocabulary, layout="V1"),
            special_tokens=True,
            model_input_size=4096,
        )


def test_drops_and_counts_cells_without_vocabulary_genes(
    tmp_path: Path, vocabulary: list[str]
) -> None:
    adata = _adata(vocabulary=vocabulary)
    report = _run(adata, tmp_path, _dictionaries(vocabulary, layout="V1"))
    # Rows 0, 8, 16, ... store nothing; row 1 only genes outside the vocabulary.
    empty = {0, 1} | set(range(8, adata.n_obs, 8))
    assert report["cells"]["dropped_empty"] == len(empty)
    ds = datasets.load_from_disk(str(tmp_path / "o.dataset"))
    assert len(ds) == adata.n_obs - len(empty)


def test_refuses_csc_files_and_missing_columns(tmp_path: Path, vocabulary: list[str]) -> None:
    dicts = _dictionaries(vocabulary, layout="V1")
    adata = _adata(vocabulary=vocabulary)
    with pytest.raises(ValueError, match=r"obs lacks column\(s\) \['donor'\]"):
        tokenize_anndata(
            adata,
            tmp_path / "o.dataset",
            dictionaries=dicts,
            columns=["donor"],
            losses=LENIENT_LOSSES,
        )
    adata.X = sparse.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="CSC"):
        tokenize_h5ad(
            tmp_path / "csc.h5ad", tmp_path / "o.dataset", dictionaries=dicts, losses=LENIENT_LOSSES
        )
    # In memory, CSC is fine (Geneformer's arithmetic gives the same values).
    tokenize_anndata(
        adata, tmp_path / "o.dataset", dictionaries=dicts, columns=[], losses=LENIENT_LOSSES
    )


# --------------------------------------------------------------------------------------------
# Dictionaries
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        ({"<mask>": 1, "G1": 2}, "'<pad>' to 0"),
        ({"<pad>": 0, "<mask>": 1, "<cls>": 2, "G1": 4}, "only one of <cls>/<eos>"),
        ({"<pad>": 0, "<mask>": 1, "<cls>": 3, "<eos>": 2, "G1": 4}, "<cls> 2 and <eos> 3"),
        ({"<pad>": 0, "<mask>": 1, "G1": 2, "G2": 2}, "unique"),
        ({"<pad>": 0, "<mask>": 1, "G1": 2.5}, "non-negative integers"),
        ({"<pad>": 0, "<mask>": 1}, "no gene"),
    ],
)
def test_validate_dictionaries_errors(tokens: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_dictionaries(tokens, {"G1": 1.0, "G2": 2.0})


@pytest.mark.parametrize("median", [0.0, -1.0, float("nan"), float("inf"), "1.0"])
def test_validate_dictionaries_refuses_bad_medians(median: object) -> None:
    with pytest.raises(ValueError, match="finite positive"):
        validate_dictionaries({"<pad>": 0, "<mask>": 1, "G1": 2}, {"G1": median})


def test_build_save_load_roundtrip(tmp_path: Path) -> None:
    medians = {"ENSG3": 2.0, "ENSG1": 0.5, "ENSG2": 1.0}
    v1 = build_dictionaries(medians)
    assert v1.layout == "V1"
    assert v1.token_dictionary == {"<pad>": 0, "<mask>": 1, "ENSG1": 2, "ENSG2": 3, "ENSG3": 4}
    v2 = build_dictionaries(medians, special_tokens=True)
    assert v2.layout == "V2"
    assert list(v2.token_dictionary.values()) == list(range(7))
    paths = save_dictionaries(v2, tmp_path / "d")
    loaded = load_dictionaries(paths["token_dictionary"], paths["gene_median_dictionary"])
    assert loaded == v2
    first = paths["token_dictionary"].read_bytes()
    save_dictionaries(v2, tmp_path / "d")
    assert paths["token_dictionary"].read_bytes() == first


def test_load_refuses_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="token dictionary not found"):
        load_dictionaries(tmp_path / "nope.pkl", tmp_path / "nope2.pkl")
    (tmp_path / "lfs.pkl").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match="LFS"):
        load_dictionaries(tmp_path / "lfs.pkl", tmp_path / "lfs.pkl")


@pytest.mark.skipif(not os.environ.get(DICT_ENV), reason=f"set {DICT_ENV} to run with gc30M")
def test_real_dictionary_layouts() -> None:
    folder = Path(os.environ[DICT_ENV])
    v1 = load_dictionaries(
        folder / "token_dictionary_gc30M.pkl", folder / "gene_median_dictionary_gc30M.pkl"
    )
    assert (v1.layout, len(v1.token_dictionary)) == ("V1", 25_426)
    with (folder / "token_dictionary_gc104M.pkl").open("rb") as fh:
        v2_tokens = pickle.load(fh)
    # gc104M medians are not available; check the V2 token layout against stand-in medians.
    stand_in = {g: 1.0 for g in v2_tokens if not g.startswith("<")}
    assert validate_dictionaries(v2_tokens, stand_in) == "V2"


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("n_bins", [3, 256])
def test_nonzero_medians_are_exact(
    tmp_path: Path, vocabulary: list[str], dense: bool, n_bins: int
) -> None:
    adata = _adata(vocabulary=vocabulary, seed=9, filter_pass=True, dense=dense)
    adata.var["ensembl_id"] = vocabulary[: adata.n_vars]  # unique ids
    adata.write_h5ad(tmp_path / "train.h5ad")
    medians, report = compute_nonzero_medians(tmp_path / "train.h5ad", chunk_size=23, n_bins=n_bins)
    keep = adata.obs["filter_pass"].to_numpy() == 1
    x = np.asarray(adata.X.toarray() if sparse.issparse(adata.X) else adata.X)[keep].astype(
        np.float64
    )
    n = adata.obs["n_counts"].to_numpy()[keep].astype(np.float64)
    expected = {}
    for j, gene in enumerate(adata.var["ensembl_id"]):
        nz = x[:, j] > 0
        if nz.any():
            expected[gene] = float(np.median(x[nz, j] / n[nz] * 10_000))
    assert medians == expected  # exact, not approximately
    assert report["genes_without_expression"] == adata.n_vars - len(expected)
    assert report["cells_used"] == int(keep.sum())


def test_no_cell_left_still_writes_a_loadable_dataset(
    tmp_path: Path, vocabulary: list[str]
) -> None:
    adata = _adata(vocabulary=vocabulary, n_cells=8)
    adata.obs["filter_pass"] = False
    report = _run(adata, tmp_path, _dictionaries(vocabulary, layout="V1"))
    assert report["cells"] == {
        "input": 8,
        "filtered_out": 8,
        "dropped_empty": 0,
        "tokenized": 0,
        "truncated": 0,
    }
    ds = datasets.load_from_disk(str(tmp_path / "o.dataset"))
    assert len(ds) == 0
    assert list(ds.features) == ["input_ids", "length"]
