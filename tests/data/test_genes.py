from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import sparse

from rosmap_geneformer.data import genes

STAGES = Path(__file__).resolve().parents[2] / "src" / "stages"


def _load_stage(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"stage_{name}_genes_test", STAGES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# A small hand-made annotation with every priority rule in it
# --------------------------------------------------------------------------------------------


def _id(n: int) -> str:
    return f"ENSG{n:011d}"


G = {
    name: _id(i)
    for i, name in enumerate(
        [
            "AAA",
            "BBB",
            "DUP",
            "DUPPATCH",
            "TWIN1",
            "TWIN2",
            "PATCHY",
            "PATCHYP",
            "MTCO1",
            "CCC",
            "DDD",
        ],
        start=1,
    )
}


@pytest.fixture(scope="module")
def annotation() -> pd.DataFrame:
    rows = [
        # id,           gene_name, chrom,            approved, previous,      aliases
        (G["AAA"], "AAA", "1", "AAA", "OLD1, PA", "ALS, SHARED_ALIAS, TWIN"),
        (G["BBB"], "BBB", "2", "BBB2", "BBB", "SHARED_ALIAS"),
        (G["DUP"], "DUP", "3", "DUP", "", ""),
        (G["DUPPATCH"], "DUP", "CHR_HSCHR3_1_CTG1", "", "", ""),
        (G["TWIN1"], "TWIN", "5", "", "", ""),
        (G["TWIN2"], "TWIN", "6", "", "", ""),
        (G["PATCHY"], "PATCHY", "7", "", "", ""),
        (G["PATCHYP"], "PATCHY", "CHR_HSCHR7_2_CTG6", "", "", ""),
        (G["MTCO1"], "MT-CO1", "MT", "MT-CO1", "MTCO1", ""),
        (G["CCC"], "CCC", "10", "CCC", "OLD2", "AAA, PA"),
        (G["DDD"], "DDD", "11", "DDD", "OLD2", ""),
    ]
    frame = pd.DataFrame(
        rows,
        columns=[
            "ensembl_id",
            "gene_name",
            "Chromosome",
            "approved_symbol",
            "previous_symbols",
            "alias_symbols",
        ],
    )
    return frame.set_index("ensembl_id")


@pytest.fixture(scope="module")
def gene_map(annotation: pd.DataFrame) -> pd.DataFrame:
    return genes.build_gene_map(annotation, release=93)


@pytest.mark.parametrize(
    ("symbol", "ensembl_id", "match_kind"),
    [
        ("AAA", G["AAA"], "gene_name"),  # a gene name beats another gene's alias
        ("BBB", G["BBB"], "gene_name"),  # ... and its own previous symbol
        ("BBB2", G["BBB"], "approved_symbol"),
        ("DUP", G["DUP"], "gene_name"),  # shared name: the one with that approved symbol wins
        ("PATCHY", G["PATCHY"], "gene_name"),  # shared name: the primary-assembly copy wins
        ("MT-CO1", G["MTCO1"], "gene_name"),
        ("OLD1", G["AAA"], "previous_symbol"),
        ("PA", G["AAA"], "previous_symbol"),  # previous beats another gene's alias
        ("MTCO1", G["MTCO1"], "previous_symbol"),
        ("ALS", G["AAA"], "alias_symbol"),
    ],
)
def test_gene_map_priority(
    gene_map: pd.DataFrame, symbol: str, ensembl_id: str, match_kind: str
) -> None:
    row = gene_map.set_index("symbol").loc[symbol]
    assert (row["ensembl_id"], row["match_kind"], row["candidates"]) == (ensembl_id, match_kind, "")


@pytest.mark.parametrize(
    ("symbol", "candidates"),
    [
        ("TWIN", [G["TWIN1"], G["TWIN2"]]),  # not rescued by being an alias of AAA
        ("OLD2", [G["CCC"], G["DDD"]]),  # previous symbol of two genes
        ("SHARED_ALIAS", [G["AAA"], G["BBB"]]),
    ],
)
def test_gene_map_keeps_ambiguous_symbols_with_candidates(
    gene_map: pd.DataFrame, symbol: str, candidates: list[str]
) -> None:
    row = gene_map.set_index("symbol").loc[symbol]
    assert row["ensembl_id"] == ""
    assert row["match_kind"] == "ambiguous"
    assert row["candidates"].split(";") == sorted(candidates)


def test_gene_map_primary_assembly_rule_can_be_switched_off(annotation: pd.DataFrame) -> None:
    strict = genes.build_gene_map(annotation, release=93, prefer_primary_assembly=False)
    row = strict.set_index("symbol").loc["PATCHY"]
    assert row["match_kind"] == "ambiguous"
    assert row["candidates"] == f"{G['PATCHY']};{G['PATCHYP']}"
    # The approved-symbol rule does not depend on it.
    assert strict.set_index("symbol").loc["DUP", "ensembl_id"] == G["DUP"]


def test_gene_map_layout_and_round_trip(gene_map: pd.DataFrame, tmp_path: Path) -> None:
    assert list(gene_map.columns) == list(genes.GENE_MAP_COLUMNS)
    assert gene_map["symbol"].tolist() == sorted(gene_map["symbol"])
    assert gene_map["symbol"].is_unique
    assert set(gene_map["release"]) == {"93"}
    # A gene called "NA" must survive the TSV round trip as a symbol, not as a missing value.
    extra = pd.DataFrame(
        [("NA", _id(99), "gene_name", "93", "")], columns=list(genes.GENE_MAP_COLUMNS)
    )
    table = pd.concat([gene_map, extra]).sort_values("symbol").reset_index(drop=True)
    genes.write_gene_map(table, tmp_path / "a.tsv")
    genes.write_gene_map(table, tmp_path / "b.tsv")
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    back = genes.read_gene_map(tmp_path / "a.tsv")
    pd.testing.assert_frame_equal(back, table)


def test_read_gene_map_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.tsv.*gene_map"):
        genes.read_gene_map(tmp_path / "missing.tsv")
    (tmp_path / "bad.tsv").write_text("symbol\tid\nAAA\tx\n")
    with pytest.raises(ValueError, match=r"bad\.tsv.*ensembl_id"):
        genes.read_gene_map(tmp_path / "bad.tsv")


def test_bundled_table_maps_known_symbols() -> None:
    table = genes.make_gene_map(source="bundled", release=93).set_index("symbol")
    assert table.loc["APOE", "ensembl_id"] == "ENSG00000130203"
    assert table.loc["APOE", "match_kind"] == "gene_name"
    assert table.loc["MT-CO1", "ensembl_id"] == "ENSG00000198804"
    assert table.loc["GAPDH", "ensembl_id"] == "ENSG00000111640"
    # TBCE has two Ensembl 93 genes; the HGNC approved one wins.
    assert table.loc["TBCE", "ensembl_id"] == "ENSG00000284770"
    assert (
        table.loc[table["match_kind"] != "ambiguous", "ensembl_id"].str.match(r"^ENSG\d{11}$")
    ).all()


def test_unknown_source_and_release_are_refused() -> None:
    with pytest.raises(ValueError, match="bundled"):
        genes.make_gene_map(source="gencode", release=93)
    with pytest.raises(ValueError, match="84, 93, 100"):
        genes.make_gene_map(source="bundled", release=95)


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
    result = genes.convert_genes(_adata(values), gene_map, source="counts.h5ad")
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
    result = genes.convert_genes(_adata(values), gene_map, source="counts.h5ad")
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
        genes.convert_genes(adata, gene_map, source="mouse_counts.h5ad")


def test_convert_refuses_normalised_counts(gene_map: pd.DataFrame) -> None:
    values = _counts()
    values[0, 0] = 0.5
    with pytest.raises(ValueError, match=r"counts\.h5ad.*non-integer"):
        genes.convert_genes(_adata(values), gene_map, source="counts.h5ad")


def test_convert_refuses_duplicate_cell_names(gene_map: pd.DataFrame) -> None:
    adata = _adata()
    adata.obs_names = ["same-1"] * adata.n_obs
    with pytest.raises(ValueError, match=r"counts\.h5ad.*duplicate cell name"):
        genes.convert_genes(adata, gene_map, source="counts.h5ad")


def test_convert_refuses_missing_batch_column(gene_map: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"counts\.h5ad.*library_id"):
        genes.convert_genes(_adata(), gene_map, batch_key="library_id", source="counts.h5ad")


def test_convert_accepts_dense_integer_counts(gene_map: pd.DataFrame) -> None:
    values = _counts()
    adata = _adata(values)
    adata.X = values.astype(np.int64)
    out = genes.convert_genes(adata, gene_map).adata
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
    in_memory = genes.convert_genes(adata, gene_map, source="counts.h5ad")
    digests = set()
    for chunk_size in (1, 4, values.shape[0] + 10):
        out = tmp_path / f"ensembl_{chunk_size}.h5ad"
        result = genes.convert_genes_file(
            tmp_path / "counts.h5ad", out, gene_map, chunk_size=chunk_size
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
        genes.convert_genes_file(tmp_path / "counts.h5ad", out, gene_map, chunk_size=2)
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
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data/raw/demo").mkdir(parents=True)
    _adata().write_h5ad(root / "data/raw/demo/counts.h5ad")
    genes.write_gene_map(gene_map, root / "data/reference/gene_map.tsv")


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


def test_gene_map_stage_writes_the_bundled_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gene_map_stage = _load_stage("gene_map")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "paths": {"gene_map": "data/reference/gene_map.tsv"},
                "gene_map": {"source": "bundled", "release": 93, "biomart_host": "http://unused"},
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    gene_map_stage.main([])
    written = genes.read_gene_map(tmp_path / "data/reference/gene_map.tsv")
    assert written.set_index("symbol").loc["APOE", "ensembl_id"] == "ENSG00000130203"
    assert set(written["release"]) == {"93"}


# --------------------------------------------------------------------------------------------
# BioMart, against a local server that answers like one
# --------------------------------------------------------------------------------------------

# (ensembl_gene_id, external_gene_name, chromosome_name, hgnc_symbol, external_synonym)
BIOMART_ROWS = [
    ("ENSG00000130203", "APOE", "19", "APOE", "AD2"),
    ("ENSG00000130203", "APOE", "19", "APOE", "LPG"),
    ("ENSG00000111640", "GAPDH", "12", "GAPDH", "G3PD"),
    ("ENSG00000284770", "TBCE", "1", "TBCE", "KCS"),
    ("ENSG00000285053", "TBCE", "1", "", ""),
    ("ENSG00000198804", "MT-CO1", "MT", "MT-CO1", "COI"),
    ("ENSG00000000001", "SHARED", "2", "", "LPG"),
]
BIOMART_ATTRIBUTES = {
    "ensembl_gene_id": "Gene stable ID",
    "external_gene_name": "Gene name",
    "chromosome_name": "Chromosome/scaffold name",
    "hgnc_symbol": "HGNC symbol",
    "external_synonym": "Gene Synonym",
}


def _biomart_config(attributes: dict[str, str]) -> bytes:
    descriptions = "".join(
        f'<AttributeDescription internalName="{name}" displayName="{display}" />'
        for name, display in attributes.items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<DatasetConfig dataset="hsapiens_gene_ensembl" interfaces="default" type="TableSet">'
        '<FilterPage internalName="filters"><FilterGroup internalName="filters">'
        '<FilterCollection internalName="chromosome">'
        '<FilterDescription internalName="chromosome_name" type="list" />'
        "</FilterCollection></FilterGroup></FilterPage>"
        '<AttributePage internalName="feature_page"><AttributeGroup internalName="gene">'
        f'<AttributeCollection internalName="gene">{descriptions}</AttributeCollection>'
        "</AttributeGroup></AttributePage></DatasetConfig>"
    ).encode()


class _FakeBioMart(BaseHTTPRequestHandler):
    attributes: dict[str, str] = BIOMART_ATTRIBUTES
    requests_seen: list[dict[str, list[str]]]

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        params = parse_qs(url.query)
        self.requests_seen.append(params)
        if url.path != "/biomart/martservice":
            self._send(404, b"not found", "text/plain")
        elif params.get("type") == ["registry"]:
            body = (
                '<?xml version="1.0" encoding="UTF-8"?><MartRegistry>'
                '<MartURLLocation database="ensembl_mart_93" default="1" displayName="Ensembl '
                'Genes 93" host="127.0.0.1" includeDatasets="" martUser="" name="ENSEMBL_MART_'
                'ENSEMBL" path="/biomart/martservice" port="80" serverVirtualSchema="default" '
                'visible="1" /></MartRegistry>'
            )
            self._send(200, body.encode(), "text/xml")
        elif params.get("type") == ["configuration"]:
            if params.get("dataset") != ["hsapiens_gene_ensembl"]:
                self._send(200, b"Problem retrieving configuration", "text/plain")
            else:
                self._send(200, _biomart_config(self.attributes), "text/xml")
        elif "query" in params:
            query = ElementTree.fromstring(params["query"][0])
            names = [a.attrib["name"] for a in query.iter("Attribute")]
            if any(name not in self.attributes for name in names):
                self._send(200, b"Query ERROR: unknown attribute", "text/plain")
                return
            order = list(BIOMART_ATTRIBUTES)
            rows = [tuple(row[order.index(n)] for n in names) for row in BIOMART_ROWS]
            if query.attrib.get("uniqueRows") == "1":
                rows = list(dict.fromkeys(rows))
            lines = ["\t".join(self.attributes[n] for n in names)]
            lines += ["\t".join(row) for row in rows]
            self._send(200, ("\n".join(lines) + "\n").encode(), "text/plain")
        else:
            self._send(400, b"bad request", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def biomart(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[dict[str, list[str]]]]]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    seen: list[dict[str, list[str]]] = []
    handler = type("Handler", (_FakeBioMart,), {"requests_seen": seen})
    for host in _serve(handler):
        yield host, seen


def test_biomart_source_builds_the_map(
    biomart: tuple[str, list], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, seen = biomart
    monkeypatch.chdir(tmp_path)
    table = genes.make_gene_map(source="biomart", release=93, biomart_host=host)
    by_symbol = table.set_index("symbol")
    assert by_symbol.loc["APOE", "ensembl_id"] == "ENSG00000130203"
    assert by_symbol.loc["GAPDH", "match_kind"] == "gene_name"
    assert by_symbol.loc["TBCE", "ensembl_id"] == "ENSG00000284770"  # the HGNC one
    assert by_symbol.loc["AD2", ["ensembl_id", "match_kind"]].tolist() == [
        "ENSG00000130203",
        "alias_symbol",
    ]
    assert by_symbol.loc["LPG", "match_kind"] == "ambiguous"
    assert by_symbol.loc["LPG", "candidates"] == "ENSG00000000001;ENSG00000130203"
    assert set(table["release"]) == {"93"}
    # One configuration request and two queries; nothing cached into the working directory.
    assert [sorted(r) for r in seen] == [["dataset", "type"], ["query"], ["query"]]
    assert not list(tmp_path.iterdir())


def test_biomart_without_synonyms_attribute(
    biomart: tuple[str, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, seen = biomart
    minimal = {
        k: v
        for k, v in BIOMART_ATTRIBUTES.items()
        if k in ("ensembl_gene_id", "external_gene_name")
    }
    monkeypatch.setattr(_FakeBioMart, "attributes", minimal)
    annotation = genes.fetch_biomart_annotation(f"{host}/biomart/martservice/")
    assert annotation.loc["ENSG00000130203", "gene_name"] == "APOE"
    assert (annotation["alias_symbols"] == "").all()
    assert len(seen) == 2
    # Without HGNC symbols or chromosomes the two TBCE genes stay ambiguous.
    table = genes.build_gene_map(annotation, release=93).set_index("symbol")
    assert table.loc["TBCE", "match_kind"] == "ambiguous"


def test_biomart_unreachable_host_suggests_bundled() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    host = f"http://127.0.0.1:{port}"
    with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port}.*gene_map\.source: bundled"):
        genes.make_gene_map(source="biomart", release=93, biomart_host=host)


def test_biomart_bad_answers_are_explained(biomart: tuple[str, list]) -> None:
    host, _ = biomart
    with pytest.raises(ConnectionError, match=r"404.*gene_map\.source: bundled"):
        genes.fetch_biomart_annotation(f"{host}/not/a/mart")
    with pytest.raises(ValueError, match=r"not a valid BioMart reply.*gene_map\.source: bundled"):
        genes.fetch_biomart_annotation(host, dataset="mmusculus_gene_ensembl")
