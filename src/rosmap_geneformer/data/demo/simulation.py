"""The demo's cells: cell types, donors and the expression model that turns them into counts.

- Each fine cell type has a mean profile: a log-normal baseline over all genes with a per-type
  perturbation, marker genes strongly up in their type. A donor adds a small per-gene offset; AD
  donors scale the AD genes by ``2 ** (log2_fold_change * effect)`` in the named cell types.
  The effect is per donor and major cell type (:func:`plant_ad_effects`): a severity drawn per
  donor (mean 1), weakened in resilient donors, times a log-normal cell-type multiplier, so not
  every AD donor, nor every cell type of one donor, is hit equally.
- A TF program is a cell state: in the cell types where it can be active, each cell draws a latent
  activity ``a ~ N(0, 1)``, capped at 1.5, and the program is on where ``a > 0`` (half of the
  cells). Where it is on, the TF's mean scales with ``exp(1.4 a)`` and each target's mean with
  ``exp(weight * (1 + 2 a))``; where it is off, the TF is nearly silent (x 0.01) and its targets
  stay at their baseline. A target may respond in some of the TF's types only, or to two TFs
  (the effects multiply). A mediator (a TF's target) drives targets of its own with
  ``exp(weight * m)``, ``m`` its own log-scale response plus ``N(0, 0.5)`` noise, so they follow
  the mediator more closely than its TF. The demo's small model learns such a switch, which the
  TF marks, from a few thousand cells; from a graded co-variation alone (``exp(0.7 a)``) its
  deletions found no target.
- Counts are gamma-Poisson (negative binomial) around ``library size * profile``; ``MT-`` genes take
  1-3 % of a normal cell's counts. Low-quality cells have either a tiny library (multinomial, fewer
  than 150 UMIs, hence fewer than 150 genes) or 35-65 % mitochondrial counts. A doublet is the sum
  of two freshly simulated cells of the same library (different major types nine times in ten;
  drawn by :func:`rosmap_geneformer.data.demo.dataset.generate_demo`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.data.demo.genes import FINE_MARKERS, MARKERS

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
_MEDIATOR_NOISE = 0.5  # log-scale noise of a mediator's level, which its own targets follow
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
_RESILIENCE = (0.05, 0.3)  # a resilient AD donor keeps this share of its severity
COMPOSITION_CONCENTRATION = 60.0  # Dirichlet concentration of a donor's cell-type mix


# --------------------------------------------------------------------------------------------------
# Donors and metadata


def _age_bin(age: float) -> str:
    if age > 90:
        return "90+"
    upper = int(np.ceil(age / 5.0) * 5)
    return f"({upper - 5},{upper}]"


def draw_donors(
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


def effect_column(cell_type: str) -> str:
    """The donor table's (and ``truth/donors.tsv``'s) column of a major type's AD effect."""
    return f"effect_{cell_type}"


def plant_ad_effects(
    rng: np.random.Generator,
    donors: pd.DataFrame,
    *,
    resilient_fraction: float,
    cell_type_effect_sd: float,
) -> pd.DataFrame:
    """Per donor and major cell type, the factor that scales the AD genes' log2 fold changes.

    The effect of donor ``d`` in major type ``t`` is ``severity[d] * resilience[d] *
    multiplier[d, t]``: ``round(resilient_fraction * n_AD)`` AD donors, chosen at random, are
    resilient (``resilience ~ U(0.05, 0.3)``, else 1), and each AD donor x type draws
    ``multiplier ~ lognormal(0, cell_type_effect_sd)``. Controls get 0 everywhere.

    Parameters
    ----------
    rng
        A generator of its own, not the one the rest of the data set is drawn from: the main
        stream stays as it was, so with both options at 0 (every factor exactly 1) the data set is
        the one drawn before these options existed. The same draws are made whatever the options,
        so resilient donors at a larger fraction include those at a smaller one.
    donors
        From :func:`draw_donors` (``is_ad``, ``severity``).
    resilient_fraction
        Share of AD donors whose effect is weak.
    cell_type_effect_sd
        Log-scale standard deviation of the cell-type multipliers.

    Returns
    -------
    A copy of ``donors`` with ``resilient`` (bool), ``resilience`` (1 unless resilient) and one
    :func:`effect_column` per major type in :data:`CELL_TYPES`.
    """
    is_ad = donors["is_ad"].to_numpy(bool)
    ad_rows = np.flatnonzero(is_ad)
    order = rng.permutation(ad_rows)
    weakening = rng.uniform(*_RESILIENCE, len(donors))
    # Standard normals scaled by sd, so sd = 0 gives multipliers of exactly exp(0) = 1.
    normals = rng.standard_normal((len(donors), len(CELL_TYPES)))
    resilient = np.zeros(len(donors), dtype=bool)
    resilient[order[: round(resilient_fraction * ad_rows.size)]] = True
    resilience = np.where(resilient, weakening, 1.0)
    multiplier = np.exp(cell_type_effect_sd * normals)
    overall = np.where(is_ad, donors["severity"].to_numpy(float) * resilience, 0.0)
    out = donors.copy()
    out["resilient"] = resilient
    out["resilience"] = resilience
    for t, cell_type in enumerate(CELL_TYPES):
        out[effect_column(cell_type)] = overall * multiplier[:, t]
    return out


def draw_barcodes(rng: np.random.Generator, n: int) -> list[str]:
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
class ExpressionModel:
    """What the counts are drawn from: type profiles, donor offsets, AD shifts and TF programs."""

    fine_names: list[str]
    fine_major: np.ndarray  # fine type -> major type index
    fine_profiles: np.ndarray  # fine types x genes, nuclear weights (MT columns 0)
    mt_profile: np.ndarray  # genes, sums to 1 over MT genes
    is_mt: np.ndarray
    donor_offsets: np.ndarray  # donors x genes multiplicative
    ad_log2: np.ndarray  # major types x genes, log2 fold change (signed) at severity 1
    programs: list[dict[str, Any]]  # tf index, target indices, weights, active major types mask
    theta: np.ndarray  # genes


def build_model(
    rng: np.random.Generator,
    gene_table: pd.DataFrame,
    specs: Mapping[str, Any],
    n_donors: int,
    truth_ad: pd.DataFrame,
    truth_grn: pd.DataFrame,
) -> ExpressionModel:
    """Draw type and fine-type profiles, donor offsets, AD shifts and TF programs of the genes."""
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
        if "via" not in program:  # a mediator keeps the level its own TF gives it
            major[:, tf] = np.where(active, _TF_HIGH, _TF_LOW) * rng.lognormal(
                0.0, 0.2, len(CELL_TYPES)
            )
        edges = truth_grn[truth_grn["tf"] == program["tf"]]
        targets = np.array([index[s] for s in edges["target"]])
        responds = np.array(
            [np.isin(np.array(CELL_TYPES), types.split(",")) for types in edges["cell_types"]]
        ).T
        floor = np.where(responds, _PROGRAM_FLOOR, 0.0)
        major[:, targets] = np.maximum(major[:, targets], floor)
        programs.append(
            {
                "tf": tf,
                "targets": targets,
                "weights": edges["weight"].to_numpy(),
                "active": active,
                "responds": responds,
                "mediator": "via" in program,
            }
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
    return ExpressionModel(
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


def simulate_units(
    rng: np.random.Generator,
    model: ExpressionModel,
    *,
    donor: pd.Series,
    donor_index: int,
    fine: np.ndarray,
    kind: np.ndarray,
) -> np.ndarray:
    """Counts (float64, dense) for simulated nuclei of one donor.

    ``kind`` per unit: ``normal``, ``few_genes`` or ``high_mito``. ``donor`` carries ``depth``
    and the AD effect per major type (:func:`plant_ad_effects`).
    """
    n = fine.size
    major = model.fine_major[fine]
    weights = model.fine_profiles[fine] * model.donor_offsets[donor_index][None, :]
    effect = donor[[effect_column(c) for c in CELL_TYPES]].to_numpy(float)
    if (effect > 0).any():
        weights *= np.exp2(model.ad_log2[major] * effect[major][:, None])
    log_response = np.zeros_like(weights)
    for program in model.programs:
        if program["mediator"]:
            # The mediator's targets follow the mediator's own level (its response to its TF
            # plus noise of its own), not the TF's activity.
            level = log_response[:, program["tf"]]
            noisy = np.where(level > 0, level + rng.normal(0.0, _MEDIATOR_NOISE, n), 0.0)
            log_response[:, program["tf"]] = noisy
            responds = program["responds"][major] & (noisy > 0)[:, None]
            log_response[:, program["targets"]] += np.where(
                responds, program["weights"][None, :] * noisy[:, None], 0.0
            )
            continue
        activity = rng.normal(0.0, 1.0, n)
        on = program["active"][major]
        if not on.any():
            continue
        a = np.minimum(activity, _MAX_ACTIVITY)
        switched_on = on & (a > 0)
        log_response[on, program["tf"]] += np.where(
            switched_on[on], _TF_RESPONSE * a[on], np.log(_TF_OFF)
        )
        responds = program["responds"][major] & switched_on[:, None]
        log_response[:, program["targets"]] += np.where(
            responds, program["weights"][None, :] * (1 + _TARGET_RESPONSE * a[:, None]), 0.0
        )
    weights *= np.exp(log_response)
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
