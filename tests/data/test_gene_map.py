"""Tests for rosmap_geneformer.data.gene_map: annotations, the gene map, BioMart, the stage."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import pandas as pd
import pytest
import yaml
from toy_annotation import G, toy_annotation
from toy_annotation import ensembl_id as _id

from builders import load_stage
from rosmap_geneformer.data.gene_map import (
    GENE_MAP_COLUMNS,
    build_gene_map,
    fetch_biomart_annotation,
    make_gene_map,
    read_gene_map,
    write_gene_map,
)

STAGES = Path(__file__).resolve().parents[2] / "src" / "stages"


def _load_stage(name: str) -> ModuleType:
    return load_stage(STAGES / f"{name}.py")


@pytest.fixture(scope="module")
def annotation() -> pd.DataFrame:
    return toy_annotation()


@pytest.fixture(scope="module")
def gene_map(annotation: pd.DataFrame) -> pd.DataFrame:
    return build_gene_map(annotation, release=93)


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
    strict = build_gene_map(annotation, release=93, prefer_primary_assembly=False)
    row = strict.set_index("symbol").loc["PATCHY"]
    assert row["match_kind"] == "ambiguous"
    assert row["candidates"] == f"{G['PATCHY']};{G['PATCHYP']}"
    # The approved-symbol rule does not depend on it.
    assert strict.set_index("symbol").loc["DUP", "ensembl_id"] == G["DUP"]


def test_gene_map_layout_and_round_trip(gene_map: pd.DataFrame, tmp_path: Path) -> None:
    assert list(gene_map.columns) == list(GENE_MAP_COLUMNS)
    assert gene_map["symbol"].tolist() == sorted(gene_map["symbol"])
    assert gene_map["symbol"].is_unique
    assert set(gene_map["release"]) == {"93"}
    # A gene called "NA" must survive the TSV round trip as a symbol, not as a missing value.
    extra = pd.DataFrame([("NA", _id(99), "gene_name", "93", "")], columns=list(GENE_MAP_COLUMNS))
    table = pd.concat([gene_map, extra]).sort_values("symbol").reset_index(drop=True)
    write_gene_map(table, tmp_path / "a.tsv")
    write_gene_map(table, tmp_path / "b.tsv")
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    back = read_gene_map(tmp_path / "a.tsv")
    pd.testing.assert_frame_equal(back, table)


def test_read_gene_map_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.tsv.*gene_map"):
        read_gene_map(tmp_path / "missing.tsv")
    (tmp_path / "bad.tsv").write_text("symbol\tid\nAAA\tx\n")
    with pytest.raises(ValueError, match=r"bad\.tsv.*ensembl_id"):
        read_gene_map(tmp_path / "bad.tsv")


def test_bundled_table_maps_known_symbols() -> None:
    table = make_gene_map(source="bundled", release=93).set_index("symbol")
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
        make_gene_map(source="gencode", release=93)
    with pytest.raises(ValueError, match="84, 93, 100"):
        make_gene_map(source="bundled", release=95)


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
    written = read_gene_map(tmp_path / "data/reference/gene_map.tsv")
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
    table = make_gene_map(source="biomart", release=93, biomart_host=host)
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
    annotation = fetch_biomart_annotation(f"{host}/biomart/martservice/")
    assert annotation.loc["ENSG00000130203", "gene_name"] == "APOE"
    assert (annotation["alias_symbols"] == "").all()
    assert len(seen) == 2
    # Without HGNC symbols or chromosomes the two TBCE genes stay ambiguous.
    table = build_gene_map(annotation, release=93).set_index("symbol")
    assert table.loc["TBCE", "match_kind"] == "ambiguous"


def test_biomart_unreachable_host_suggests_bundled() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    host = f"http://127.0.0.1:{port}"
    with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port}.*gene_map\.source: bundled"):
        make_gene_map(source="biomart", release=93, biomart_host=host)


def test_biomart_bad_answers_are_explained(biomart: tuple[str, list]) -> None:
    host, _ = biomart
    with pytest.raises(ConnectionError, match=r"404.*gene_map\.source: bundled"):
        fetch_biomart_annotation(f"{host}/not/a/mart")
    with pytest.raises(ValueError, match=r"not a valid BioMart reply.*gene_map\.source: bundled"):
        fetch_biomart_annotation(host, dataset="mmusculus_gene_ensembl")
