"""The demo data set itself: :class:`DemoData`, generating it and writing it in ROSMAP's layout.

:func:`generate_demo` draws the genes (:mod:`rosmap_geneformer.data.demo.genes`), the truth
tables, the donors and the expression model (:mod:`rosmap_geneformer.data.demo.simulation`), then
simulates every library's nuclei, low-quality cells and doublets. :func:`write_demo` writes the
four raw files and ``truth/``. Everything is drawn from one ``numpy.random.default_rng(seed)`` in
a fixed order, so the same arguments give the same files byte for byte; only the donors'
resilience and cell-type AD multipliers come from a second generator,
``numpy.random.default_rng([seed, 16])``, so that with ``resilient_fraction`` and
``cell_type_effect_sd`` at 0 the data set is the one drawn before those options existed.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse
from tqdm.auto import tqdm

from rosmap_geneformer import io
from rosmap_geneformer.data.demo.genes import select_genes
from rosmap_geneformer.data.demo.simulation import (
    CELL_TYPE_FRACTIONS,
    CELL_TYPES,
    COMPOSITION_CONCENTRATION,
    FINE_TYPES,
    ExpressionModel,
    build_model,
    draw_barcodes,
    draw_donors,
    effect_column,
    plant_ad_effects,
    simulate_units,
)
from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)

TRUTH_FILES = {
    "cells": "truth/cells.tsv",
    "genes": "truth/genes.tsv",
    "ad_genes": "truth/ad_genes.tsv",
    "grn": "truth/grn.tsv",
    "grn_decoys": "truth/grn_decoys.tsv",
    "donors": "truth/donors.tsv",
    "params": "truth/params.json",
}
RAW_FILE_KEYS = ("counts", "individual_metadata", "batch_mapping", "cell_annotation")

# Seeds the generator of the donors' resilience and cell-type multipliers, next to ``seed``.
_EFFECT_STREAM = 16

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
        Planted regulator -> target edges with weights, the cell types where each acts and its
        ``case``: ``program``, ``shared`` (a target of two regulators), ``cell_type_specific``
        (active in some of the regulator's types only), ``mediator`` (a target that regulates
        targets of its own) or ``cascade`` (the mediator's targets).
    truth_grn_decoys
        Regulator -> gene pairs that are not edges but that co-expression is expected to rank
        high (``case`` ``indirect``: the targets of a regulator's mediator, named in ``via``).
    truth_donors
        One row per donor (sorted by subject): ``ad_status`` (``AD``/``control``), ``resilient``,
        ``severity`` (after resilience), the AD effect per major type (``effect_<type>``) and
        ``ad_gene_effect``, the mean of ``|log2 fold change| x effect`` over the (AD gene, cell
        type it acts in) pairs: how strongly the donor's AD genes are shifted. 0 for controls.
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
    truth_grn_decoys: pd.DataFrame
    truth_donors: pd.DataFrame
    params: dict[str, Any]


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
    resilient_fraction: float = 0.0,
    cell_type_effect_sd: float = 0.0,
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
    resilient_fraction
        Share of AD donors (``round(resilient_fraction * n_AD)``, chosen at random) whose AD
        effect is weak: their severity is multiplied by a uniform draw from [0.05, 0.3].
    cell_type_effect_sd
        Log-scale standard deviation of a log-normal multiplier of the AD effect drawn per AD
        donor and major cell type (0: every cell type of a donor equally affected).
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
        Seed of the random generator everything is drawn from (and, with a second word, of the
        one the resilience and cell-type multipliers are drawn from).
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

    gene_table, specs = select_genes(
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
    truth_grn, truth_grn_decoys = _truth_network(rng, specs["programs"], ensembl_of)

    donors = draw_donors(
        rng,
        n_donors=n_donors,
        fraction_ad=fraction_ad,
        cells_per_donor=cells_per_donor,
        libraries_per_donor=libraries_per_donor,
    )
    model = build_model(rng, gene_table, specs, n_donors, truth_ad, truth_grn)
    donors = plant_ad_effects(
        np.random.default_rng([seed, _EFFECT_STREAM]),
        donors,
        resilient_fraction=resilient_fraction,
        cell_type_effect_sd=cell_type_effect_sd,
    )

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
        composition = rng.dirichlet(COMPOSITION_CONCENTRATION * fractions)
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
            counts = _simulate_in_stream(
                rng, model, donor=donor, donor_index=d, fine=unit_fine, kind=unit_kind
            )
            cell_counts = counts[:n]
            cell_counts[dbl] += counts[n:]
            barcodes = draw_barcodes(rng, n)
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
        "simulated %d donors (%d AD, %d of them resilient), %d libraries, %d cells x %d genes: "
        "%d doublets, %d low-quality cells, %d cells annotated",
        n_donors,
        int(donors["is_ad"].sum()),
        int(donors["resilient"].sum()),
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
        truth_grn_decoys=truth_grn_decoys,
        truth_donors=_truth_donors(donors, truth_ad),
        params={**params, "columns": cols},
    )


GRN_COLUMNS = ["tf", "tf_ensembl_id", "target", "target_ensembl_id", "weight", "cell_types", "case"]
DECOY_COLUMNS = ["tf", "tf_ensembl_id", "target", "target_ensembl_id", "via", "case"]


def _truth_network(
    rng: np.random.Generator, programs: Sequence[Mapping[str, Any]], ensembl_of: Mapping[str, str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The planted edges (weights drawn here) and the indirect pairs of the cascades."""
    rows, decoys = [], []
    for program in programs:
        weights = np.round(rng.uniform(0.5, 1.0, len(program["targets"])), 3)
        for target, weight, types, case in zip(
            program["targets"], weights, program["target_types"], program["cases"], strict=True
        ):
            rows.append(
                {
                    "tf": program["tf"],
                    "tf_ensembl_id": ensembl_of[program["tf"]],
                    "target": target,
                    "target_ensembl_id": ensembl_of[target],
                    "weight": float(weight),
                    "cell_types": ",".join(types),
                    "case": case,
                }
            )
            if "via" in program:
                decoys.append(
                    {
                        "tf": program["via"],
                        "tf_ensembl_id": ensembl_of[program["via"]],
                        "target": target,
                        "target_ensembl_id": ensembl_of[target],
                        "via": program["tf"],
                        "case": "indirect",
                    }
                )
    return pd.DataFrame(rows, columns=GRN_COLUMNS), pd.DataFrame(decoys, columns=DECOY_COLUMNS)


def _simulate_in_stream(
    rng: np.random.Generator,
    model: ExpressionModel,
    *,
    donor: pd.Series,
    donor_index: int,
    fine: np.ndarray,
    kind: np.ndarray,
) -> np.ndarray:
    """:func:`simulate_units`, leaving ``rng`` where the donor's severity alone would leave it.

    numpy's Poisson sampler takes a varying number of draws for large means, so an AD donor whose
    effect differs between cell types or is weakened would shift the main stream, and with it every
    later donor, controls included. Such a donor is simulated from a copy of the generator's state;
    the main stream then advances by the draw of the plain severity, as it did before resilience
    and cell-type multipliers existed. Changing those options changes the AD donors' counts only.
    """
    columns = [effect_column(c) for c in CELL_TYPES]
    plain = donor.copy()
    plain[columns] = donor["severity"]
    if np.array_equal(donor[columns].to_numpy(float), plain[columns].to_numpy(float)):
        return simulate_units(
            rng, model, donor=donor, donor_index=donor_index, fine=fine, kind=kind
        )
    branch = copy.deepcopy(rng)
    counts = simulate_units(
        branch, model, donor=donor, donor_index=donor_index, fine=fine, kind=kind
    )
    simulate_units(rng, model, donor=plain, donor_index=donor_index, fine=fine, kind=kind)
    return counts


def _truth_donors(donors: pd.DataFrame, truth_ad: pd.DataFrame) -> pd.DataFrame:
    """``truth/donors.tsv``: each donor's AD status and planted AD effects (see :class:`DemoData`)."""
    effects = donors[[effect_column(c) for c in CELL_TYPES]]
    pairs = [
        (abs(float(row.log2_fold_change)), effect_column(cell_type))
        for row in truth_ad.itertuples()
        for cell_type in row.cell_types.split(",")
    ]
    if pairs:
        gene_effect = sum(lfc * effects[column].to_numpy() for lfc, column in pairs) / len(pairs)
    else:
        gene_effect = np.zeros(len(donors))
    is_ad = donors["is_ad"].to_numpy(bool)
    table = pd.DataFrame(
        {
            "subject": donors["subject"].to_numpy(),
            "ad_status": np.where(is_ad, "AD", "control"),
            "resilient": donors["resilient"].to_numpy(bool),
            "severity": np.where(is_ad, donors["severity"] * donors["resilience"], 0.0),
            **{column: effects[column].to_numpy() for column in effects.columns},
            "ad_gene_effect": gene_effect,
        }
    )
    numbers = ["severity", *effects.columns, "ad_gene_effect"]
    table[numbers] = table[numbers].round(6)
    return table.sort_values("subject", kind="stable").reset_index(drop=True)


def _validate(params: Mapping[str, Any]) -> None:
    def bad(key: str, why: str) -> InputError:
        return InputError(f"params.yaml demo.{key}={params[key]!r}: {why}")

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
    for key in ("fraction_ad", "resilient_fraction"):
        if not 0.0 <= params[key] <= 1.0:
            raise bad(key, "must lie in [0, 1].")
    if not params["cell_type_effect_sd"] >= 0.0:
        raise bad("cell_type_effect_sd", "must be zero or a positive number.")
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
        raise InputError(msg)
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
    io.write_tsv(demo.truth_grn_decoys, paths["truth_grn_decoys"])
    io.write_tsv(demo.truth_donors, paths["truth_donors"])
    io.write_json(demo.params, paths["truth_params"])
    return paths
