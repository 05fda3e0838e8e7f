"""ROSMAP-shaped sparse raw counts at any scale, for time and memory benchmarks of the data stages.

:func:`generate_rosmap_shaped` writes the four raw files in the ROSMAP layout (``counts.h5ad``,
``individual_metadata.tsv``, ``batch_mapping.tsv``, ``cell_annotation.tsv``) library by library,
appending the counts in blocks of cells (:func:`rosmap_geneformer.counts.streamed_h5ad`): memory
is set by the block, plus about 100 bytes a cell for names and row pointers. Unlike the demo
(:mod:`rosmap_geneformer.data.demo`) there is no biology to recover, only ROSMAP's shape:

- Features: the 33,538 of 10x GRCh38-3.0.0, approximated from Ensembl 93: primary-assembly
  genes of the biotypes 10x keeps, one per symbol (the 13 ``MT-`` genes included), padded with
  other Ensembl 93 genes, in chromosome order (1-22, X, Y, MT): ``MT-`` genes are last.
- Nuclei: seven major types in PFC proportions (a Dirichlet draw per donor). A type's profile has
  log-normal gene weights (lower for lncRNA, IG/TR and padding genes), ``MALAT1`` and a few very
  high genes (markers, random ones). A nucleus draws a number of detected genes (log-normal
  around ``genes_per_cell``, more in neurons), the UMIs that give it on average and samples them
  from its profile: most counts are 1-3, with a heavy tail; ``MT-`` genes take 0.2-3 %.
- Low-quality nuclei (few genes, or 20-60 % ``MT-``) and doublets (two nuclei summed) are left
  out of ``cell_annotation.tsv``, which, like ROSMAP's, covers only the cells that pass.

A nucleus's UMIs are sorted uniforms (normalised cumulative sums of exponential spacings) looked
up in its type's cumulative profile, so gene indices come out sorted and a run-length count gives
the CSR row without a sort. One ``numpy.random.default_rng(seed)`` drawn in a fixed order: the
same arguments give the same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from rosmap_geneformer import io
from rosmap_geneformer.counts import streamed_h5ad
from rosmap_geneformer.data import gene_map
from rosmap_geneformer.data.demo.dataset import DEFAULT_COLUMNS
from rosmap_geneformer.data.demo.genes import FINE_MARKERS, MARKERS
from rosmap_geneformer.data.demo.simulation import CELL_TYPE_FRACTIONS, FINE_TYPES
from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)

N_FEATURES_10X = 33_538  # 10x Genomics GRCh38-3.0.0, ROSMAP's reference
ENSEMBL_RELEASE = 93
CELL_TYPES = tuple(CELL_TYPE_FRACTIONS)
FILE_NAMES = {
    "counts": "counts.h5ad",
    "individual_metadata": "individual_metadata.tsv",
    "batch_mapping": "batch_mapping.tsv",
    "cell_annotation": "cell_annotation.tsv",
}
_CHROMOSOMES = (*(str(i) for i in range(1, 23)), "X", "Y", "MT")
# The biotypes 10x Genomics keeps in its GRCh38 references.
_TENX_BIOTYPES = frozenset(
    {"protein_coding", "lincRNA", "antisense", "IG_LV_gene", "IG_C_pseudogene"}
    | {f"{g}_{s}_gene" for g in ("IG", "TR") for s in "CDJV"}
    | {f"{g}_{s}_pseudogene" for g in ("IG", "TR") for s in "JV"}
)
_BIOTYPE_OFFSET = {"protein_coding": 0.0, "lincRNA": -1.0, "antisense": -1.2}
_OTHER_OFFSET = -3.5  # IG/TR and padding genes: rarely detected in brain nuclei
_BASE_SD = 2.0  # log-scale spread of gene weights shared by all types
_TYPE_SD = 0.5  # ... and per cell type
_MALAT1_SHARE = 0.03
_MARKER_SHARE = 0.012
_N_RANDOM_HIGH = 4  # extra highly expressed genes per type, 0.3-1 % of UMIs each
# Detected genes relative to the mean: neurons more, glia fewer.
_GENES_FACTOR = dict(Exc=1.4, Inh=1.25, Oli=0.7, Ast=0.8, OPC=0.9, Mic=0.6, Vas=0.55)
_GENES_SD = 0.3  # log-normal spread of detected genes per nucleus
_LIBRARY_DEPTH_SD = 0.12
_FEW_GENES = (20, 150)  # detected genes of a few-genes nucleus (below qc.min_genes 200)
_MT_SHARE = (0.002, 0.03)
_HIGH_MT_SHARE = (0.2, 0.6)
_COMPOSITION_CONCENTRATION = 80.0
# Cells simulated at once; part of the random stream: changing it changes the data.
_BLOCK_CELLS = 256
_UMI_GRID = np.geomspace(5.0, 2.0e6, 200)
_KINDS = ("normal", "few_genes", "high_mito", "doublet")  # kinds of barcode
_DRAWN = ("types", "genes", "mt")  # per-unit inputs of _simulate
_MARKER_GENES = frozenset(g for gs in (*MARKERS.values(), *FINE_MARKERS.values()) for g in gs)


def feature_table(n_features: int = N_FEATURES_10X) -> pd.DataFrame:
    """The features, 10x-like: one gene per symbol, in chromosome order, ``MT-`` genes last.

    Parameters
    ----------
    n_features
        Number of features; genes beyond the 10x biotypes pad the list, fewer keep the ``MT-``
        genes, ``MALAT1``, the markers and then protein-coding genes first.

    Returns
    -------
    Indexed by gene symbol, with ``ensembl_id``, ``gene_biotype`` and ``chromosome``.
    """
    table = gene_map.load_bundled_annotation(ENSEMBL_RELEASE)
    table = table[table["Chromosome"].isin(_CHROMOSOMES)].reset_index()
    table["rank"] = table["Chromosome"].map({c: i for i, c in enumerate(_CHROMOSOMES)})
    table = table.sort_values(["rank", "ensembl_id"], kind="stable")
    tenx = table["gene_biotype"].isin(_TENX_BIOTYPES)
    core = table[tenx & ~table["gene_name"].duplicated(keep="first")]
    n_mt = int((core["Chromosome"] == "MT").sum())
    if n_features >= len(core):
        pad = table[
            ~tenx & (table["Chromosome"] != "MT") & ~table["gene_name"].isin(core["gene_name"])
        ]
        pad = pad[~pad["gene_name"].duplicated(keep="first")].sort_values("ensembl_id")
        if n_features - len(core) > len(pad):
            msg = f"n_features={n_features}: Ensembl {ENSEMBL_RELEASE} has only {len(core) + len(pad)} distinct symbols."
            raise InputError(msg)
        chosen = pd.concat([core, pad.iloc[: n_features - len(core)]])
    elif n_features > n_mt:
        required = {"MALAT1", *_MARKER_GENES}
        priority = 2 - (core["gene_biotype"] == "protein_coding").to_numpy()
        priority[core["gene_name"].isin(required).to_numpy() | (core["Chromosome"] == "MT")] = 0
        chosen = core.iloc[np.argsort(priority, kind="stable")[:n_features]]
    else:
        msg = f"n_features={n_features}: need at least {n_mt + 1} (the MT- genes and one more)."
        raise InputError(msg)
    chosen = chosen.sort_values(["rank", "ensembl_id"], kind="stable")
    return pd.DataFrame(
        {
            "ensembl_id": chosen["ensembl_id"].to_numpy(),
            "gene_biotype": chosen["gene_biotype"].to_numpy(),
            "chromosome": chosen["Chromosome"].to_numpy(),
        },
        index=pd.Index(chosen["gene_name"].to_numpy(), dtype=str, name=None),
    )


@dataclasses.dataclass(frozen=True)
class _Profiles:
    cdf: np.ndarray  # types x nuclear genes, flattened; type t's cumulative probabilities + t
    mt: np.ndarray  # probabilities over the MT- genes (the last columns)
    n_nuclear: int
    n_vars: int
    expected_genes: np.ndarray  # types x _UMI_GRID: expected distinct nuclear genes

    def umis_for(self, types: np.ndarray, n_genes: np.ndarray) -> np.ndarray:
        """Nuclear UMIs that give ``n_genes`` distinct genes on average, per nucleus (at most
        half of the genes: with few features, more would take millions of UMIs)."""
        n_genes = np.minimum(n_genes, 0.5 * self.n_nuclear)
        out = np.empty(types.size, dtype=np.int64)
        for t in range(len(CELL_TYPES)):
            mask = types == t
            out[mask] = np.rint(np.interp(n_genes[mask], self.expected_genes[t], _UMI_GRID))
        return np.maximum(out, 1)


def _profiles(rng: np.random.Generator, features: pd.DataFrame) -> _Profiles:
    is_mt = (features["chromosome"] == "MT").to_numpy()
    nuclear = features[~is_mt]
    n = len(nuclear)
    offset = nuclear["gene_biotype"].map(_BIOTYPE_OFFSET).fillna(_OTHER_OFFSET).to_numpy()
    base = rng.normal(0.0, _BASE_SD, n) + offset
    position = {symbol: i for i, symbol in enumerate(nuclear.index)}
    protein = np.flatnonzero((nuclear["gene_biotype"] == "protein_coding").to_numpy())
    cdf = np.empty(len(CELL_TYPES) * n)
    expected = np.empty((len(CELL_TYPES), _UMI_GRID.size))
    for t, cell_type in enumerate(CELL_TYPES):
        weights = np.exp(base + rng.normal(0.0, _TYPE_SD, n))
        markers = (
            *MARKERS[cell_type],
            *(g for f, _ in FINE_TYPES[cell_type] for g in FINE_MARKERS.get(f, ())),
        )
        high = {position[g]: _MARKER_SHARE for g in markers if g in position}
        extra = rng.choice(protein, size=_N_RANDOM_HIGH, replace=False)
        for i, share in zip(extra.tolist(), rng.uniform(0.003, 0.01, _N_RANDOM_HIGH), strict=True):
            high.setdefault(i, float(share))
        if "MALAT1" in position:
            high[position["MALAT1"]] = _MALAT1_SHARE
        index, shares = np.array(list(high), dtype=np.int64), np.array(list(high.values()))
        weights[index] = 0.0
        p = weights / weights.sum() * (1.0 - shares.sum())
        p[index] = shares
        c = np.cumsum(p)
        c /= c[-1]
        c[-1] = 1.0
        cdf[t * n : (t + 1) * n] = c + t
        for lo in range(0, _UMI_GRID.size, 20):
            grid = _UMI_GRID[lo : lo + 20, None]
            expected[t, lo : lo + 20] = -np.expm1(-grid * p[None, :]).sum(axis=1)
    mt = rng.dirichlet(np.full(int(is_mt.sum()), 2.0)) if is_mt.any() else np.zeros(0)
    return _Profiles(cdf=cdf, mt=mt, n_nuclear=n, n_vars=len(features), expected_genes=expected)


def _simulate(
    rng: np.random.Generator,
    profiles: _Profiles,
    types: np.ndarray,
    n_genes: np.ndarray,
    mt_share: np.ndarray,
) -> sparse.csr_matrix:
    """Counts of nuclei (rows, canonical float32 CSR) of types ``types``."""
    n_units, n_nuc, n_vars = types.size, profiles.n_nuclear, profiles.n_vars
    umis = profiles.umis_for(types, n_genes)
    n_mt = rng.poisson(umis * mt_share / (1.0 - mt_share))
    ends = np.cumsum(umis + 1)
    starts = ends - umis - 1
    sums = np.cumsum(rng.standard_exponential(int(ends[-1])))
    unit = np.repeat(np.arange(n_units, dtype=np.int64), umis)
    origin = np.concatenate([[0.0], sums])[starts]
    # The k-th UMI overall sits at k + unit in ``sums`` (each nucleus has one extra spacing).
    u = (sums[np.arange(unit.size) + unit] - origin[unit]) / (sums[ends - 1] - origin)[unit]
    offset = types[unit].astype(np.int64)
    gene = np.searchsorted(profiles.cdf, u + offset, side="right") - offset * n_nuc
    np.clip(gene, 0, n_nuc - 1, out=gene)
    key = unit * n_vars + gene  # non-decreasing: nuclei in order, genes sorted within each
    first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    values = np.diff(np.append(first, key.size))
    rows, cols = np.divmod(key[first], n_vars)
    mt_counts = rng.multinomial(n_mt, profiles.mt) if profiles.mt.size else np.zeros((n_units, 0))
    mt_rows, mt_cols = np.nonzero(mt_counts)
    rows = np.concatenate([rows, mt_rows])
    order = np.argsort(rows, kind="stable")  # two sorted runs: nuclear genes, then MT- (last)
    cols = np.concatenate([cols, mt_cols + n_nuc])[order].astype(np.int32)
    values = np.concatenate([values, mt_counts[mt_rows, mt_cols]])[order].astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_units))])
    return sparse.csr_matrix((values, cols, indptr), shape=(n_units, n_vars))


def _apportion(total: int, weights: np.ndarray, minimum: int = 1) -> np.ndarray:
    """Integers >= ``minimum`` summing to ``total``, proportional to ``weights`` (largest remainder)."""
    spare = total - minimum * weights.size
    share = spare * weights / weights.sum()
    out = np.floor(share).astype(np.int64)
    out[np.argsort(out - share, kind="stable")[: spare - int(out.sum())]] += 1
    return out + minimum


def _age_bin(age: float) -> str:
    if age > 90:
        return "90+"
    upper = int(np.ceil(age / 5.0) * 5)
    return f"({upper - 5},{upper}]"


def _donor_table(rng: np.random.Generator, n_donors: int, fraction_ad: float) -> pd.DataFrame:
    is_ad = np.zeros(n_donors, dtype=bool)
    is_ad[rng.permutation(n_donors)[: round(fraction_ad * n_donors)]] = True
    ids = rng.choice(9_000_000, size=n_donors, replace=False) + 1_000_000
    age = np.clip(rng.normal(85.0, 6.0, n_donors) + 1.5 * is_ad, 66.0, 104.0)
    return pd.DataFrame(
        {
            "subject": [f"R{i}" for i in ids],
            "msex": (rng.random(n_donors) < 0.35).astype(int),
            "age_death": [_age_bin(a) for a in age],
            "pmi": np.round(rng.lognormal(np.log(7.0), 0.45, n_donors), 2),
            "race": np.where(rng.random(n_donors) < 0.92, 1, 2),
            "Pathologic_diagnosis_of_AD": np.where(is_ad, "yes", "no"),
            "cogdx": np.where(
                is_ad,
                rng.choice([4, 5, 2, 3, 1], size=n_donors, p=[0.6, 0.15, 0.1, 0.05, 0.1]),
                rng.choice([1, 2, 3, 4], size=n_donors, p=[0.65, 0.2, 0.05, 0.1]),
            ),
        }
    )


def _barcodes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` unique 16-letter ACGT barcodes, sorted (10x lists barcodes sorted)."""
    codes = np.unique(rng.integers(0, 4**16, size=n))
    while codes.size < n:
        codes = np.unique(np.concatenate([codes, rng.integers(0, 4**16, size=n)]))
    codes = np.sort(rng.choice(codes, size=n, replace=False)) if codes.size > n else codes
    digits = (codes[:, None] >> (2 * np.arange(15, -1, -1))) & 3
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[digits]
    return np.ascontiguousarray(letters).view("S16").ravel().astype(str)


def _draw_library(
    rng: np.random.Generator, n: int, *, p: np.ndarray, genes_mean: np.ndarray, kind_p: np.ndarray
) -> dict[str, np.ndarray]:
    """Per barcode of a library: type, kind (index into ``_KINDS``), fine type, target genes,
    ``MT-`` share; per doublet (in barcode order): the partner's type, genes and share."""
    n_types = len(CELL_TYPES)
    types = rng.choice(n_types, size=n, p=p)
    kinds = rng.choice(len(_KINDS), size=n, p=kind_p)
    fine = np.empty(n, dtype=object)
    for t, cell_type in enumerate(CELL_TYPES):
        labels, shares = zip(*FINE_TYPES[cell_type], strict=True)
        fine[types == t] = rng.choice(labels, size=int((types == t).sum()), p=shares)
    depth = rng.lognormal(0.0, _LIBRARY_DEPTH_SD)
    spread = rng.lognormal(-(_GENES_SD**2) / 2, _GENES_SD, n)
    n_genes = genes_mean[types] * depth * spread
    n_genes[kinds == 1] = rng.uniform(*_FEW_GENES, int((kinds == 1).sum()))
    mt_share = rng.uniform(*_MT_SHARE, n)
    mt_share[kinds == 2] = rng.uniform(*_HIGH_MT_SHARE, int((kinds == 2).sum()))
    n_doublets = int((kinds == 3).sum())
    partner = rng.choice(n_types, size=n_doublets, p=p)
    redraw = (partner == types[kinds == 3]) & (rng.random(n_doublets) < 0.9)
    partner[redraw] = rng.choice(n_types, size=int(redraw.sum()), p=p)
    spread = rng.lognormal(-(_GENES_SD**2) / 2, _GENES_SD, n_doublets)
    return {
        **{"types": types, "kinds": kinds, "fine": fine, "genes": n_genes, "mt": mt_share},
        "partner_types": partner,
        "partner_genes": genes_mean[partner] * depth * spread,
        "partner_mt": rng.uniform(*_MT_SHARE, n_doublets),
    }


def _library_blocks(
    rng: np.random.Generator, profiles: _Profiles, cells: Mapping[str, np.ndarray]
) -> Iterator[sparse.csr_matrix]:
    """Counts of a library's barcodes, ``_BLOCK_CELLS`` rows at a time (doublets summed)."""
    n = cells["types"].size
    doublets = np.flatnonzero(cells["kinds"] == 3)
    for lo in range(0, n, _BLOCK_CELLS):
        hi = min(lo + _BLOCK_CELLS, n)
        d = doublets[(doublets >= lo) & (doublets < hi)]
        p = np.searchsorted(doublets, d)
        block = _simulate(
            rng,
            profiles,
            *(np.concatenate([cells[k][lo:hi], cells[f"partner_{k}"][p]]) for k in _DRAWN),
        )
        counts, partners = block[: hi - lo], block[hi - lo :]
        if d.size:
            lengths = np.zeros(hi - lo, dtype=np.int64)
            lengths[d - lo] = np.diff(partners.indptr)
            indptr = np.concatenate([[0], np.cumsum(lengths)])
            counts = counts + sparse.csr_matrix(
                (partners.data, partners.indices, indptr), shape=counts.shape
            )
            counts.sort_indices()
        yield counts


def generate_rosmap_shaped(
    out_dir: str | Path,
    *,
    n_cells: int,
    seed: int = 0,
    cells_per_library: int = 2000,
    genes_per_cell: int = 2000,
    libraries_per_donor: float = 3.0,
    min_donors: int = 10,
    fraction_ad: float = 0.5,
    low_quality_fraction: float = 0.03,
    doublet_rate: float = 0.02,
    n_features: int = N_FEATURES_10X,
    columns: Mapping[str, str] | None = None,
    file_names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write ROSMAP-shaped raw files with ``n_cells`` nuclei into ``out_dir``, library by library.

    Parameters
    ----------
    out_dir
        Target folder (created); the files appear whole or not at all.
    n_cells
        Number of barcodes (nuclei, low-quality nuclei and doublets), exactly.
    seed
        Seed of the one random generator.
    cells_per_library
        Mean barcodes per library (libraries vary log-normally around it).
    genes_per_cell
        Mean detected genes of a normal nucleus (neurons more, glia fewer).
    libraries_per_donor
        Mean libraries per donor; every donor gets at least one.
    min_donors
        Lower bound on donors, so that a patient-level train/val/test split stays possible.
    fraction_ad
        Fraction of donors with ``Pathologic_diagnosis_of_AD == "yes"``.
    low_quality_fraction
        Fraction of barcodes that are low quality (half few genes, half high ``MT-`` share).
    doublet_rate
        Fraction of barcodes that are doublets.
    n_features
        Number of genes (10x GRCh38-3.0.0: 33,538).
    columns
        Raw column names (``params.yaml`` ``data.columns``); ROSMAP defaults for missing keys.
    file_names
        Names of the four files (``params.yaml`` ``raw:``); ROSMAP-like defaults when omitted.

    Returns
    -------
    A summary: cells, libraries, donors, features, nnz, UMIs, low-quality and doublet barcodes,
    annotated cells, seconds, and bytes on disk per file.
    """
    start = time.perf_counter()
    if n_cells < 1 or cells_per_library < 1 or genes_per_cell < 1:
        msg = "n_cells, cells_per_library and genes_per_cell must be at least 1."
        raise InputError(msg)
    if not 0.0 <= low_quality_fraction + doublet_rate < 1.0:
        msg = "low_quality_fraction + doublet_rate must lie in [0, 1)."
        raise InputError(msg)
    cols = {**DEFAULT_COLUMNS, **{k: v for k, v in (columns or {}).items() if k in DEFAULT_COLUMNS}}
    names = {**FILE_NAMES, **{k: v for k, v in (file_names or {}).items() if k in FILE_NAMES}}
    paths = {key: Path(out_dir) / name for key, name in names.items()}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    features = feature_table(n_features)
    profiles = _profiles(rng, features)
    n_libraries = max(1, round(n_cells / cells_per_library))
    n_donors = min(n_cells, max(min_donors, round(n_libraries / libraries_per_donor)))
    n_libraries = min(n_cells, max(n_libraries, n_donors))
    donors = _donor_table(rng, n_donors, fraction_ad)
    library_donor = np.repeat(
        np.arange(n_donors), _apportion(n_libraries, rng.lognormal(0.0, 0.3, n_donors))
    )
    library_cells = _apportion(n_cells, rng.lognormal(0.0, 0.25, n_libraries))
    library_names = [f"L{i + 1:04d}" for i in range(n_libraries)]
    base = np.array(list(CELL_TYPE_FRACTIONS.values()))
    ad_shift = np.array([{"Exc": 0.9, "Mic": 1.2, "Ast": 1.2}.get(t, 1.0) for t in CELL_TYPES])
    is_ad = (donors["Pathologic_diagnosis_of_AD"] == "yes").to_numpy()
    composition = [
        rng.dirichlet(_COMPOSITION_CONCENTRATION * base * (ad_shift if ad else 1.0)) for ad in is_ad
    ]
    factor = np.array([_GENES_FACTOR[t] for t in CELL_TYPES])
    genes_mean = genes_per_cell * factor / (factor @ base)
    lq = low_quality_fraction / 2
    kind_p = np.array([1.0 - 2 * lq - doublet_rate, lq, lq, doublet_rate])

    cell_names, cell_batch = [], []
    tally = dict.fromkeys(("nnz", "umis", *_KINDS), 0)
    with (
        streamed_h5ad(paths["counts"], n_vars=len(features)) as out,
        io.atomic_output(paths["cell_annotation"]) as annotation_tmp,
        annotation_tmp.open("w") as annotation,
    ):
        annotation.write(f"{cols['cell']}\t{cols['cell_type']}\t{cols['cell_type_fine']}\n")
        for lib, (library, n) in enumerate(zip(library_names, library_cells, strict=True)):
            p = composition[library_donor[lib]]
            cells = _draw_library(rng, n, p=p, genes_mean=genes_mean, kind_p=kind_p)
            for block in _library_blocks(rng, profiles, cells):
                out.append(block)
                tally["nnz"] += int(block.nnz)
                tally["umis"] += int(block.data.sum(dtype=np.float64))
            barcodes = np.char.add(np.char.add(f"{library}_", _barcodes(rng, n)), "-1")
            cell_names.append(barcodes)
            cell_batch.append(np.full(n, lib, dtype=np.int32))
            ok = cells["kinds"] == 0
            rows = zip(barcodes[ok], cells["types"][ok], cells["fine"][ok], strict=True)
            annotation.writelines(f"{c}\t{CELL_TYPES[t]}\t{f}\n" for c, t, f in rows)
            for k, kind in enumerate(_KINDS):
                tally[kind] += int((cells["kinds"] == k).sum())
            if (lib + 1) % max(1, n_libraries // 20) == 0 or lib + 1 == n_libraries:
                logger.info(
                    "library %d/%d: %d cells, %.1f s",
                    *(lib + 1, n_libraries, out.appender.n_obs, time.perf_counter() - start),
                )
        batch = pd.Categorical.from_codes(np.concatenate(cell_batch), categories=library_names)
        out.obs = pd.DataFrame(
            {cols["batch"]: batch}, index=pd.Index(np.concatenate(cell_names), dtype=str)
        )
        out.var = pd.DataFrame(index=features.index.copy())

    subjects = donors["subject"].to_numpy()[library_donor]
    mapping = pd.DataFrame({cols["library"]: library_names, cols["subject"]: subjects})
    io.write_tsv(mapping, paths["batch_mapping"])
    renames = {"subject": "subject", "msex": "sex", "age_death": "age"}
    renames |= {"Pathologic_diagnosis_of_AD": "pathologic_ad", "cogdx": "cogdx"}
    metadata = donors.sort_values("subject", kind="stable")
    io.write_tsv(
        metadata.rename(columns={k: cols[v] for k, v in renames.items()}),
        paths["individual_metadata"],
    )
    seconds = time.perf_counter() - start
    sizes = {key: path.stat().st_size for key, path in paths.items()}
    logger.info("wrote %s: %d cells, %d non-zeros, %.1f s", out_dir, n_cells, tally["nnz"], seconds)
    return {
        **{"cells": n_cells, "libraries": n_libraries, "donors": n_donors},
        **{"donors_ad": int(is_ad.sum()), "features": len(features), "nnz": tally["nnz"]},
        "nnz_per_cell": round(tally["nnz"] / n_cells, 1),
        "umis_per_cell": round(tally["umis"] / n_cells, 1),
        **{f"cells_{kind}": tally[kind] for kind in _KINDS},
        **{"seconds": round(seconds, 3), "cells_per_s": round(n_cells / seconds, 1)},
        **{"bytes": sizes, "bytes_total": sum(sizes.values())},
    }
