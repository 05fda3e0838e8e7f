"""Gene regulatory network inference by in silico deletion.

For each regulator (a transcription factor), the cells that express it are taken (a seeded subset
of at most ``max_cells``), the regulator is deleted from each of them, and every remaining gene's
contextual embedding is compared with its embedding in the original cell (Geneformer's
``cell_and_gene`` mode, ``geneformer-spec.md`` section 7). The edge weight regulator -> target is
the mean over those cells of ``1 - cos``: how much deleting the regulator moves the target's
embedding. Candidate edges are regulator x genes present in at least ``min_cells`` of the
regulator's cells. The forward passes are the perturbation engine's
(:mod:`rosmap_geneformer.analysis.perturbation.engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from transformers import BertModel

from rosmap_geneformer import distributed
from rosmap_geneformer.analysis.perturbation.encodings import gene_slice
from rosmap_geneformer.analysis.perturbation.engine import (
    DEFAULT_MAX_TOKENS,
    EngineStats,
    perturb_cells,
)
from rosmap_geneformer.errors import InputError

# --------------------------------------------------------------------------------------------
# Inference


def regulator_cells(
    cells: Sequence[Sequence[int]],
    regulators: Sequence[int],
    *,
    max_cells: int | None,
    special_tokens: bool,
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """For each regulator token, the indices of cells that contain it (seeded subset, sorted).

    Parameters
    ----------
    cells
        Token lists.
    regulators
        Regulator tokens.
    max_cells
        Cap per regulator; ``None``: all.
    special_tokens
        V2 layout (``<cls>``/``<eos>`` are not genes).
    seed
        Seed of the subset; each regulator draws from its own stream, so adding a regulator
        does not change the others' cells.
    """
    wanted = np.asarray(sorted(set(int(r) for r in regulators)), dtype=np.int64)
    hits: dict[int, list[int]] = {int(r): [] for r in wanted}
    for c, ids in enumerate(cells):
        ids = np.asarray(ids)
        present = np.intersect1d(ids[gene_slice(len(ids), special_tokens=special_tokens)], wanted)
        for r in present.tolist():
            hits[r].append(c)
    out = {}
    for r in wanted.tolist():
        members = np.asarray(hits[r], dtype=np.int64)
        if max_cells is not None and members.size > max_cells:
            rng = np.random.default_rng([seed, r])
            members = np.sort(rng.choice(members, size=max_cells, replace=False))
        out[r] = members
    return out


@dataclass
class GRNResult:
    """Edges inferred by deletion.

    Attributes
    ----------
    edges
        One row per candidate edge: ``regulator``, ``target`` (tokens), ``weight`` (mean
        ``1 - cos``), ``n_cells`` (cells in which the target was present with the regulator).
    cells
        Regulator token -> cell indices used.
    engine
        Forward-pass counters.
    """

    edges: pd.DataFrame
    cells: dict[int, np.ndarray]
    engine: EngineStats


CONTROLS = ("neighbor", "none")


def infer_grn(
    encoder: BertModel,
    cells: Sequence[Sequence[int]],
    regulators: Sequence[int],
    *,
    layer_index: int,
    special_tokens: bool,
    max_cells: int | None = 100,
    min_cells: int = 5,
    control: str = "neighbor",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    pad_token_id: int = 0,
    precision: str = "auto",
    seed: int = 0,
    progress: bool = True,
    processes: distributed.Processes | None = None,
) -> GRNResult:
    """Delete each regulator in the cells that express it and score every remaining gene.

    Parameters
    ----------
    encoder
        A ``BertModel`` in eval mode.
    cells
        Token lists (all candidate cells; each regulator picks its own).
    regulators
        Regulator tokens.
    layer_index
        ``hidden_states`` entry to read.
    special_tokens
        V2 layout.
    max_cells
        Cells per regulator (seeded subset).
    min_cells
        A target is a candidate when present in at least this many of the regulator's cells.
    control
        ``"none"``: the weight is Geneformer's plain gene-mode shift, mean ``1 - cos``.
        ``"neighbor"``: the same cells also get the gene ranked right below the regulator (or
        right above, at the end of the cell) deleted, and the weight is the regulator's shift
        minus that control's shift for the same target. A deletion moves every later gene one
        position up, which changes its embedding whatever the regulator is; the neighbour's
        deletion moves the same genes, so the difference keeps the regulator's own effect.
        Costs twice the forward passes. Both weights are returned.
    max_tokens, pad_token_id, precision
        See :func:`rosmap_geneformer.analysis.perturbation.engine.perturb_cells`.
    seed
        Seed of the cell subsets.
    progress
        Show a progress bar.
    processes
        Under a launcher: the deletions are shared out (see ``perturb_cells``); every process
        returns the same edges.

    Returns
    -------
    Edges with ``weight`` (controlled when ``control="neighbor"``), ``raw_weight`` (mean
    ``1 - cos``) and ``n_cells``.
    """
    if control not in CONTROLS:
        msg = f"control={control!r}: use one of {list(CONTROLS)}."
        raise InputError(msg)
    chosen = regulator_cells(
        cells, regulators, max_cells=max_cells, special_tokens=special_tokens, seed=seed
    )
    per_cell: dict[int, set[int]] = {}
    for r, members in chosen.items():
        for c in members.tolist():
            per_cell.setdefault(c, set()).add(r)
    positions: list[np.ndarray] = []
    # Per cell: regulator token -> control token (the neighbour deleted alongside).
    controls: dict[int, dict[int, int]] = {}
    for c, ids in enumerate(cells):
        wanted = per_cell.get(c)
        if not wanted:
            positions.append(np.zeros(0, dtype=np.int64))
            continue
        ids = np.asarray(ids)
        window = gene_slice(len(ids), special_tokens=special_tokens)
        where = np.flatnonzero(np.isin(ids[window], list(wanted))) + window.start
        if control == "neighbor":
            pairs = {}
            for p in where.tolist():
                q = p + 1 if p + 1 < window.stop else p - 1
                if q >= window.start:
                    pairs[int(ids[p])] = int(ids[q])
            controls[c] = pairs
            where = np.unique(
                np.concatenate([where, [int(np.flatnonzero(ids == t)[0]) for t in pairs.values()]])
            ).astype(np.int64)
        positions.append(where)
    vocab = 1 + max((int(np.max(ids)) for ids in cells if len(ids)), default=0)
    index = {r: k for k, r in enumerate(sorted(chosen))}
    raw_sums = np.zeros((len(index), vocab), dtype=np.float64)
    raw_counts = np.zeros((len(index), vocab), dtype=np.int64)
    ctl_sums = np.zeros((len(index), vocab), dtype=np.float64)
    ctl_counts = np.zeros((len(index), vocab), dtype=np.int64)
    engine = EngineStats()
    for result in perturb_cells(
        encoder,
        cells,
        positions,
        perturb_type="delete",
        layer_index=layer_index,
        special_tokens=special_tokens,
        gene_mode=True,
        max_tokens=max_tokens,
        pad_token_id=pad_token_id,
        precision=precision,
        progress=progress,
        engine_stats=engine,
        processes=processes,
    ):
        row_of = {t: k for k, t in enumerate(result.tokens.tolist())}
        wanted = per_cell[result.cell]
        for r in sorted(wanted & set(row_of)):
            k = row_of[r]
            targets = result.gene_tokens[k]
            shift = 1.0 - result.gene_cosines[k]
            row = index[r]
            np.add.at(raw_sums[row], targets, shift)
            np.add.at(raw_counts[row], targets, 1)
            if control == "neighbor" and r in controls[result.cell]:
                j = row_of[controls[result.cell][r]]
                baseline = np.full(vocab, np.nan)
                baseline[result.gene_tokens[j]] = 1.0 - result.gene_cosines[j]
                diff = shift - baseline[targets]
                ok = ~np.isnan(diff)
                np.add.at(ctl_sums[row], targets[ok], diff[ok])
                np.add.at(ctl_counts[row], targets[ok], 1)
    frames = []
    for r, row in index.items():
        counts = ctl_counts[row] if control == "neighbor" else raw_counts[row]
        targets = np.flatnonzero(counts >= max(min_cells, 1))
        targets = targets[targets != r]
        raw = raw_sums[row, targets] / np.maximum(raw_counts[row, targets], 1)
        weight = ctl_sums[row, targets] / counts[targets] if control == "neighbor" else raw
        frames.append(
            pd.DataFrame(
                {
                    "regulator": r,
                    "target": targets,
                    "weight": weight,
                    "raw_weight": raw,
                    "n_cells": counts[targets],
                }
            )
        )
    columns = ["regulator", "target", "weight", "raw_weight", "n_cells"]
    edges = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    edges = edges.sort_values(
        ["regulator", "weight", "target"], ascending=[True, False, True], kind="stable"
    ).reset_index(drop=True)
    return GRNResult(edges=edges, cells=chosen, engine=engine)
