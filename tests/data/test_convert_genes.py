"""Tests for rosmap_geneformer.data.convert_genes: symbols -> Ensembl ids, in memory, streamed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import ModuleType

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import sparse
from toy_annotation import G, toy_annotation
from toy_annotation import ensembl_id as _id

from builders import LENIENT_LOSSES, load_stage
from rosmap_geneformer.data.convert_genes import convert_genes, convert_genes_file
from rosmap_geneformer.data.gene_map import build_gene_map, write_gene_map

STAGES = Path(__file__).resolve().parents[2] / "src" / "stages"


def _load_stage(name: str) -> ModuleType:
    return load_stage(STAGES / f"{name}.py")


@pytest.fixture(scope="module")
def annotation() -> pd.DataFrame:
    return toy_annotation()


@pytest.fixture(scope="module")
def gene_map(annotation: pd.DataFrame) -> pd.DataFrame:
    return build_gene_map(annotation, release=93)


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

VAR_NAMES = [
    "AAA-1",  # suffix stripped -> AAA
    "AAA",
    "OLD1",  # previous symbol of AAA: summed with the two above
    "BBB",
    "TWIN",  # ambiguous
    "NOPE",  # not found
    "MT-CO1",
    "DUP",
    "NOPE-2",  # suffix stripped, still not found
    f"{_id(500)}.4",  # already an Ensembl id (with version)
    G["CCC"],  # already an Ensembl id, with a name in the gene map
]


def _counts(n_cells: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.poisson(2.0, size=(n_cells, len(VAR_NAMES))).astype(np.float32)
    values[:, VAR_NAMES.index("TWIN")] += 5  # lost genes carry counts that n_counts must include
    return values


def _adata(values: np.ndarray | None = None, var_names: list[str] | None = None) -> ad.AnnData:
    values = _counts() if values is None else values
    n_cells = values.shape[0]
    obs = pd.DataFrame(
        {"batch": [f"L{i % 3}" for i in range(n_cells)], "extra": np.arange(n_cells)},
        index=[f"L{i % 3}_CELL{i:04d}-1" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=var_names or VAR_NAMES)
    return ad.AnnData(X=sparse.csr_matrix(values), obs=obs, var=var)


def test_convert_sums_symbols_that_share_an_id(gene_map: pd.DataFrame) -> None:
    values = _counts()
    result = convert_genes(_adata(values), gene_map, source="counts.h5ad", losses=LENIENT_LOSSES)
    out = result.adata
    col = {name: values[:, i] for i, name in enumerate(VAR_NAMES)}

    expected_ids = sorted([G["AAA"], G["BBB"], G["MTCO1"], G["DUP"], _id(500), G["CCC"]])
    assert out.var_names.tolist() == expected_ids
    assert out.var["ensembl_id"].tolist() == expected_ids
    assert sparse.isspmatrix_csr(out.X)
    assert out.X.dtype == np.float32
    dense = out.to_df()
    np.testing.assert_array_equal(dense[G["AAA"]], col["AAA-1"] + col["AAA"] + col["OLD1"])
    np.testing.assert_array_equal(dense[G["BBB"]], col["BBB"])
    np.testing.assert_array_equal(dense[_id(500)], col[f"{_id(500)}.4"])

    symbols = out.var["gene_symbol"].to_dict()
    assert symbols[G["AAA"]] == "AAA;OLD1"  # unsuffixed first, no repeat for AAA-1
    assert symbols[G["MTCO1"]] == "MT-CO1"
    assert symbols[G["CCC"]] == "CCC"  # the Ensembl id's gene name
    assert symbols[_id(500)] == _id(500)  # unknown id: the id itself

    # n_counts: all input genes, lost ones included, exactly.
    np.testing.assert_array_equal(out.obs["n_counts"].to_numpy(), values.sum(axis=1))
    assert out.obs["n_counts"].to_numpy().sum() > out.X.sum()
    assert out.obs_names.tolist() == _adata(values).obs_names.tolist()
    assert out.obs["extra"].tolist() == list(range(values.shape[0]))


def test_convert_reports_lost_genes_and_numbers(gene_map: pd.DataFrame) -> None:
    values = _counts()
    result = convert_genes(_adata(values), gene_map, source="counts.h5ad", losses=LENIENT_LOSSES)
    totals = dict(zip(VAR_NAMES, values.sum(axis=0).astype(int), strict=True))

    lost = result.lost
    assert list(lost.columns) == ["symbol", "reason", "candidates", "total_counts"]
    assert sorted(lost["symbol"]) == ["NOPE", "NOPE-2", "TWIN"]
    by_symbol = lost.set_index("symbol")
    assert by_symbol.loc["TWIN", "reason"] == "ambiguous"
    assert by_symbol.loc["TWIN", "candidates"] == f"{G['TWIN1']};{G['TWIN2']}"
    assert by_symbol.loc["NOPE", "reason"] == "not_found"
    assert by_symbol.loc["NOPE", "candidates"] == ""
    for symbol in ("TWIN", "NOPE", "NOPE-2"):
        assert by_symbol.loc[symbol, "total_counts"] == totals[symbol]
    assert lost["total_counts"].tolist() == sorted(lost["total_counts"], reverse=True)

    report = result.report
    counts_total = int(values.sum())
    counts_lost = int(totals["TWIN"] + totals["NOPE"] + totals["NOPE-2"])
    assert report["genes_total"] == 11
    assert report["genes_mapped"] == 8
    assert report["genes_lost"] == 3
    assert report["genes_lost_ambiguous"] == 1
    assert report["genes_lost_not_found"] == 2
    assert report["genes_summed"] == 2
    assert report["genes_output"] == 6
    assert report["genes_suffix_stripped"] == 1
    assert report["fraction_genes_mapped"] == round(8 / 11, 6)
    assert report["counts_total"] == counts_total
    assert report["counts_lost"] == counts_lost
    assert report["fraction_counts_mapped"] == round((counts_total - counts_lost) / counts_total, 6)
    assert report["match_kind"] == {
        "gene_name": 5,
        "approved_symbol": 0,
        "previous_symbol": 1,
        "alias_symbol": 0,
        "ensembl_id": 2,
    }
    assert report["cells"] == values.shape[0]
    json.dumps(report, allow_nan=False)


def test_convert_without_any_mapped_gene_explains(gene_map: pd.DataFrame) -> None:
    adata = _adata(np.ones((4, 3), dtype=np.float32), var_names=["Gapdh", "Actb", "Snap25"])
    with pytest.raises(ValueError, match=r"mouse_counts\.h5ad.*none of the 3 var_names.*human"):
        convert_genes(adata, gene_map, source="mouse_counts.h5ad", losses=LENIENT_LOSSES)


def test_convert_refuses_normalised_counts(gene_map: pd.DataFrame) -> None:
    values = _counts()
    values[0, 0] = 0.5
    with pytest.raises(ValueError, match=r"counts\.h5ad.*non-integer"):
        convert_genes(_adata(values), gene_map, source="counts.h5ad", losses=LENIENT_LOSSES)


def test_convert_refuses_duplicate_cell_names(gene_map: pd.DataFrame) -> None:
    adata = _adata()
    adata.obs_names = ["same-1"] * adata.n_obs
    with pytest.raises(ValueError, match=r"counts\.h5ad.*duplicate cell name"):
        convert_genes(adata, gene_map, source="counts.h5ad", losses=LENIENT_LOSSES)


def test_convert_refuses_missing_batch_column(gene_map: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"counts\.h5ad.*library_id"):
        convert_genes(
            _adata(), gene_map, batch_key="library_id", source="counts.h5ad", losses=LENIENT_LOSSES
        )


def test_convert_accepts_dense_integer_counts(gene_map: pd.DataFrame) -> None:
    values = _counts()
    adata = _adata(values)
    adata.X = values.astype(np.int64)
    out = convert_genes(adata, gene_map, losses=LENIENT_LOSSES).adata
    assert sparse.isspmatrix_csr(out.X)
    assert out.X.dtype == np.float32
    np.testing.assert_array_equal(out.obs["n_counts"].to_numpy(), values.sum(axis=1))


def test_streamed_file_equals_in_memory_and_ignores_chunk_size(
    gene_map: pd.DataFrame, tmp_path: Path
) -> None:
    values = _counts()
    adata = _adata(values)
    adata.uns["source"] = {"release": 93}
    adata.write_h5ad(tmp_path / "counts.h5ad")
    in_memory = convert_genes(adata, gene_map, source="counts.h5ad", losses=LENIENT_LOSSES)
    digests = set()
    for chunk_size in (1, 4, values.shape[0] + 10):
        out = tmp_path / f"ensembl_{chunk_size}.h5ad"
        result = convert_genes_file(
            tmp_path / "counts.h5ad", out, gene_map, chunk_size=chunk_size, losses=LENIENT_LOSSES
        )
        assert result.adata is None
        assert result.report == in_memory.report
        pd.testing.assert_frame_equal(result.lost, in_memory.lost)
        written = ad.read_h5ad(out)
        assert sparse.isspmatrix_csr(written.X) and written.X.dtype == np.float32
        assert (written.X != in_memory.adata.X).nnz == 0
        pd.testing.assert_frame_equal(written.obs, in_memory.adata.obs)
        pd.testing.assert_frame_equal(written.var, in_memory.adata.var)
        assert written.uns["source"]["release"] == 93
        digests.add(_sha(out))
    # The chunk size changes memory, never the bytes DVC hashes.
    assert len(digests) == 1


def test_streamed_conversion_refuses_bad_values_in_a_late_chunk(
    gene_map: pd.DataFrame, tmp_path: Path
) -> None:
    values = _counts()
    values[-1, 0] = 0.5
    _adata(values).write_h5ad(tmp_path / "counts.h5ad")
    out = tmp_path / "ensembl.h5ad"
    with pytest.raises(ValueError, match=r"counts\.h5ad.*non-integer"):
        convert_genes_file(
            tmp_path / "counts.h5ad", out, gene_map, chunk_size=2, losses=LENIENT_LOSSES
        )
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


# --------------------------------------------------------------------------------------------
# Stage scripts: same params, same bytes
# --------------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _project(root: Path, gene_map: pd.DataFrame) -> None:
    params = {
        "paths": {
            "raw": "data/raw",
            "gene_map": "data/reference/gene_map.tsv",
            "ensembl": "data/interim/ensembl.h5ad",
            "reports": "reports",
        },
        "data": {"source": "demo", "columns": {"batch": "batch"}},
        "compute": {"chunk_size": 3},
        "raw": {
            "counts": "counts.h5ad",
            "individual_metadata": "individual_metadata.tsv",
            "batch_mapping": "batch_mapping.tsv",
            "cell_annotation": "cell_annotation.tsv",
        },
        "gene_map": {"source": "bundled", "release": 93, "biomart_host": "http://unused"},
        "losses": LENIENT_LOSSES.model_dump(),
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data/raw/demo").mkdir(parents=True)
    _adata().write_h5ad(root / "data/raw/demo/counts.h5ad")
    write_gene_map(gene_map, root / "data/reference/gene_map.tsv")


def test_convert_stage_is_deterministic(
    gene_map: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert_stage = _load_stage("convert_genes")
    digests = []
    for run in ("a", "b"):
        root = tmp_path / run
        root.mkdir()
        _project(root, gene_map)
        monkeypatch.chdir(root)
        convert_stage.main([])
        outputs = [
            root / "data/interim/ensembl.h5ad",
            root / "reports/genes/mapping.json",
            root / "reports/genes/lost_genes.tsv",
        ]
        digests.append([_sha(p) for p in outputs])
        assert not list(root.rglob(".tmp-*"))
    assert digests[0] == digests[1]
    report = json.loads((tmp_path / "a/reports/genes/mapping.json").read_text())
    assert report["genes_output"] == 6
    lost = pd.read_csv(tmp_path / "a/reports/genes/lost_genes.tsv", sep="\t", keep_default_na=False)
    assert list(lost.columns) == ["symbol", "reason", "candidates", "total_counts"]
    out = ad.read_h5ad(tmp_path / "a/data/interim/ensembl.h5ad")
    assert out.var_names.tolist() == sorted(out.var_names)
    assert out.obs["n_counts"].dtype == np.float32
