"""Shifts of perturbed cells towards cell states, and their statistics.

Towards states: ``cos(perturbed, E_s) - cos(original, E_s)`` for the centroid ``E_s`` of a
state's cell embeddings (same model, same layer), from the embeddings of
:func:`rosmap_geneformer.analysis.perturbation.engine.perturb_cells`.

Statistics follow ``InSilicoPerturberStats(mode="goal_state_shift")``: each gene's shifts against
the pooled shifts of all genes (downsampled with a seed), Wilcoxon rank-sum test, Benjamini-Hochberg
FDR; :func:`perturbation_table` ranks the genes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from rosmap_geneformer.analysis.perturbation.engine import CellPerturbations, cosine
from rosmap_geneformer.errors import InputError

RANK_BY = ("goal", "net")
# Key of the net shift (towards the goal minus towards the start state) among the state shifts.
NET = "net"
# Geneformer's null size for goal_state_shift.
DEFAULT_NULL_SIZE = 100_000


# --------------------------------------------------------------------------------------------
# Shifts towards cell states and statistics


def state_shifts(
    perturbed: np.ndarray, original: np.ndarray, centroids: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``cos(perturbed, E_s) - cos(original, E_s)`` for every state ``s``.

    Parameters
    ----------
    perturbed
        Perturbed cell embeddings (perturbations x hidden).
    original
        The original cell embedding (hidden,).
    centroids
        State -> centroid embedding (hidden,).
    """
    out = {}
    for state, centroid in centroids.items():
        base = cosine(original, centroid)
        out[state] = cosine(perturbed, centroid[None, :]) - base
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (FDR), as ``statsmodels`` ``fdr_bh``.

    NaN p-values stay NaN and do not count towards the number of tests.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    n = order.size
    ranked = p[order] * n / np.arange(1, n + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out[order] = np.clip(adjusted, 0.0, 1.0)
    return out


def pooled_null(
    shifts: Mapping[Any, np.ndarray], *, size: int = DEFAULT_NULL_SIZE, seed: int = 0
) -> np.ndarray:
    """All genes' shifts pooled, downsampled without replacement to ``size`` with a seed.

    Genes are pooled in sorted key order, so the null depends only on the data and the seed.
    """
    keys = sorted(shifts)
    if not keys:
        return np.zeros(0)
    pooled = np.concatenate([np.asarray(shifts[k], dtype=np.float64) for k in keys])
    if pooled.size > size:
        rng = np.random.default_rng(seed)
        pooled = pooled[np.sort(rng.choice(pooled.size, size=size, replace=False))]
    return pooled


def shift_statistics(
    shifts: Mapping[Any, np.ndarray],
    *,
    null: np.ndarray | None = None,
    null_size: int = DEFAULT_NULL_SIZE,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-gene mean shift, rank-sum p-value against the pooled null, and BH FDR.

    Parameters
    ----------
    shifts
        Gene -> its per-cell shifts.
    null
        The null sample; ``None``: :func:`pooled_null` of ``shifts``.
    null_size, seed
        Size and seed of the pooled null.

    Returns
    -------
    Indexed by gene (sorted): ``mean_shift``, ``p``, ``fdr``, ``n_cells``.
    """
    if null is None:
        null = pooled_null(shifts, size=null_size, seed=seed)
    keys = sorted(shifts)
    means, pvalues, n_cells = [], [], []
    for key in keys:
        values = np.asarray(shifts[key], dtype=np.float64)
        means.append(values.mean() if values.size else np.nan)
        n_cells.append(values.size)
        if values.size and null.size:
            pvalues.append(float(stats.ranksums(values, null).pvalue))
        else:
            pvalues.append(np.nan)
    frame = pd.DataFrame(
        {"mean_shift": means, "p": pvalues, "n_cells": n_cells},
        index=pd.Index(keys, name="gene"),
    )
    frame["fdr"] = benjamini_hochberg(frame["p"].to_numpy())
    return frame[["mean_shift", "p", "fdr", "n_cells"]]


def perturbation_table(
    shifts: Mapping[str, Mapping[int, np.ndarray]],
    cell_cosines: Mapping[int, np.ndarray],
    *,
    goal_state: str,
    rank_by: str = "goal",
    null_size: int = DEFAULT_NULL_SIZE,
    seed: int = 0,
    nulls: Mapping[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Ranked per-gene table from per-cell shifts.

    Parameters
    ----------
    shifts
        State -> gene token -> per-cell shifts towards that state.
    cell_cosines
        Gene token -> per-cell ``cos(perturbed, original)``.
    goal_state
        The goal state.
    rank_by
        ``"goal"``: order by the mean shift towards the goal (Geneformer), largest first;
        ``"net"``: by the mean net shift (``shifts["net"]``, goal minus start).
    null_size, seed
        Pooled null (one per state, same seed).
    nulls
        State -> null sample to test against instead of the pooled shifts (the deletion
        screen's exact grid deletions).

    Returns
    -------
    Indexed by token: ``mean_shift``, ``p``, ``fdr``, ``n_cells`` for the goal state, then
    ``<state>_mean_shift``, ``<state>_p``, ``<state>_fdr`` for each other state (``net_...``
    for the net shift), and ``mean_cosine_to_original``; ties by token.
    """
    if rank_by not in RANK_BY:
        msg = f"rank_by={rank_by!r}: use one of {list(RANK_BY)}."
        raise InputError(msg)
    if rank_by == "net" and NET not in shifts:
        msg = "rank_by='net' needs the start state's centroid (the net shift)."
        raise InputError(msg)
    nulls = nulls or {}
    goal = shift_statistics(
        shifts[goal_state], null=nulls.get(goal_state), null_size=null_size, seed=seed
    )
    table = goal.copy()
    for state in sorted(s for s in shifts if s not in (goal_state, NET)) + (
        [NET] if NET in shifts else []
    ):
        other = shift_statistics(
            shifts[state], null=nulls.get(state), null_size=null_size, seed=seed
        )
        table[f"{state}_mean_shift"] = other["mean_shift"]
        table[f"{state}_p"] = other["p"]
        table[f"{state}_fdr"] = other["fdr"]
    table["mean_cosine_to_original"] = pd.Series(
        {t: float(np.mean(v)) for t, v in cell_cosines.items()}
    )
    table = table.reset_index()
    key = "mean_shift" if rank_by == "goal" else f"{NET}_mean_shift"
    table = table.sort_values([key, "gene"], ascending=[False, True], kind="stable")
    return table.set_index("gene")


# --------------------------------------------------------------------------------------------
# Per-cell results to the per-gene table


# One cell's deleted tokens, shifts per state and cos(perturbed, original).
CellShifts = tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]


def per_gene_table(
    per_cell: Sequence[CellShifts],
    *,
    goal_state: str,
    rank_by: str,
    null_size: int,
    seed: int,
    nulls: Mapping[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """The ranked per-gene table of per-cell results (values in the order of ``per_cell``)."""
    per_state: dict[str, dict[int, list[np.ndarray]]] = {}
    cos_original: dict[int, list[np.ndarray]] = {}
    for tokens, shifts, cosines in per_cell:
        for k, token in enumerate(tokens.tolist()):
            for state, values in shifts.items():
                per_state.setdefault(state, {}).setdefault(token, []).append(values[k : k + 1])
            cos_original.setdefault(token, []).append(cosines[k : k + 1])
    collected = {
        state: {t: np.concatenate(v) for t, v in values.items()}
        for state, values in per_state.items()
    }
    return perturbation_table(
        collected,
        {t: np.concatenate(v) for t, v in cos_original.items()},
        goal_state=goal_state,
        rank_by=rank_by,
        null_size=null_size,
        seed=seed,
        nulls=nulls,
    )


def with_net(shifts: dict[str, np.ndarray], net: tuple[str, str] | None) -> dict[str, np.ndarray]:
    """Add the net shift (towards ``net[0]`` minus towards ``net[1]``) when ``net`` is given."""
    if net is not None:
        shifts[NET] = shifts[net[0]] - shifts[net[1]]
    return shifts


def measured_shifts(
    result: CellPerturbations, centroids: Mapping[str, np.ndarray], net: tuple[str, str] | None
) -> CellShifts:
    """Tokens, shifts towards each state (and the net shift) and cosines of one cell's run."""
    shifts = with_net(state_shifts(result.perturbed, result.original, centroids), net)
    return result.tokens, shifts, result.cell_cosines
