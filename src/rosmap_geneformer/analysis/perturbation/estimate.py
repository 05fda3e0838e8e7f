"""A fast first pass of in silico deletion: every gene's shift in every cell, estimated from a few
exact deletions and one backward pass per readout (``params.yaml: perturb.screen``).

Deleting a gene does two things to a cell: the gene's token leaves the attention and the cell
mean, and every token after it moves up one position. On the demo's fine-tuned model (a Mic cell,
the shift towards a state) the move made almost all of the shift (-0.064 of -0.063); it depends
on where the deleted gene sits, smoothly, not on which gene it is. The removal itself is specific
to the gene, small, and close to linear in a weight on the token. A first-order estimate of the
whole deletion (positions interpolated too) ranked the genes at Spearman 0.27 only, so the two
parts are estimated differently, per cell:

1. the deletions at ``grid`` perturbed positions spread evenly over the cell are run exactly
   (:func:`~rosmap_geneformer.analysis.perturbation.engine.perturb_cells`);
2. the gene's own part: every token gets a weight ``g``, ``log g`` added to each attention logit
   towards it and ``g`` its weight in the cell mean (``g = 0`` removes it exactly); the derivative
   of each readout at ``g = 1``, from one backward pass per readout, is its first-order estimate
   (the Taylor estimate of a removal of Molchanov et al., ICLR 2017, applied to the attention
   suppression of AtMan, Deb et al., NeurIPS 2023);
3. the rest (exact minus own part at the grid: the move of the later tokens) is interpolated
   linearly along the position; the estimate is the own part plus that. At the grid positions it
   is the exact value.

Readouts: the shift towards each state, ``cos(perturbed, E_s) - cos(original, E_s)``, and
``cos(perturbed, original)``, which has no first-order term and is interpolated only. The backward
pass holds the activations of one cell (all layers read): memory grows with length squared.

:func:`estimate_then_confirm` is the perturb stage's use of it (:class:`ScreenSettings`): estimate
every deletion, then run exactly the genes at both ends of the estimated ranking and those whose
estimated FDR is low, testing against the exact grid deletions as the null.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import BertModel

from rosmap_geneformer import distributed
from rosmap_geneformer.analysis.embeddings import truncate_encoder
from rosmap_geneformer.analysis.perturbation.engine import (
    DEFAULT_MAX_TOKENS,
    EngineStats,
    perturb_cells,
)
from rosmap_geneformer.analysis.perturbation.statistics import (
    NET,
    CellShifts,
    measured_shifts,
    per_gene_table,
    pooled_null,
    state_shifts,
    with_net,
)
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.params import check_known_keys

logger = logging.getLogger(__name__)

DEFAULT_GRID = 16


SCREEN_METHODS = ("exact", "estimate")


@dataclass(frozen=True)
class ScreenSettings:
    """``params.yaml: perturb.screen``: how deletions are found.

    Attributes
    ----------
    method
        ``exact``: every deletion of every cell is a forward pass (Geneformer's way, the
        default). ``estimate``: every deletion is first estimated (:func:`estimate_deletions`),
        then the genes at both ends of the ranking are run exactly in every cell
        (:func:`estimate_then_confirm`; overexpression is always exact).
    grid
        Exact deletions per cell for the estimate.
    confirm
        Fraction of the genes, at each end of the estimated ranking, run exactly afterwards.
    confirm_fdr
        Genes whose FDR on the estimates is below this are run exactly too, so that the calls
        rest on exact shifts (0: none).
    """

    method: str = "exact"
    grid: int = DEFAULT_GRID
    confirm: float = 0.05
    confirm_fdr: float = 0.25

    @classmethod
    def from_params(cls, values: Mapping[str, Any] | None) -> ScreenSettings:
        """Build from ``params.yaml: perturb.screen`` (unknown keys are an error)."""
        values = dict(values or {})
        check_known_keys(values, cls.__dataclass_fields__, section="perturb.screen")
        settings = cls(**values)
        if settings.method not in SCREEN_METHODS:
            msg = (
                f"params.yaml perturb.screen.method={settings.method!r}: use one of "
                f"{list(SCREEN_METHODS)}."
            )
            raise InputError(msg)
        if not 0 < settings.confirm <= 0.5:
            msg = (
                f"params.yaml perturb.screen.confirm={settings.confirm}: use a fraction in "
                "(0, 0.5] (the genes run exactly at each end of the ranking)."
            )
            raise InputError(msg)
        if settings.grid < 2:
            msg = f"params.yaml perturb.screen.grid={settings.grid}: use at least 2."
            raise InputError(msg)
        if not 0 <= settings.confirm_fdr <= 1:
            msg = (
                f"params.yaml perturb.screen.confirm_fdr={settings.confirm_fdr}: use a value in "
                "[0, 1] (0: confirm the ends of the ranking only)."
            )
            raise InputError(msg)
        return settings


@dataclass
class EstimatedCell:
    """Estimated deletions of one cell.

    Attributes
    ----------
    cell
        Index of the cell in the input of :func:`estimate_deletions`.
    tokens
        The deleted gene tokens, in the order of the positions given.
    shifts
        State -> estimated shift towards it, per deletion.
    cell_cosines
        Estimated ``cos(perturbed, original)`` per deletion.
    exact
        Which deletions were run exactly (the grid).
    """

    cell: int
    tokens: np.ndarray
    shifts: dict[str, np.ndarray]
    cell_cosines: np.ndarray
    exact: np.ndarray


@dataclass
class EstimateStats:
    """Counters of :func:`estimate_deletions` (for the stage report and the benchmark)."""

    estimated: int = 0
    backward_passes: int = 0
    gradient_seconds: float = 0.0
    engine: EngineStats = field(default_factory=EngineStats)


def grid_indices(count: int, grid: int) -> np.ndarray:
    """Indices of ``grid`` of ``count`` ordered positions, evenly spread, first and last included
    (all of them when ``count <= grid``)."""
    if grid < 2:
        msg = f"perturb.screen.grid={grid}: use at least 2 (the first and last positions)."
        raise InputError(msg)
    if count <= grid:
        return np.arange(count)
    return np.unique(np.round(np.linspace(0, count - 1, grid)).astype(np.int64))


def own_effects(
    encoder: BertModel,
    input_ids: Sequence[int],
    centroids: Mapping[str, np.ndarray],
    *,
    layer_index: int,
    special_tokens: bool,
) -> dict[str, np.ndarray]:
    """First-order estimate, per position, of removing that token from the attention and the mean.

    Parameters
    ----------
    encoder
        A ``BertModel`` in eval mode.
    input_ids
        One cell's tokens.
    centroids
        State -> centroid embedding; one backward pass each.
    layer_index
        ``hidden_states`` entry read.
    special_tokens
        V2 layout: the readout is the ``<cls>`` vector; else the mean over the genes.

    Returns
    -------
    State -> estimated ``cos(without token, E_s) - cos(cell, E_s)`` for every position (the
    positions do not move: that part is measured by the grid).
    """
    device = next(encoder.parameters()).device
    view = truncate_encoder(encoder, layer_index)
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64), device=device)[None]
    length = ids.shape[1]
    weight = torch.ones((1, length), device=device, requires_grad=True)
    with torch.enable_grad():
        hidden = view.embeddings(input_ids=ids)
        bias = torch.log(weight)[:, None, None, :]
        hidden = view.encoder(hidden, attention_mask=bias).last_hidden_state
        if special_tokens:
            cell = hidden[0, 0]
        else:
            cell = (hidden[0] * weight[0, :, None]).sum(dim=0) / weight.sum()
        cell = cell.double()
        out = {}
        names = list(centroids)
        for k, state in enumerate(names):
            target = torch.as_tensor(np.asarray(centroids[state]), device=device).double()
            readout = torch.nn.functional.cosine_similarity(cell, target, dim=0, eps=1e-12)
            (grad,) = torch.autograd.grad(readout, weight, retain_graph=k < len(names) - 1)
            out[state] = -grad[0].double().cpu().numpy()
    return out


def shared_own_effects(
    encoder: BertModel,
    cells: Sequence[Sequence[int]],
    positions: Sequence[np.ndarray],
    centroids: Mapping[str, np.ndarray],
    *,
    layer_index: int,
    special_tokens: bool,
    progress: bool,
    stats: EstimateStats,
    processes: distributed.Processes | None,
) -> dict[int, dict[str, np.ndarray]]:
    """:func:`own_effects` at ``positions`` of every cell that has some, the cells shared out
    over the launcher's processes and gathered on every rank (cell -> state -> values)."""
    processes = processes or distributed.Processes()
    todo = [i for i, pos in enumerate(positions) if len(pos)]

    def backward(i: int) -> tuple[dict[str, np.ndarray], float]:
        start = time.perf_counter()
        own = own_effects(
            encoder, cells[i], centroids, layer_index=layer_index, special_tokens=special_tokens
        )
        return {state: values[positions[i]] for state, values in own.items()}, (
            time.perf_counter() - start
        )

    shared = distributed.ordered_across_processes(todo, backward, processes)
    out = {}
    for i, (own, seconds) in zip(
        todo,
        tqdm(shared, total=len(todo), desc="backward passes", unit="cell", disable=not progress),
        strict=True,
    ):
        out[i] = own
        stats.gradient_seconds += seconds  # summed over the processes: compute, not wall time
        stats.backward_passes += len(centroids)
    return out


def estimate_deletions(
    encoder: BertModel,
    cells: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    centroids: Mapping[str, np.ndarray],
    *,
    layer_index: int,
    special_tokens: bool,
    grid: int = DEFAULT_GRID,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    pad_token_id: int = 0,
    precision: str = "auto",
    progress: bool = True,
    stats: EstimateStats | None = None,
    processes: distributed.Processes | None = None,
) -> Iterator[EstimatedCell]:
    """Estimate every single-gene deletion of many cells (see the module docstring).

    Parameters
    ----------
    encoder
        A ``BertModel`` in eval mode.
    cells
        Token lists.
    positions
        Per cell, the positions to delete, one deletion each, in increasing order.
    centroids
        State -> centroid embedding (same model and layer).
    layer_index, special_tokens, max_tokens, pad_token_id, precision, progress, processes
        As :func:`~rosmap_geneformer.analysis.perturbation.engine.perturb_cells` (``precision``
        applies to the exact grid; the backward pass runs in float32). Under a launcher the
        backward passes (one cell a unit) and the exact grid are both shared out.
    grid
        Exact deletions per cell.
    stats
        Filled with counters when given.

    Yields
    ------
    One :class:`EstimatedCell` per cell with at least one position, longest cell first.
    """
    if len(cells) != len(positions):
        msg = f"{len(cells)} cells but {len(positions)} position lists."
        raise InputError(msg)
    stats = stats if stats is not None else EstimateStats()
    positions = [np.asarray(p, dtype=np.int64) for p in positions]
    for i, pos in enumerate(positions):
        if pos.size > 1 and np.any(np.diff(pos) <= 0):
            msg = f"cell {i}: positions to delete must increase, got {pos.tolist()[:10]}..."
            raise InputError(msg)
    at_grid = [grid_indices(len(p), grid) for p in positions]
    own_by_cell = shared_own_effects(
        encoder,
        cells,
        positions,
        centroids,
        layer_index=layer_index,
        special_tokens=special_tokens,
        progress=progress,
        stats=stats,
        processes=processes,
    )
    for result in perturb_cells(
        encoder,
        cells,
        [p[g] for p, g in zip(positions, at_grid, strict=True)],
        perturb_type="delete",
        layer_index=layer_index,
        special_tokens=special_tokens,
        max_tokens=max_tokens,
        pad_token_id=pad_token_id,
        precision=precision,
        progress=progress,
        engine_stats=stats.engine,
        processes=processes,
    ):
        i = result.cell
        pos, grid_at = positions[i], at_grid[i]
        exact_shifts = state_shifts(result.perturbed, result.original, centroids)
        own = own_by_cell.pop(i)
        shifts = {}
        for state, exact in exact_shifts.items():
            own_here = own[state]
            shifts[state] = own_here + np.interp(pos, pos[grid_at], exact - own_here[grid_at])
            shifts[state][grid_at] = exact
        cosines = np.interp(pos, pos[grid_at], result.cell_cosines)
        cosines[grid_at] = result.cell_cosines
        exact_mask = np.zeros(len(pos), dtype=bool)
        exact_mask[grid_at] = True
        stats.estimated += int((~exact_mask).sum())
        yield EstimatedCell(
            cell=i,
            tokens=np.asarray(cells[i])[pos],
            shifts=shifts,
            cell_cosines=cosines,
            exact=exact_mask,
        )


def estimate_then_confirm(
    encoder: BertModel,
    cells: Sequence[Sequence[int]],
    positions: list[np.ndarray],
    centroids: Mapping[str, np.ndarray],
    *,
    net: tuple[str, str] | None,
    screen: ScreenSettings,
    engine: EngineStats,
    run: dict[str, Any],
    tests: dict[str, Any],
) -> tuple[list[CellShifts], dict[str, Any]]:
    """Estimate every deletion, then run exactly the genes at both ends of the estimated ranking
    and those whose estimated FDR is below ``screen.confirm_fdr``.

    Returns the per-cell results (longest cell first, as the exact engine) and the screen report
    (with ``confirmed_genes``, the tokens run exactly in every cell).
    """
    stats = EstimateStats(engine=engine)
    estimated = list(
        estimate_deletions(
            encoder, cells, positions, centroids, grid=screen.grid, stats=stats, **run
        )
    )
    per_cell = [(e.tokens, with_net(dict(e.shifts), net), e.cell_cosines) for e in estimated]
    # The null of the tests: the exact grid deletions, a sample of every cell spread over its
    # positions (estimates would widen or narrow it).
    nulls = (
        {
            state: pooled_null(
                {
                    e.cell: shifts[state][e.exact]
                    for e, (_, shifts, _) in zip(estimated, per_cell, strict=True)
                },
                size=tests["null_size"],
                seed=tests["seed"],
            )
            for state in per_cell[0][1]
        }
        if per_cell
        else {}
    )
    estimated_table = per_gene_table(per_cell, **tests, nulls=nulls)
    ranked = estimated_table.index.tolist()  # by the ranking column, largest first
    n_confirm = min(len(ranked), int(np.ceil(screen.confirm * len(ranked))))
    fdr_column = "fdr" if tests["rank_by"] == "goal" else f"{NET}_fdr"
    maybe_called = estimated_table.index[estimated_table[fdr_column] < screen.confirm_fdr]
    ends = set(ranked[:n_confirm]) | set(ranked[-n_confirm:])
    confirmed = np.array(sorted(ends | set(maybe_called.tolist())), np.int64)
    where = {e.cell: k for k, e in enumerate(estimated)}
    todo = [np.zeros(0, np.int64)] * len(cells)
    rows = {}
    for e in estimated:
        rows[e.cell] = np.flatnonzero(np.isin(e.tokens, confirmed) & ~e.exact)
        todo[e.cell] = positions[e.cell][rows[e.cell]]
    grid_passes = engine.forward_passes
    grid_perturbations = engine.perturbations
    for result in perturb_cells(
        encoder, cells, todo, perturb_type="delete", engine_stats=engine, **run
    ):
        _, shifts, cosines = per_cell[where[result.cell]]
        _, exact, exact_cosines = measured_shifts(result, centroids, net)
        for state, values in exact.items():
            shifts[state][rows[result.cell]] = values
        cosines[rows[result.cell]] = exact_cosines
    # Times go to the log only: the report is a cached output and must not change between runs.
    logger.info(
        "estimate: %d deletions estimated (%d exact on the grid, %.1f s in backward passes); "
        "%d genes confirmed exactly (%d deletions)",
        stats.estimated,
        grid_perturbations,
        stats.gradient_seconds,
        confirmed.size,
        engine.perturbations - grid_perturbations,
    )
    report = {
        "method": "estimate",
        "grid": screen.grid,
        "confirm": screen.confirm,
        "estimated_perturbations": stats.estimated,
        "exact_grid_perturbations": grid_perturbations,
        "exact_confirmation_perturbations": engine.perturbations - grid_perturbations,
        "forward_passes": {
            "grid": grid_passes,
            "confirmation": engine.forward_passes - grid_passes,
        },
        "backward_passes": stats.backward_passes,
        "confirm_fdr": screen.confirm_fdr,
        "genes_confirmed": int(confirmed.size),
        "genes_confirmed_for_their_estimated_fdr": len(set(maybe_called.tolist()) - ends),
        "null": "exact grid deletions",
        "confirmed_genes": confirmed,
        "nulls": nulls,
    }
    return per_cell, report
