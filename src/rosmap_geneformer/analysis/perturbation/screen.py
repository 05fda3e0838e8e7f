"""The ``perturb`` stage's screen: perturb genes in start-state cells, rank them by the shift
towards the goal state.

:func:`perturb_dataset` selects the cells (start state, cell type, seeded subsets), computes the
state centroids, and per perturbation type runs :func:`run_state_perturbation` (the engine,
:mod:`rosmap_geneformer.analysis.perturbation.engine`, then the tests,
:mod:`rosmap_geneformer.analysis.perturbation.statistics`; with ``perturb.screen.method:
estimate``, deletions are estimated first and confirmed,
:mod:`rosmap_geneformer.analysis.perturbation.estimate`) and annotates the ranked table;
:mod:`~rosmap_geneformer.analysis.perturbation.annotation` names the genes and draws the table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from transformers import BertModel

from rosmap_geneformer import distributed
from rosmap_geneformer.analysis.embeddings import PRECISIONS
from rosmap_geneformer.analysis.perturbation.annotation import annotate_table
from rosmap_geneformer.analysis.perturbation.encodings import PERTURB_TYPES, gene_slice
from rosmap_geneformer.analysis.perturbation.engine import (
    DEFAULT_MAX_TOKENS,
    EngineStats,
    cosine,
    perturb_cells,
)
from rosmap_geneformer.analysis.perturbation.estimate import (
    ScreenSettings,
    estimate_then_confirm,
)
from rosmap_geneformer.analysis.perturbation.statistics import (
    DEFAULT_NULL_SIZE,
    NET,
    RANK_BY,
    measured_shifts,
    per_gene_table,
)
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.params import check_known_keys, check_names

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The perturb stage's computation


@dataclass
class PerturbationResult:
    """Per-gene results of one perturbation type.

    Attributes
    ----------
    table
        Ranked table, one row per gene (see
        :func:`~rosmap_geneformer.analysis.perturbation.statistics.perturbation_table`).
    engine
        Counters of the exact forward passes (all of them, grid and confirmation included).
    screen
        What the screen did (``method``, and for ``estimate`` its counts); ``{"method": "exact"}``
        when every perturbation was run exactly.
    """

    table: pd.DataFrame
    engine: EngineStats
    screen: dict[str, Any]


def genes_to_perturb(
    cells: Sequence[Sequence[int]],
    *,
    min_cells: int,
    special_tokens: bool,
    exclude: Sequence[int] = (),
) -> np.ndarray:
    """Gene tokens present in at least ``min_cells`` of the cells (sorted)."""
    counts: dict[int, int] = {}
    for ids in cells:
        genes = np.unique(np.asarray(ids)[gene_slice(len(ids), special_tokens=special_tokens)])
        for token in genes.tolist():
            counts[token] = counts.get(token, 0) + 1
    excluded = set(int(t) for t in exclude)
    return np.array(
        sorted(t for t, n in counts.items() if n >= min_cells and t not in excluded),
        dtype=np.int64,
    )


def perturbation_positions(
    cells: Sequence[Sequence[int]],
    genes: np.ndarray,
    *,
    perturb_type: str,
    special_tokens: bool,
) -> list[np.ndarray]:
    """Per cell, the positions of ``genes`` to perturb (overexpression skips the front gene)."""
    out = []
    for ids in cells:
        ids = np.asarray(ids)
        window = gene_slice(len(ids), special_tokens=special_tokens)
        where = np.flatnonzero(np.isin(ids[window], genes)) + window.start
        if perturb_type == "overexpress":
            where = where[where != window.start]
        out.append(where)
    return out


def run_state_perturbation(
    encoder: BertModel,
    cells: Sequence[Sequence[int]],
    genes: np.ndarray,
    centroids: Mapping[str, np.ndarray],
    *,
    goal_state: str,
    start_state: str | None = None,
    rank_by: str = "goal",
    perturb_type: str,
    layer_index: int,
    special_tokens: bool,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    pad_token_id: int = 0,
    precision: str = "auto",
    null_size: int = DEFAULT_NULL_SIZE,
    seed: int = 0,
    progress: bool = True,
    screen: ScreenSettings | None = None,
    processes: distributed.Processes | None = None,
) -> PerturbationResult:
    """Perturb ``genes`` one at a time in every cell and test the shifts towards each state.

    Parameters
    ----------
    encoder
        The model's encoder.
    cells
        Start-state cells (token lists).
    genes
        Gene tokens to perturb (each where present in a cell).
    centroids
        State -> centroid embedding; must include ``goal_state``; the others are alternatives
        (and ``start_state``).
    goal_state
        The state the perturbation should move the cells towards.
    start_state
        The cells' own state; when its centroid is given, the table also has the net shift
        (towards the goal minus towards the start state), which discounts perturbations that
        move a cell away from every state alike.
    rank_by
        ``"goal"`` (Geneformer: the shift towards the goal) or ``"net"``.
    perturb_type, layer_index, special_tokens, max_tokens, pad_token_id, precision
        See :func:`rosmap_geneformer.analysis.perturbation.engine.perturb_cells`.
    null_size, seed
        Pooled null for the rank-sum test (per state).
    progress
        Show a progress bar.
    screen
        ``exact`` (default) or ``estimate`` then exact confirmation (:class:`ScreenSettings`).
    processes
        Under a launcher: the perturbations are shared out (see ``perturb_cells``); every
        process returns the same table.

    Returns
    -------
    The per-gene table (indexed by token; with ``estimate``, a ``confirmed`` column: run exactly
    in every cell), the engine counters and the screen report.
    """
    if goal_state not in centroids:
        msg = f"goal state {goal_state!r} has no centroid; states: {sorted(centroids)}."
        raise InputError(msg)
    screen = screen or ScreenSettings()
    positions = perturbation_positions(
        cells, genes, perturb_type=perturb_type, special_tokens=special_tokens
    )
    net = (
        (goal_state, start_state) if start_state is not None and start_state in centroids else None
    )
    run = {
        "layer_index": layer_index,
        "special_tokens": special_tokens,
        "max_tokens": max_tokens,
        "pad_token_id": pad_token_id,
        "precision": precision,
        "progress": progress,
        "processes": processes,
    }
    tests = {"goal_state": goal_state, "rank_by": rank_by, "null_size": null_size, "seed": seed}
    engine = EngineStats()
    report: dict[str, Any] = {"method": "exact"}
    if screen.method == "estimate" and perturb_type == "delete":
        per_cell, report = estimate_then_confirm(
            encoder,
            cells,
            positions,
            centroids,
            net=net,
            screen=screen,
            engine=engine,
            run=run,
            tests=tests,
        )
    else:
        if screen.method == "estimate":
            report["note"] = "the estimate covers deletion only; overexpression is run exactly"
        per_cell = [
            measured_shifts(result, centroids, net)
            for result in perturb_cells(
                encoder, cells, positions, perturb_type=perturb_type, engine_stats=engine, **run
            )
        ]
    table = per_gene_table(per_cell, **tests, nulls=report.pop("nulls", None))
    if "confirmed_genes" in report:
        table["confirmed"] = table.index.isin(report.pop("confirmed_genes"))
    return PerturbationResult(table=table, engine=engine, screen=report)


# --------------------------------------------------------------------------------------------
# The perturb stage


@dataclass(frozen=True)
class PerturbSettings:
    """``params.yaml: perturb``.

    Attributes
    ----------
    task
        Fine-tuned model to explain (``models/finetuned/<task>``); its encoder is used.
    emb_layer
        Layer, in Geneformer's convention (0: last, -1: second to last).
    split
        Split whose cells are perturbed and whose cells give the state centroids.
    state_key
        Column holding the cell state (``ad_status``).
    start_state, goal_state
        Cells perturbed, and the state they should move towards.
    alt_states
        Further states to measure shifts towards.
    rank_by
        ``net`` (towards the goal minus towards the start state; the default, because a
        deletion that moves a cell away from every state alike gets a negative goal shift
        however relevant it is) or ``goal`` (Geneformer's ranking: the shift towards the goal).
        The table has both.
    cell_type
        Only cells of this ``cell_type`` (``None``: all).
    types
        Perturbations to run (``delete``, ``overexpress``).
    max_cells
        Start-state cells perturbed (seeded subset; ``None``: all).
    min_cells
        Genes perturbed: present in at least this many of the perturbed cells.
    max_state_cells
        Cells per state for the centroids (seeded subset; ``None``: all).
    null_size
        Size of the pooled null of the rank-sum test.
    fdr
        Significance threshold on the BH FDR.
    max_tokens
        Tokens per forward pass (bounds memory).
    precision
        ``auto`` (bfloat16 on a GPU, exact float32 on the CPU), ``float32`` or ``bfloat16``
        (bfloat16 matrix products; on CPUs with AMX about twice float32's rate, shifts within
        ~1%).
    batch_size
        Cells per forward pass for the centroid embeddings.
    top_n
        Genes shown in the plot.
    screen
        Exact deletions or an estimate first (:class:`ScreenSettings`).
    """

    task: str = "disease"
    emb_layer: int = 0
    split: str = "train"
    state_key: str = "ad_status"
    start_state: str = "AD"
    goal_state: str = "control"
    alt_states: tuple[str, ...] = ()
    rank_by: str = "net"
    cell_type: str | None = "Mic"
    types: tuple[str, ...] = PERTURB_TYPES
    max_cells: int | None = 50
    min_cells: int = 10
    max_state_cells: int | None = 1000
    null_size: int = DEFAULT_NULL_SIZE
    fdr: float = 0.05
    max_tokens: int = DEFAULT_MAX_TOKENS
    precision: str = "auto"
    batch_size: int = 32
    top_n: int = 25
    screen: ScreenSettings = field(default_factory=ScreenSettings)

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> PerturbSettings:
        """Build from ``params.yaml: perturb`` (unknown keys are an error)."""
        check_known_keys(values, cls.__dataclass_fields__, section="perturb")
        values = dict(values)
        values["screen"] = ScreenSettings.from_params(values.get("screen"))
        for key in ("alt_states", "types"):
            if key in values:
                values[key] = tuple(values[key] or ())
        settings = cls(**values)
        bad = sorted(set(settings.types) - set(PERTURB_TYPES))
        if bad or not settings.types:
            msg = f"params.yaml perturb.types={list(settings.types)}: use {list(PERTURB_TYPES)}."
            raise InputError(msg)
        if settings.split == "test":
            msg = "params.yaml perturb.split: test is reserved for evaluate; use train or val."
            raise InputError(msg)
        if settings.precision not in PRECISIONS:
            msg = f"params.yaml perturb.precision={settings.precision!r}: use {list(PRECISIONS)}."
            raise InputError(msg)
        if settings.rank_by not in RANK_BY:
            msg = f"params.yaml perturb.rank_by={settings.rank_by!r}: use one of {list(RANK_BY)}."
            raise InputError(msg)
        return settings


def _subset(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or n <= cap:
        return np.arange(n)
    return np.sort(rng.choice(n, size=cap, replace=False))


def perturb_dataset(
    encoder: BertModel,
    dataset: Any,
    *,
    settings: PerturbSettings,
    annotation: pd.DataFrame,
    special_tokens: bool,
    pad_token_id: int = 0,
    seed: int = 0,
    progress: bool = True,
    source: str | None = None,
    processes: distributed.Processes | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The ``perturb`` stage: select cells, compute state centroids, perturb, test, rank.

    Parameters
    ----------
    encoder
        The encoder of the model to explain.
    dataset
        Tokenized cells of ``settings.split`` (``input_ids``, ``length``, ``cell_type`` and the
        state column).
    settings
        ``params.yaml: perturb``.
    annotation
        :func:`~rosmap_geneformer.analysis.perturbation.annotation.token_annotation` (token ->
        Ensembl id, symbol).
    special_tokens
        V2 layout.
    pad_token_id
        The ``<pad>`` id.
    seed
        Seeds the cell subsets and the null.
    progress
        Show progress bars.
    source
        Where ``dataset`` was read (named in the messages).
    processes
        Under a launcher: the embeddings and perturbations are shared out; every process
        returns the same tables and summary.

    Returns
    -------
    One ranked table per perturbation type, and the summary (counts and settings) for the
    stage report.

    Raises
    ------
    InputError
        When ``perturb.state_key``, ``perturb.cell_type`` or a state (``start_state``,
        ``goal_state``, ``alt_states``) matches nothing in the dataset, or the cell type has no
        cell in one of the states.
    """
    from rosmap_geneformer.analysis.embeddings import cell_embeddings, hidden_layer_index

    source = source or f"the tokenized {settings.split} dataset"
    check_names(
        [settings.state_key],
        dataset.column_names,
        key="perturb.state_key",
        what="column",
        source=source,
        fix="Fix the name in params.yaml, or add the column to tokenize.columns and rerun the "
        "tokenize stage.",
    )
    for column in ("cell_type", "input_ids"):
        if column not in dataset.column_names:
            msg = (
                f"{source}: no column {column!r} (columns: {dataset.column_names}); rerun the "
                "tokenize stage (with cell_type in tokenize.columns)."
            )
            raise InputError(msg)
    rng = np.random.default_rng(seed)
    layer_index = hidden_layer_index(encoder.config.num_hidden_layers, settings.emb_layer)
    states = np.asarray(dataset[settings.state_key], dtype=object)
    types = np.asarray(dataset["cell_type"], dtype=object)
    if settings.cell_type is not None:
        check_names(
            [settings.cell_type],
            {t for t in types.tolist() if t is not None},
            key="perturb.cell_type",
            what="cell type",
            source=source,
            column="cell_type",
        )
    known_states = {s for s in states.tolist() if s is not None}
    for key, names in (
        ("perturb.start_state", [settings.start_state]),
        ("perturb.goal_state", [settings.goal_state]),
        ("perturb.alt_states", list(settings.alt_states)),
    ):
        check_names(
            names, known_states, key=key, what="state", source=source, column=settings.state_key
        )
    in_type = (
        np.ones(len(dataset), bool) if settings.cell_type is None else types == settings.cell_type
    )
    summary: dict[str, Any] = {
        "settings": {
            k: asdict(v) if isinstance(v := getattr(settings, k), ScreenSettings) else v
            for k in settings.__dataclass_fields__
        },
        "layer_index": layer_index,
        "n_layers": encoder.config.num_hidden_layers,
        "cells": {
            "split": len(dataset),
            "other_cell_types": int((~in_type).sum()),
            "by_state": {
                str(s): int(((states == s) & in_type).sum()) for s in sorted(set(states[in_type]))
            },
        },
    }
    wanted_states = [settings.start_state, settings.goal_state, *settings.alt_states]
    missing = [s for s in wanted_states if not ((states == s) & in_type).any()]
    if missing:
        msg = (
            f"params.yaml perturb.cell_type: {source} has no {settings.cell_type} cells in "
            f"state(s) {', '.join(map(str, missing))} ({settings.state_key}; {settings.cell_type} "
            f"cells per state: {summary['cells']['by_state']}). Choose another perturb.cell_type "
            "or other states in params.yaml."
        )
        raise InputError(msg)

    # Centroids of the goal and alternative states (and the start state, for reference).
    centroids: dict[str, np.ndarray] = {}
    centroid_cells: dict[str, int] = {}
    for state in dict.fromkeys(wanted_states):
        rows = np.flatnonzero((states == state) & in_type)
        rows = rows[_subset(rows.size, settings.max_state_cells, rng)]
        emb = cell_embeddings(
            None,
            dataset.select(rows.tolist()),
            emb_layer=settings.emb_layer,
            batch_size=settings.batch_size,
            special_tokens=special_tokens,
            encoder=encoder,
            processes=processes,
        )
        centroids[state] = emb.astype(np.float64).mean(axis=0)
        centroid_cells[state] = int(rows.size)
    summary["centroid_cells"] = centroid_cells
    summary["centroid_cosines"] = {
        f"{a}~{b}": float(cosine(centroids[a], centroids[b]))
        for i, a in enumerate(centroids)
        for b in list(centroids)[i + 1 :]
    }

    start_rows = np.flatnonzero((states == settings.start_state) & in_type)
    start_rows = start_rows[_subset(start_rows.size, settings.max_cells, rng)]
    cells = list(dataset.select(start_rows.tolist()).with_format("numpy")["input_ids"])
    expressed = genes_to_perturb(cells, min_cells=1, special_tokens=special_tokens)
    genes = genes_to_perturb(cells, min_cells=settings.min_cells, special_tokens=special_tokens)
    summary["cells"]["perturbed"] = len(cells)
    summary["genes"] = {
        "expressed_in_perturbed_cells": int(expressed.size),
        "below_min_cells": int(expressed.size - genes.size),
        "perturbed": int(genes.size),
    }
    shift_centroids = {
        s: centroids[s] for s in (settings.goal_state, *settings.alt_states, settings.start_state)
    }
    tables: dict[str, pd.DataFrame] = {}
    summary["runs"] = {}
    for perturb_type in settings.types:
        result = run_state_perturbation(
            encoder,
            cells,
            genes,
            shift_centroids,
            goal_state=settings.goal_state,
            start_state=settings.start_state,
            rank_by=settings.rank_by,
            perturb_type=perturb_type,
            layer_index=layer_index,
            special_tokens=special_tokens,
            max_tokens=settings.max_tokens,
            pad_token_id=pad_token_id,
            precision=settings.precision,
            null_size=settings.null_size,
            seed=seed,
            progress=progress,
            screen=settings.screen,
            processes=processes,
        )
        table = annotate_table(
            result.table,
            annotation,
            fdr=settings.fdr,
            fdr_column="fdr" if settings.rank_by == "goal" else f"{NET}_fdr",
        )
        tables[perturb_type] = table
        engine = result.engine
        summary["runs"][perturb_type] = {
            "perturbations": engine.perturbations,
            "forward_passes": engine.forward_passes,
            "genes_tested": len(table),
            # Overexpression skips a gene already at the front (its shift would be 0).
            "skipped_already_first": _already_first(cells, genes, special_tokens=special_tokens)
            if perturb_type == "overexpress"
            else 0,
            "significant": int(table["significant"].sum()),
            "top_genes": table["symbol"].head(10).tolist(),
            "screen": result.screen,
        }
        logger.info(
            "%s: %d perturbations in %.1f s (%.1f/s); %d of %d genes significant at FDR %.2g",
            perturb_type,
            engine.perturbations,
            engine.seconds,
            engine.rate,
            int(table["significant"].sum()),
            len(table),
            settings.fdr,
        )
    return tables, summary


def _already_first(cells: Sequence[np.ndarray], genes: np.ndarray, *, special_tokens: bool) -> int:
    front = 1 if special_tokens else 0
    return int(sum(len(c) > front and np.isin(c[front], genes) for c in cells))
